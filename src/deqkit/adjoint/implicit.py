"""Implicit differentiation through the equilibrium (implicit function theorem)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._checks import check_bool, check_choice
from ..linear import GMRES, AbstractLinearSolver, IdentityMinus, JacobianOperator, Neumann
from ._base import (
    AbstractAdjoint,
    HigherOrderError,
    OneEvaluation,
    finite_rows,
    has_tangent,
    refuse_higher_order,
)
from ._higher import (
    Functional,
    LinearImplicit,
    Meta,
    captured_intermediates,
    differentiable_inputs,
    input_partials,
    module_slots,
)
from ._reuse import (
    FORWARD_FACTOR,
    ForwardInfo,
    combine_inv_norm,
    error_estimates,
    preconditioned_solve,
    scaled_solve,
    warm_solve,
)
from .jacobian_free import JacobianFreeAdjoint
from .phantom import PhantomAdjoint

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
    """The equilibrium ``z*`` with the implicit gradient through ``fz = f(z*)``. ``inputs``:
    the differentiable inputs of f (:func:`differentiable_inputs`); they receive gradients
    only when the backward pass is recorded (``create_graph=True``), otherwise the gradient
    reaches them through ``fz``'s graph."""

    @staticmethod
    def forward(ctx: Any, fz: Tensor, payload: dict[str, Any],  # type: ignore[override]
                *inputs: Tensor) -> Tensor:
        ctx.payload = payload
        ctx.fz = fz
        ctx.ninputs = len(inputs)
        out = payload.pop("z_star")
        ctx.save_for_backward(out)  # (unpacked in a recorded backward: z* with its graph)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        payload = ctx.payload
        if torch.is_grad_enabled():  # create_graph=True: this gradient is differentiated
            return (None, None, *_recorded_backward(ctx, grad))
        none = (None,) * ctx.ninputs
        adjoint: Any = payload["adjoint"]
        stats: dict[str, Any] = payload["stats"]
        ok = finite_rows(grad)
        if ok is not None and not bool(ok.any()):
            # Every row overflowed (e.g. a GradScaler-scaled float16 loss): no linear solve
            # can give it meaning. Pass it through unsolved so the non-finite values reach the
            # parameters' gradients, where the scaler sees them and skips the step.
            stats.update(_unsolved_stats(grad, ok))
            return (grad, None, *none)
        # I - J^T at z*, from the one evaluation f(z*) kept by the forward pass
        op = IdentityMinus(JacobianOperator.from_evaluation(payload["z_req"], ctx.fz)).T
        # Rows with a non-finite incoming gradient are solved as zero rows (samples are
        # independent, so they do not disturb the others) and passed through afterwards.
        rhs = grad if ok is None else torch.where(ok.unsqueeze(1), grad, 0.0)
        u = adjoint.solve_backward(op, rhs, stats, ok, payload.get("forward"))
        return ((u if ok is None else torch.where(ok.unsqueeze(1), u, grad)), None, *none)

    @staticmethod
    def jvp(ctx: Any, fz_dot: Tensor, *_: Any) -> Tensor:  # type: ignore[override]
        # forward mode: z_req carries no tangent, so fz's tangent is (df/dp) p_dot and the
        # equilibrium's is t = (I - J)^{-1} (df/dp) p_dot
        payload = ctx.payload
        op = IdentityMinus(JacobianOperator.from_evaluation(payload["z_req"], ctx.fz))
        return payload["adjoint"].solve_tangent(op, fz_dot, payload["stats"],
                                                payload.get("forward"))


def _recorded_backward(ctx: Any, grad: Tensor) -> tuple[Tensor, ...]:
    """The gradients of the inputs of f as differentiable functions of ``grad``, ``z*`` and
    the inputs (see :mod:`deqkit.adjoint._higher`); refuses adjoints whose gradient is not
    the exact implicit one."""
    payload = ctx.payload
    adjoint, functional = payload["adjoint"], payload.get("functional")
    name = type(adjoint).__name__
    if not isinstance(adjoint, ImplicitAdjoint):
        refuse_higher_order(name)
    if functional is None:
        raise HigherOrderError(
            f"{name}: a higher-order derivative needs the solve's map and inputs, which the "
            "deprecated `attach`/`apply` path does not keep; call dk.fixed_point.")
    (z,) = ctx.saved_tensors
    extra = captured_intermediates(functional, z)
    if extra:
        t = extra[0]
        raise HigherOrderError(
            f"{name}: a higher-order derivative needs every tensor requiring grad that f reads "
            f"as an input it can differentiate, but f reads a tensor of shape "
            f"{tuple(t.shape)} (grad_fn {type(t.grad_fn).__name__}) that was computed "
            "outside f and is not reachable from f's closure, arguments or module "
            "attributes (a global?). Pass it through `args` if it is per-sample, close over "
            "it, or compute it inside f.")
    ok = finite_rows(grad)
    rhs = grad if ok is None else torch.where(ok.unsqueeze(1), grad, 0.0)
    meta = Meta(functional=functional, solver=adjoint.linear_solver, transpose=True,
                stats=payload["stats"], on_failure=adjoint.on_failure,
                warning=BackwardSolveWarning)
    u = LinearImplicit.apply(rhs, z, meta, *functional.inputs)
    if ok is not None:
        u = torch.where(ok.unsqueeze(1), u, grad)
    return input_partials(functional, z, functional.inputs, u)


def _unsolved_stats(grad: Tensor, ok: Tensor) -> dict[str, Any]:
    n, dev = grad.shape[0], grad.device
    return dict(nstep=torch.zeros(n, dtype=torch.long, device=dev),
                residual=torch.full((n,), float("inf"), device=dev),
                converged=torch.zeros(n, dtype=torch.bool, device=dev), nmatvec=0,
                fallback=torch.zeros(n, dtype=torch.bool, device=dev), nonfinite_grad=~ok)


@dataclasses.dataclass(frozen=True)
class ImplicitAdjoint(OneEvaluation):
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
        fallback: ``None`` or an adjoint whose gradient replaces that of the samples whose
            solve failed (recorded in ``sol.backward["fallback"]``):
            ``dk.PhantomAdjoint(steps, damping)`` or ``dk.JacobianFreeAdjoint()``, computed
            from the same evaluation of f at z*. Default: None. (The string ``"phantom"``
            with ``fallback_steps``/``fallback_damping`` is deprecated.)
        fallback_steps: deprecated, with ``fallback="phantom"``. Default: 5.
        fallback_damping: deprecated, with ``fallback="phantom"``. Default: 0.5.
        reuse_forward: reuse the forward solver's estimate :math:`M = I + UV^\top \approx
            (I - J)^{-1}` (quasi-Newton solvers: :class:`~deqkit.Broyden`,
            :class:`~deqkit.Anderson`; see
            :meth:`~deqkit.AbstractFixedPointSolver.inverse_estimate`): the backward system
            is solved from :math:`u_0 = M^\top g` with the right preconditioner
            :math:`M^\top` (SHINE's estimate as a warm start, Ramzi et al. 2022). The
            linear solver's tolerance still applies to the true residual, so the gradient
            is as exact as without it; only the number of products changes. Costs
            :math:`2BDn` floats kept from the forward solve. Solvers without an estimate
            run cold. Default: False.
        rtol_from_forward: per sample, solve only to
            :math:`\max(\text{rtol}, c\,\varepsilon_\text{fwd})` with
            :math:`\varepsilon_\text{fwd}` the forward relative residual and
            :math:`c = 0.1`: the equilibrium is only known to
            :math:`\|(I-J)^{-1}\|\,\varepsilon_\text{fwd}` and the backward solve's
            error is amplified by the same norm, so solving further buys no accuracy; with
            :math:`c = 0.1` the solve adds at most about a tenth of the error the forward
            residual already causes. Recorded in ``sol.backward["rtol"]``. Default: False.

    Statistics in ``sol.backward``: ``nstep``, ``residual`` (true
    :math:`\|g - (I - J^\top)u\|`), ``converged``, ``nmatvec``, ``fallback``,
    ``nonfinite_grad``, and the a-posteriori estimates (NaN when no
    :math:`\kappa \approx \|(I - J^\top)^{-1}\|_2` is known: from the linear solver's
    ``inv_norm`` when it reports one, or :math:`\|M\|_2` with ``reuse_forward``, the larger
    of the two; ``inv_norm`` records it):

    * ``grad_error`` :math:`= \kappa\,\|r\| / \|u\|`, an estimate (a bound when
      :math:`\kappa` is one) of the relative error of :math:`u` against the exact solution
      of the backward system at the returned :math:`z`, since :math:`u^\star - u = (I -
      J^\top)^{-1} r`;
    * ``forward_error`` :math:`= \kappa\,\|f(z) - z\| / \|z\|`: the returned :math:`z`
      differs from the true equilibrium by :math:`\delta z \approx (I - J)^{-1}(f(z) - z)`;
      this is the relative size of :math:`\delta z`. The gradient is evaluated at
      :math:`z` instead of :math:`z^\star`, so it carries an error of first order in
      :math:`\delta z` (scaled by the curvature of f and of the loss) that no backward
      tolerance removes.

    Higher-order derivatives are exact: when the backward pass records a graph
    (``create_graph=True``) it is built from differentiable pieces, the linear solve being
    itself differentiated implicitly (the transposed solve), so gradient penalties,
    Hessian-vector products and ``torch.autograd.gradgradcheck`` work (see
    :mod:`deqkit.adjoint._higher` and the docs' "Higher-order derivatives"). Forward mode
    (``torch.autograd.forward_ad``) gives :math:`\dot z = (I - J)^{-1}\partial_p f\,\dot p`
    (statistics in ``sol.backward["tangent"]``), and the ``torch.func`` transforms (``grad``,
    ``vjp``, ``jvp``, ``jacrev``, ``jacfwd``, ``hessian``, ``vmap``) work through this adjoint.

    References: Bai, Kolter, Koltun (2019), "Deep Equilibrium Models"; Geng et al. (2021),
    "On Training Implicit Models" (phantom gradients); Ramzi, Mannel, Bauschke, Kolter
    (2022), "SHINE: SHaring the INverse Estimate from the forward pass for bi-level
    optimization and implicit models", ICLR.

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
    fallback: AbstractAdjoint | str | None = None
    fallback_steps: int = 5
    fallback_damping: float = 0.5
    reuse_forward: bool = False
    rtol_from_forward: bool = False
    leaf: ClassVar[bool] = True
    uses_adjoint_cache: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.linear_solver, AbstractLinearSolver):
            raise TypeError(
                "ImplicitAdjoint: `linear_solver` must be a deqkit linear solver (dk.GMRES(), "
                "dk.BiCGStab(), dk.Neumann(), dk.Dense()), got "
                f"{type(self.linear_solver).__name__}."
            )
        check_choice("ImplicitAdjoint", "on_failure", self.on_failure, _ON_FAILURE)
        check_bool("ImplicitAdjoint", "reuse_forward", self.reuse_forward)
        check_bool("ImplicitAdjoint", "rtol_from_forward", self.rtol_from_forward)
        if isinstance(self.fallback, str) and self.fallback == "phantom":
            warnings.warn(
                "ImplicitAdjoint(fallback='phantom', fallback_steps=..., fallback_damping=...) "
                "is deprecated: pass the adjoint, fallback=dk.PhantomAdjoint(steps, damping).",
                DeprecationWarning, stacklevel=3,
            )
            phantom = PhantomAdjoint(steps=self.fallback_steps, damping=self.fallback_damping)
            object.__setattr__(self, "fallback", phantom)
        elif self.fallback is not None and not isinstance(
                self.fallback, (PhantomAdjoint, JacobianFreeAdjoint)):
            raise ValueError(
                "ImplicitAdjoint: `fallback` must be None or 'phantom' (deprecated) or an "
                "adjoint computed from the same evaluation of f: dk.PhantomAdjoint(steps, "
                f"damping) or dk.JacobianFreeAdjoint(); got {self.fallback!r}."
            )

    def keeps_inverse(self) -> bool:
        return self.reuse_forward

    def attach_output(self, z_in: Tensor, fz: Tensor, backward_stats: dict[str, Any],
                      primal: Any) -> Tensor:
        return self.attach(z_in, fz, backward_stats, forward=ForwardInfo.from_primal(primal),
                           problem=(primal.problem.fn, primal.args))

    def _linear_solve(self, op: Any, rhs: Tensor, stats: dict[str, Any],
                      forward: ForwardInfo | None) -> Any:
        """The backward linear solve, warm-started and preconditioned by the forward estimate
        with ``reuse_forward``, to a per-sample tolerance with ``rtol_from_forward``, from
        the samples' stored adjoint vectors with an adjoint cache."""
        P = forward.preconditioner() if forward is not None and self.reuse_forward else None

        def run(solver: AbstractLinearSolver, b: Tensor) -> Any:
            return preconditioned_solve(solver, op, b, P)

        rtol = None
        if self.rtol_from_forward and forward is not None:
            base = torch.full_like(forward.rel_residual, float(self.linear_solver.rtol))
            rtol = torch.fmax(base, FORWARD_FACTOR * forward.rel_residual.to(base.dtype))
            stats["rtol"] = rtol
            rtol = rtol.to(rhs.dtype)
        if forward is not None and forward.adjoint_cache is not None:
            return warm_solve(run, self.linear_solver, op, rhs, rtol, forward.adjoint_cache)
        if rtol is not None:
            return scaled_solve(run, self.linear_solver, rhs, rtol)
        return run(self.linear_solver, rhs)

    def solve_backward(self, op: Any, rhs: Tensor, stats: dict[str, Any],
                       ok: Tensor | None = None, forward: ForwardInfo | None = None) -> Tensor:
        r"""Solve :math:`(I - J^\top) u = g` (``op``, ``rhs``) with the linear solver, record
        the statistics in ``stats`` and handle a failed solve as ``on_failure`` and
        ``fallback`` say. ``ok``: rows with a finite incoming gradient (None: all);
        ``forward``: what the forward solve left (estimate, residuals), or None."""
        sol = self._linear_solve(op, rhs, stats, forward)
        inv = combine_inv_norm(getattr(sol, "inv_norm", None),
                               forward.inverse_norm() if forward is not None else None)
        stats.update(error_estimates(sol.value, sol.residual, forward, inv))
        stats.update(
            nstep=sol.nstep,
            residual=sol.residual if ok is None else sol.residual.masked_fill(~ok, float("inf")),
            converged=sol.converged if ok is None else sol.converged & ok,
            nmatvec=sol.nmatvec,
            fallback=torch.zeros_like(sol.converged),
            nonfinite_grad=torch.zeros_like(sol.converged) if ok is None else ~ok,
        )
        if forward is not None and forward.adjoint_cache is not None:
            store, ids = forward.adjoint_cache
            store.update(ids, sol.value, converged=stats["converged"])
        failed = ~sol.converged
        if not bool(failed.any()):
            return sol.value
        u, nfail = sol.value, int(failed.sum())
        msg = (
            f"implicit backward: the linear solve {self.linear_solver} did not converge "
            f"for {nfail}/{failed.numel()} samples (worst residual "
            f"{float(sol.residual.max()):.3e}); the gradient is inexact. Increase the "
            "linear solver's max_steps, use dk.GMRES, or make f more contractive."
        )
        if self.fallback is not None:
            # Phantom gradient (Geng et al. 2021) for the failed samples: k damped Neumann
            # steps from 0, the VJP form of unrolling k damped Picard steps at z* (JFB: one
            # undamped step).
            steps, damping = _neumann_form(self.fallback)
            ph = Neumann(rtol=0.0, atol=0.0, max_steps=steps, damping=damping).solve(op, rhs)
            u = torch.where(failed.unsqueeze(1), ph.value, u)
            stats["fallback"] = failed
            msg += f" Used {self.fallback} for those samples ({nfail} recorded in stats)."
        if self.on_failure == "raise":
            raise RuntimeError(msg)
        if self.on_failure == "warn":
            warnings.warn(msg, BackwardSolveWarning, stacklevel=4)
        return u

    def solve_tangent(self, op: Any, rhs: Tensor, stats: dict[str, Any],
                      forward: ForwardInfo | None = None) -> Tensor:
        r"""Forward mode: solve :math:`(I - J) t = \dot f` (``op``, ``rhs``) with the linear
        solver; its statistics go to ``stats["tangent"]``; a failed solve is handled as
        ``on_failure`` says (no fallback)."""
        with torch.no_grad():
            sol = self.linear_solver.solve(op, rhs.detach())
        stats["tangent"] = {"nstep": sol.nstep, "residual": sol.residual,
                            "converged": sol.converged, "nmatvec": sol.nmatvec}
        if not sol.all_converged and self.on_failure != "ignore":
            msg = (f"implicit forward-mode tangent: the linear solve {self.linear_solver} did "
                   f"not converge for {int((~sol.converged).sum())}/{sol.converged.numel()} "
                   "samples; the tangent is inexact.")
            if self.on_failure == "raise":
                raise RuntimeError(msg)
            warnings.warn(msg, BackwardSolveWarning, stacklevel=4)
        return sol.value

    def attach(self, z_in: Tensor, fz: Tensor, backward_stats: dict[str, Any], *,
               forward: ForwardInfo | None = None,
               problem: tuple[Any, tuple[Any, ...]] | None = None) -> Tensor:
        """The value ``z_in`` with the implicit gradient through ``fz = f(z_in)``;
        ``forward``: what the forward solve left for the backward (see :meth:`solve`);
        ``problem``: ``(fn, args)`` with ``fz = fn(z_in, *args)``, for higher-order
        derivatives (without it they are refused)."""
        z_star = z_in.detach()
        if not _depends_on_more_than(fz, z_in) and not has_tangent(fz):
            return z_star  # nothing else f uses requires grad or carries a tangent
        fn, args = problem if problem is not None else (None, ())
        inputs = differentiable_inputs(fz, z_in, args, fn)
        payload = {"z_star": z_star, "z_req": z_in, "adjoint": self, "stats": backward_stats,
                   "forward": forward,
                   "functional": None if fn is None else Functional(
                       fn, args, inputs, module_slots(fn, inputs))}
        return _Implicit.apply(fz, payload, *inputs)


def _neumann_form(adjoint: AbstractAdjoint) -> tuple[int, float]:
    """``(steps, damping)`` of the damped Neumann series that is ``adjoint``'s gradient at an
    exact fixed point (phantom: k damped steps; JFB: one undamped step)."""
    if isinstance(adjoint, PhantomAdjoint):
        return adjoint.steps, float(adjoint.damping)
    return 1, 1.0
