"""Implicit differentiation through the equilibrium (implicit function theorem)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..linear import GMRES, AbstractLinearSolver, Neumann
from ._base import _OneEvaluation, finite_rows, refuse_higher_order

_ON_FAILURE = ("warn", "raise", "ignore")


class BackwardSolveWarning(RuntimeWarning):
    """The linear solve of an implicit backward pass did not reach its tolerance.

    Example:
        >>> import warnings, torch, deqkit as dk
        >>> A = torch.diag(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
        >>> x = torch.ones(1, 3, dtype=torch.float64, requires_grad=True)
        >>> one_step = dk.ImplicitAdjoint(dk.GMRES(rtol=1e-12, max_steps=1))  # too few iterations
        >>> sol = dk.fixed_point(lambda z: z @ A + x, torch.zeros(1, 3, dtype=torch.float64),
        ...                      solver=dk.Anderson(rtol=1e-12, atol=0), adjoint=one_step)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     sol.value.sum().backward()
        >>> [w.category.__name__ for w in caught], sol.backward["converged"].tolist()
        (['BackwardSolveWarning'], [False])
    """


def _depends_on_more_than(out: Tensor, leaf: Tensor) -> bool:
    """Whether ``out``'s autograd graph reaches a tensor requiring grad other than ``leaf``."""
    if out.grad_fn is None:
        return False
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None:  # AccumulateGrad: a leaf
            if var is not leaf:
                return True
            continue
        stack.extend(n for n, _ in node.next_functions)
    return False


class _Implicit(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, fz: Tensor, payload: dict[str, Any]) -> Tensor:  # type: ignore[override]
        ctx.payload = payload
        ctx.fz = fz
        return payload["z_star"]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        # The linear solve below is not differentiated (u depends on z* through J, which
        # the VJPs do not record): a second derivative would be silently wrong, so refuse.
        refuse_higher_order("ImplicitAdjoint")
        payload = ctx.payload
        fz, z_req = ctx.fz, payload["z_req"]
        adjoint: ImplicitAdjoint = payload["adjoint"]
        stats: dict[str, Any] = payload["stats"]

        def matvec(u: Tensor) -> Tensor:  # (I - J^T) u
            with torch.enable_grad():
                (vjp,) = torch.autograd.grad(fz, z_req, u, retain_graph=True)
            return u - vjp

        n = grad.shape[0]
        ok = finite_rows(grad)
        if ok is not None and not bool(ok.any()):
            # Every row overflowed (e.g. a GradScaler-scaled float16 loss): no linear solve
            # can give it meaning. Pass it through unsolved so the non-finite values reach the
            # parameters' gradients, where the scaler sees them and skips the step.
            stats.update(
                nstep=torch.zeros(n, dtype=torch.long, device=grad.device),
                residual=torch.full((n,), float("inf"), device=grad.device),
                converged=torch.zeros(n, dtype=torch.bool, device=grad.device),
                nmatvec=0,
                fallback=torch.zeros(n, dtype=torch.bool, device=grad.device),
                nonfinite_grad=~ok,
            )
            return grad, None
        # Rows with a non-finite incoming gradient are solved as zero rows (samples are
        # independent, so they do not disturb the others) and passed through afterwards.
        rhs = grad if ok is None else torch.where(ok.unsqueeze(1), grad, 0.0)
        sol = adjoint.linear_solver.solve(matvec, rhs)
        u = sol.value
        converged = sol.converged if ok is None else sol.converged & ok
        stats.update(
            nstep=sol.nstep,
            residual=sol.residual if ok is None else sol.residual.masked_fill(~ok, float("inf")),
            converged=converged,
            nmatvec=sol.nmatvec,
            fallback=torch.zeros_like(sol.converged),
            nonfinite_grad=torch.zeros_like(sol.converged) if ok is None else ~ok,
        )
        failed = ~sol.converged
        if bool(failed.any()):
            nfail = int(failed.sum())
            msg = (
                f"implicit backward: the linear solve {adjoint.linear_solver} did not converge "
                f"for {nfail}/{failed.numel()} samples (worst residual "
                f"{float(sol.residual.max()):.3e}); the gradient is inexact. Increase the "
                "linear solver's max_steps, use dk.GMRES, or make f more contractive."
            )
            if adjoint.fallback == "phantom":
                # Phantom gradient (Geng et al. 2021) for the failed samples: k damped
                # Neumann steps from 0, the VJP form of unrolling k damped Picard steps at z*.
                ph = Neumann(
                    rtol=0.0, atol=0.0, max_steps=adjoint.fallback_steps,
                    damping=adjoint.fallback_damping,
                ).solve(matvec, rhs)
                u = torch.where(failed.unsqueeze(1), ph.value, u)
                stats["fallback"] = failed
                msg += f" Used the phantom gradient for those samples ({nfail} recorded in stats)."
            if adjoint.on_failure == "raise":
                raise RuntimeError(msg)
            if adjoint.on_failure == "warn":
                warnings.warn(msg, BackwardSolveWarning, stacklevel=2)
        if ok is not None:
            u = torch.where(ok.unsqueeze(1), u, grad)
        return u, None


@dataclasses.dataclass(frozen=True)
class ImplicitAdjoint(_OneEvaluation):
    r"""Exact gradient of the equilibrium by the implicit function theorem.

    Differentiating :math:`z^\star = f(z^\star, \theta)` gives
    :math:`\mathrm d z^\star = (I - J)^{-1} \partial_\theta f\, \mathrm d\theta` with
    :math:`J = \partial f/\partial z` at :math:`z^\star`. For an incoming gradient :math:`g` the
    backward pass solves

    .. math:: (I - J^\top)\, u = g

    with ``linear_solver`` using vector-Jacobian products of one evaluation of f at
    :math:`z^\star` (kept from the forward pass), then backpropagates :math:`u` through that
    evaluation into the parameters and inputs of f. Memory is one graph of f, independent of the
    number of forward iterations. Well-posed when 1 is not an eigenvalue of J (e.g. f
    contractive). Statistics of the solve land in ``sol.backward``.

    Args:
        linear_solver: the solver for the backward system. Default: ``GMRES()``.
        on_failure: what to do when the linear solve misses its tolerance: ``"warn"`` (a
            :class:`BackwardSolveWarning`), ``"raise"`` (RuntimeError) or ``"ignore"``;
            always recorded in ``sol.backward["converged"]``. Default: ``"warn"``.
        fallback: ``None`` or ``"phantom"``: replace the gradient of samples whose solve failed
            by the phantom gradient (recorded in ``sol.backward["fallback"]``). Default: None.
        fallback_steps: steps of the phantom fallback. Default: 5.
        fallback_damping: damping of the phantom fallback. Default: 0.5.

    References: Bai, Kolter, Koltun (2019), "Deep Equilibrium Models"; Geng et al. (2021),
    "On Training Implicit Models" (phantom gradients).

    Example:
        >>> import torch, deqkit as dk
        >>> adj = dk.ImplicitAdjoint(dk.GMRES(rtol=1e-8))
        >>> x = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
        >>> sol = dk.fixed_point(lambda z: 0.5 * z + x, torch.zeros(2, 3, dtype=torch.float64),
        ...                      adjoint=adj, solver=dk.Anderson(rtol=1e-12, atol=0))
        >>> sol.value.sum().backward()  # z* = 2x, so dz*/dx = 2
        >>> torch.allclose(x.grad, torch.full_like(x, 2.0))
        True
    """

    linear_solver: AbstractLinearSolver = dataclasses.field(default_factory=GMRES)
    on_failure: str = "warn"
    fallback: str | None = None
    fallback_steps: int = 5
    fallback_damping: float = 0.5
    forward_nfev: ClassVar[int] = 1
    reuse_eval: ClassVar[str] = "z"
    _z_graph: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.linear_solver, AbstractLinearSolver):
            raise TypeError(
                "ImplicitAdjoint: `linear_solver` must be a deqkit linear solver (dk.GMRES(), "
                "dk.BiCGStab(), dk.Neumann(), dk.Dense()), got "
                f"{type(self.linear_solver).__name__}."
            )
        if self.on_failure not in _ON_FAILURE:
            raise ValueError(
                f"ImplicitAdjoint: `on_failure` must be one of {_ON_FAILURE}, "
                f"got {self.on_failure!r}."
            )
        if self.fallback not in (None, "phantom"):
            raise ValueError(
                f"ImplicitAdjoint: `fallback` must be None or 'phantom', got {self.fallback!r}."
            )

    def apply_evaluated(self, z_in: Tensor, fz: Tensor, backward_stats: dict[str, Any]) -> Tensor:
        z_star = z_in.detach()
        if not _depends_on_more_than(fz, z_in):  # nothing else f uses requires grad
            return z_star
        payload = {"z_star": z_star, "z_req": z_in, "adjoint": self, "stats": backward_stats}
        return _Implicit.apply(fz, payload)
