"""``stability_report``: a one-call stability diagnosis of a DEQ layer on a batch.

It answers, per sample and for the batch, the questions one asks when a DEQ trains badly:
did the forward solve converge and how fast (residual trace, steps, result codes), how
contractive is the cell at the equilibrium (spectral radius and spectral norm of
``J = d cell / dz`` at ``z*``), how well conditioned is the implicit backward system
``(I - J^T) u = g``, and did its linear solve converge.  It ends with a list of warnings in
plain sentences, each with a remedy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .._solution import RESULTS
from ..adjoint.implicit import ImplicitAdjoint
from ..linear import GMRES, AbstractLinearSolver
from .diagnostics import jacobian_spectral_norm, jacobian_spectral_radius
from .parametrizations import parametrization_cache

__all__ = ["DEQLike", "StabilityReport", "stability_report"]


@runtime_checkable
class DEQLike(Protocol):
    """What :func:`stability_report` reads and sets on a layer; :class:`deqkit.nn.DEQ` has it.

    An ``nn.Module`` called as ``layer(*inputs, z0=z0)`` that solves ``z = cell(z, *inputs)``
    with the adjoint ``adjoint``, the keyword arguments ``fp_kwargs`` of
    :func:`deqkit.fixed_point`, the flag ``throw`` and the step budgets ``max_steps``
    (training) / ``eval_max_steps`` (eval), stores the solve in ``last_solution``, and sets
    its ``adjoint`` and ``throw`` for a ``with`` block with ``overrides(adjoint=..., throw=...)``.
    """

    cell: Any
    adjoint: Any
    fp_kwargs: dict[str, Any]
    throw: bool
    max_steps: int
    eval_max_steps: int
    last_solution: Any

    def overrides(self, *, adjoint: Any = None, throw: bool | None = None) -> Any:
        """A context manager setting the given fields for the block (see
        :meth:`deqkit.nn.DEQ.overrides`)."""

def _is_deq_like(layer: Any) -> bool:
    """Whether ``layer`` has every member of :class:`DEQLike`. (Not ``isinstance`` on the
    protocol: from Python 3.12 it looks attributes up statically, and a module's submodules,
    such as ``cell``, are not instance attributes.)"""
    return (all(hasattr(layer, name) for name in DEQLike.__annotations__)
            and callable(getattr(layer, "overrides", None)))


_REMEDY = (
    "use spectral normalisation (dk.nn.spectral_norm) or Jacobian regularisation "
    "(dk.jacobian_frobenius_reg)"
)


def _floats(t: Tensor) -> list[float]:
    return [float(v) for v in t.detach().double().cpu().tolist()]


def _plain(value: Any) -> Any:
    """Floats/ints/bools/lists/dicts only; NaN and inf become ``None`` (valid JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _stat(values: list[float], how: str) -> float:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return float("nan")
    if how == "max":
        return max(finite)
    if how == "min":
        return min(finite)
    return sum(finite) / len(finite)


@dataclasses.dataclass
class StabilityReport:
    """Result of :func:`stability_report`. Per-sample lists have one entry per batch row.

    Attributes:
        batch_size: ``B``.
        training: whether the DEQ was in training mode (which ``max_steps`` applied).
        max_steps: the forward step budget used.
        solver: ``repr`` of the forward solver.
        result: batch result name (``"successful"``, ``"max_steps_reached"``, ...).
        nstep: forward steps per sample.
        status: per-sample result names.
        abs_residual, rel_residual: final forward residuals per sample.
        trace: per sample, the absolute residual of every forward step (initial guess first).
        spectral_radius: ``rho(J)`` at ``z*`` per sample (Arnoldi; exact when ``D <= krylov_dim``).
        spectral_norm: ``||J||_2`` at ``z*`` per sample (power iteration, approached from below).
        cond_estimate: ``1 / (1 - rho)`` per sample (``inf`` when ``rho >= 1``): an *estimate*
            of the condition number of ``I - J``, **not a bound** -- it is the size of
            ``||(I - J)^{-1}||`` when the dominant eigenvalue is real positive and ``J`` is
            close to normal; a non-normal ``J`` can be worse.
        cond_upper_bound: ``(1 + ||J||) / (1 - ||J||)`` per sample, a rigorous **upper bound**
            of ``||I - J|| * ||(I - J)^{-1}||`` (Neumann series) when ``||J||_2 < 1`` (up to the
            accuracy of the norm estimate); ``inf`` when ``||J||_2 >= 1`` (no bound).
        backward_ran: whether an implicit backward pass ran (something required grad).
        backward_solver: ``repr`` of the backward linear solver.
        backward_converged, backward_nstep, backward_residual: per sample, from
            ``sol.backward`` (empty lists when the backward did not run).
        backward_nmatvec: batched matrix-vector products of the backward solve.
        mean_nstep, max_nstep, frac_max_steps, n_max_steps: forward steps over the batch
            (mean, max, fraction and number of samples that used the whole budget).
        n_diverged, n_nonfinite, n_stagnated, n_backward_failed: numbers of samples.
        rho_max, rho_mean, norm_max, norm_mean: batch aggregates of ``spectral_radius``
            and ``spectral_norm`` (NaN entries ignored).
        cond_estimate_max, cond_upper_bound_max: the largest ``cond_estimate`` and
            ``cond_upper_bound`` over the batch (NaN entries ignored).
        warnings: human sentences describing problems, each with a remedy; empty when healthy.

    Example:
        >>> import torch, deqkit as dk
        >>> layer = dk.nn.DEQ(lambda z, x: torch.tanh(0.5 * z + x))
        >>> report = dk.stability_report(layer, torch.randn(3, 4))
        >>> report.batch_size, report.result, report.warnings, report.rho_max < 0.5 + 1e-6
        (3, 'successful', [], True)
        >>> report.to_dict()["nstep"] == report.nstep
        True
    """

    batch_size: int
    training: bool
    max_steps: int
    solver: str
    result: str
    nstep: list[int]
    status: list[str]
    abs_residual: list[float]
    rel_residual: list[float]
    trace: list[list[float]]
    spectral_radius: list[float]
    spectral_norm: list[float]
    cond_estimate: list[float]
    cond_upper_bound: list[float]
    backward_ran: bool
    backward_solver: str
    backward_converged: list[bool]
    backward_nstep: list[int]
    backward_residual: list[float]
    backward_nmatvec: int
    mean_nstep: float
    max_nstep: int
    frac_max_steps: float
    n_max_steps: int
    n_diverged: int
    n_nonfinite: int
    n_stagnated: int
    rho_max: float
    rho_mean: float
    norm_max: float
    norm_mean: float
    cond_estimate_max: float
    cond_upper_bound_max: float
    n_backward_failed: int
    rho_threshold: float
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """``True`` when there are no warnings."""
        return not self.warnings

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of floats, ints, bools, strings and lists (NaN/inf -> ``None``),
        ready for :func:`json.dumps`."""
        return _plain(dataclasses.asdict(self))

    def __str__(self) -> str:
        def fmt(v: float) -> str:
            return f"{v:.4g}" if math.isfinite(v) else str(v)

        b = self.batch_size
        lines = [
            f"DEQ stability report ({b} samples, {'training' if self.training else 'eval'} "
            f"mode, solver {self.solver}, max_steps {self.max_steps})",
            f"  forward : result {self.result}; steps mean {self.mean_nstep:.1f}, max "
            f"{self.max_nstep}; hit max_steps {self.n_max_steps}/{b} "
            f"({100 * self.frac_max_steps:.0f}%), stagnated {self.n_stagnated}, diverged "
            f"{self.n_diverged}, non-finite {self.n_nonfinite}; rel residual max "
            f"{fmt(_stat(self.rel_residual, 'max'))}",
            f"  rho(J)  : mean {fmt(self.rho_mean)}, max {fmt(self.rho_max)} "
            f"(threshold {self.rho_threshold})",
            f"  ||J||_2 : mean {fmt(self.norm_mean)}, max {fmt(self.norm_max)}",
            f"  cond(I - J): estimate 1/(1-rho) max {fmt(self.cond_estimate_max)} (not a bound);"
            f" upper bound (1+||J||)/(1-||J||) max {fmt(self.cond_upper_bound_max)}"
            + (" (no bound: ||J|| >= 1)" if math.isinf(self.cond_upper_bound_max) else ""),
        ]
        if self.backward_ran:
            lines.append(
                f"  backward: {self.backward_solver}; converged "
                f"{b - self.n_backward_failed}/{b}; steps mean "
                f"{_stat([float(n) for n in self.backward_nstep], 'mean'):.1f}, residual max "
                f"{fmt(_stat(self.backward_residual, 'max'))}, matvecs {self.backward_nmatvec}"
            )
        else:
            lines.append("  backward: not run (nothing the equilibrium depends on requires grad)")
        lines.append("  per sample: steps  status             rho(J)   ||J||_2  bwd")
        for i in range(min(b, 8)):
            bwd = ("ok" if self.backward_converged[i] else "FAILED") if self.backward_ran else "-"
            lines.append(
                f"    [{i:>3}]   {self.nstep[i]:>5}  {self.status[i]:<18} "
                f"{fmt(self.spectral_radius[i]):>7}  {fmt(self.spectral_norm[i]):>7}  {bwd}"
            )
        if b > 8:
            lines.append(f"    ... ({b - 8} more)")
        if self.warnings:
            lines.append("  warnings:")
            lines.extend(f"    - {w}" for w in self.warnings)
        else:
            lines.append("  no warnings")
        return "\n".join(lines)


def _default_loss(z: Any) -> Tensor:
    if isinstance(z, Tensor):
        return z.square().sum()
    return sum(t.square().sum() for t in z)


@contextlib.contextmanager
def _preserved(deq: DEQLike) -> Iterator[None]:
    """Restore the ``fp_kwargs`` and ``last_solution`` the report changes and every buffer
    (spectral-norm power-iteration vectors, BatchNorm statistics) on exit."""
    saved = {name: getattr(deq, name) for name in ("fp_kwargs", "last_solution")}
    buffers = [(buf, buf.detach().clone()) for buf in deq.buffers()]
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(deq, name, value)
        with torch.no_grad():
            for buf, copy in buffers:
                buf.copy_(copy)


def _check_arguments(deq: Any, backward_solver: Any) -> None:
    if not (isinstance(deq, nn.Module) and _is_deq_like(deq)):
        raise TypeError(
            f"stability_report: `deq` must be a deqkit.nn.DEQ, got {type(deq).__name__}."
        )
    if hasattr(deq, "splitting_map"):  # a MonotoneDEQ: its cell is an operator splitting
        raise TypeError(
            f"stability_report: {type(deq).__name__} is solved by an operator splitting whose "
            "iterate is not the layer's output, so the report's Jacobian at z* would be of "
            "the wrong map. Its convergence is guaranteed by the monotone parametrisation "
            "(m > 0); to inspect it, call dk.jacobian_spectral_norm on "
            "lambda z: torch.relu(layer.linear(z) + layer.U(x)), the map z = relu(W z + U x) "
            "whose fixed point the layer returns."
        )
    if backward_solver is not None and not isinstance(backward_solver, AbstractLinearSolver):
        raise TypeError(
            "stability_report: `backward_solver` must be a deqkit linear solver such as "
            f"dk.GMRES(), got {type(backward_solver).__name__}."
        )


def _solve(deq: DEQLike, inputs: tuple[Any, ...], z0: Any) -> tuple[Tensor, Any]:
    """``(z*, solution)`` of the layer's forward solve (with a residual trace)."""
    deq.fp_kwargs = {**deq.fp_kwargs, "trace": True}
    with torch.enable_grad():
        z_star = deq(*inputs, z0=z0)
    sol = deq.last_solution
    if not isinstance(z_star, Tensor):
        raise TypeError(
            "stability_report: the DEQ state must be a single tensor (B, ...); got "
            f"{type(z_star).__name__}."
        )
    return z_star, sol


def _backward(deq: DEQLike, inputs: tuple[Any, ...], z_star: Tensor, sol: Any,
              loss_fn: Callable[[Any], Tensor]) -> bool:
    """Back-propagate ``loss_fn(z*)`` with ``torch.autograd.grad`` (every ``.grad`` field is
    left alone); whether an implicit backward solve ran."""
    targets = [p for p in deq.parameters() if p.requires_grad]
    targets += [x for x in inputs if isinstance(x, Tensor) and x.requires_grad]
    if not (z_star.requires_grad and targets):
        return False
    with torch.enable_grad():
        loss = loss_fn(z_star)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError("stability_report: `loss_fn(z*)` must return a scalar tensor.")
    torch.autograd.grad(loss, targets, allow_unused=True)
    return "converged" in sol.backward


def _jacobian_estimates(deq: DEQLike, inputs: tuple[Any, ...], z: Tensor,
                        krylov_dim: int) -> tuple[list[float], list[float]]:
    """Per-sample spectral radius and spectral norm of ``d cell / dz`` at ``z`` (a fixed
    random start: the global RNG is not touched)."""
    cell = deq.cell

    def f(zz: Tensor) -> Tensor:
        return cell(zz, *inputs)

    gen = torch.Generator(device=z.device)
    gen.manual_seed(0)
    with torch.no_grad(), parametrization_cache(cell):
        rho = jacobian_spectral_radius(f, z, krylov_dim=krylov_dim, generator=gen)
        norm = jacobian_spectral_norm(f, z, generator=gen)
    return _floats(rho), _floats(norm)


def _forward_fields(stats: dict[str, Any], batch: int) -> dict[str, Any]:
    """The report's per-sample forward fields from the solution's statistics."""
    nstep = [int(n) for n in stats["nstep"].tolist()]
    codes = [int(c) for c in stats["status"].tolist()]
    tr = stats["trace"].detach().double().cpu()
    stagnated = getattr(RESULTS, "stagnated", None)  # stalled / oscillating residual
    n_max = codes.count(RESULTS.max_steps_reached.code)
    return dict(
        nstep=nstep,
        status=[RESULTS.from_code(c).name for c in codes],
        abs_residual=_floats(stats["abs_residual"]),
        rel_residual=_floats(stats["rel_residual"]),
        trace=[_floats(tr[: min(nstep[b] + 1, tr.shape[0]), b]) for b in range(batch)],
        mean_nstep=sum(nstep) / batch,
        max_nstep=max(nstep),
        frac_max_steps=n_max / batch,
        n_max_steps=n_max,
        n_diverged=codes.count(RESULTS.diverged.code),
        n_nonfinite=codes.count(RESULTS.nonfinite.code),
        n_stagnated=codes.count(stagnated.code) if stagnated is not None else 0,
    )


def _backward_fields(backward: dict[str, Any] | None) -> dict[str, Any]:
    """The report's backward fields from ``sol.backward`` (``None``: the backward did not
    run)."""
    if backward is None:
        conv, nstep, res, nmatvec = [], [], [], 0
    else:
        conv = [bool(c) for c in backward["converged"].tolist()]
        nstep = [int(n) for n in backward["nstep"].tolist()]
        res, nmatvec = _floats(backward["residual"]), int(backward["nmatvec"])
    return dict(backward_converged=conv, backward_nstep=nstep, backward_residual=res,
                backward_nmatvec=nmatvec, n_backward_failed=conv.count(False))


def _jacobian_fields(rho: list[float], norm: list[float]) -> dict[str, Any]:
    """Spectral radius/norm per sample, the condition estimates, and their aggregates."""
    cond_est = [1.0 / (1.0 - r) if r < 1 else math.inf for r in rho]
    cond_ub = [(1.0 + s) / (1.0 - s) if s < 1 else math.inf for s in norm]
    return dict(
        spectral_radius=rho, spectral_norm=norm, cond_estimate=cond_est,
        cond_upper_bound=cond_ub, rho_max=_stat(rho, "max"), rho_mean=_stat(rho, "mean"),
        norm_max=_stat(norm, "max"), norm_mean=_stat(norm, "mean"),
        cond_estimate_max=_stat(cond_est, "max"), cond_upper_bound_max=_stat(cond_ub, "max"),
    )


def _rho_warnings(rho: list[float], rho_max: float, threshold: float, batch: int) -> list[str]:
    if rho_max >= 1:
        n_exp = sum(r >= 1 for r in rho)
        return [
            f"rho(J) = {rho_max:.3g} >= 1 for {n_exp}/{batch} samples: the cell is not "
            "contractive at its equilibrium, the fixed point is locally unstable and the "
            f"backward system I - J may be singular; {_REMEDY}."
        ]
    if rho_max >= threshold:
        n_hi = sum(r >= threshold for r in rho)
        return [
            f"rho(J) = {rho_max:.3g} >= {threshold} for {n_hi}/{batch} samples: the "
            "backward system is ill-conditioned (cond(I - J) estimate "
            f"{1 / (1 - rho_max):.3g}) and the forward solve slow; {_REMEDY}."
        ]
    return []


def _warnings(r: dict[str, Any], threshold: float) -> list[str]:
    """Plain sentences, each with a remedy, for the problems in the report's fields ``r``."""
    batch, n_max, n_stag = r["batch_size"], r["n_max_steps"], r["n_stagnated"]
    n_div, n_nf, n_bfail = r["n_diverged"], r["n_nonfinite"], r["n_backward_failed"]
    msgs = _rho_warnings(r["spectral_radius"], r["rho_max"], threshold, batch)
    if n_max:
        msgs.append(
            f"{100 * n_max / batch:.0f}% of samples ({n_max}/{batch}) hit max_steps "
            f"({r['max_steps']}) without converging: increase max_steps, loosen the solver "
            f"tolerance, or make the cell more contractive ({_REMEDY})."
        )
    if n_stag:
        msgs.append(
            f"the forward residual stagnated or oscillated for {n_stag}/{batch} samples: try "
            "a different solver (dk.Broyden, a larger Anderson memory) or damping, or make the "
            f"cell more contractive ({_REMEDY})."
        )
    if n_div or n_nf:
        msgs.append(
            f"the forward solve diverged for {n_div} and produced non-finite values for "
            f"{n_nf} of {batch} samples: the cell is not contractive; {_REMEDY}, lower the "
            "learning rate, or use a damped solver (dk.Picard(damping=0.5))."
        )
    if n_bfail:
        msgs.append(
            f"the backward solve did not converge for {n_bfail} samples ({n_bfail}/{batch}; "
            f"worst residual {_stat(r['backward_residual'], 'max'):.3g}): the gradient is "
            "inexact; increase the linear solver's max_steps, use dk.GMRES, add a phantom "
            "fallback (dk.ImplicitAdjoint(fallback=dk.PhantomAdjoint())), or " + _REMEDY + "."
        )
    return msgs


def stability_report(
    deq: DEQLike,
    *inputs: Any,
    loss_fn: Callable[[Any], Tensor] | None = None,
    backward_solver: AbstractLinearSolver | None = None,
    rho_threshold: float = 0.95,
    krylov_dim: int = 30,
    z0: Any = None,
) -> StabilityReport:
    r"""Diagnose the stability of a DEQ layer on one batch, in one call.

    Runs ``deq(*inputs)`` in the module's current mode (training/eval, hence its
    ``max_steps``/``eval_max_steps``) with ``trace=True``, ``throw=False`` and the adjoint
    ``dk.ImplicitAdjoint(backward_solver or dk.GMRES(), on_failure="ignore")``; then

    * at the equilibrium ``z*`` computes per sample :math:`\rho(J)` and :math:`\|J\|_2` of
      ``f = lambda z: deq.cell(z, *inputs)`` with :func:`deqkit.jacobian_spectral_radius`
      and :func:`deqkit.jacobian_spectral_norm` (fixed random start, the global RNG is not
      touched);
    * reports the conditioning of the backward system :math:`I - J`:
      ``cond_estimate = 1/(1 - rho)`` (an estimate, not a bound) and
      ``cond_upper_bound = (1 + ||J||)/(1 - ||J||)`` (a rigorous upper bound when
      :math:`\|J\|_2 < 1`, else ``inf``);
    * back-propagates ``loss_fn(z*)`` (default: sum of squares) with
      :func:`torch.autograd.grad` on the parameters and inputs that require grad -- so no
      ``.grad`` field is touched -- and reads the backward solve's per-sample convergence
      from ``sol.backward``.

    The adjoint and ``throw=False`` are set with :meth:`deqkit.nn.DEQ.overrides`; the layer's
    ``fp_kwargs`` and ``last_solution`` and all its buffers (e.g. spectral-norm power-iteration
    vectors) are restored afterwards.  The state
    must be a single tensor of shape ``(B, ...)``.

    Args:
        deq: the :class:`deqkit.nn.DEQ` layer.
        *inputs: its inputs (as for ``deq(*inputs)``).
        loss_fn: scalar loss of ``z*`` whose gradient drives the backward solve.
            Default: ``z*.square().sum()``.
        backward_solver: linear solver of the implicit backward pass. Default: ``dk.GMRES()``.
        rho_threshold: warn when some sample's :math:`\rho(J)` reaches it. Default: 0.95.
        krylov_dim: Arnoldi dimension for :math:`\rho(J)` (exact when ``D <= krylov_dim``).
        z0: optional initial guess passed to the layer.

    Returns:
        A :class:`StabilityReport`; ``print(report)`` for a summary, ``report.warnings`` for
        the problems found, ``report.to_dict()`` for JSON.

    References: Bai, Koltun, Kolter (2021), "Stabilizing Equilibrium Models by Jacobian
        Regularization" (spectral radius and Jacobian norm as instability signals); Arnoldi
        (1951) and power iteration for the estimates.

    Example:
        >>> import torch, deqkit as dk
        >>> from deqkit.stability import stability_report
        >>> class Cell(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(8, 8)
        ...     def forward(self, z, x):
        ...         return torch.tanh(0.5 * self.lin(z) + x)
        >>> _ = torch.manual_seed(0)
        >>> deq = dk.nn.DEQ(Cell(), solver=dk.Anderson(rtol=1e-6))
        >>> rep = stability_report(deq, torch.randn(4, 8))
        >>> rep.result, rep.warnings, rep.rho_max < 0.95, all(rep.backward_converged)
        ('successful', [], True, True)
        >>> print(rep)  # doctest: +ELLIPSIS
        DEQ stability report (4 samples, training mode, solver Anderson(...), max_steps 30)
        ...
    """
    _check_arguments(deq, backward_solver)
    lin_solver = backward_solver if backward_solver is not None else GMRES()
    training = bool(deq.training)
    adjoint = ImplicitAdjoint(lin_solver, on_failure="ignore")
    with _preserved(deq), deq.overrides(adjoint=adjoint, throw=False):
        z_star, sol = _solve(deq, inputs, z0)
        backward_ran = _backward(deq, inputs, z_star, sol, loss_fn or _default_loss)
        rho, norm = _jacobian_estimates(deq, inputs, z_star.detach(), krylov_dim)
    fields: dict[str, Any] = dict(
        batch_size=int(z_star.shape[0]),
        training=training,
        max_steps=int(deq.max_steps if training else deq.eval_max_steps),
        solver=repr(deq.solver),
        result=sol.result.name,
        backward_ran=backward_ran,
        backward_solver=repr(lin_solver),
        rho_threshold=float(rho_threshold),
        **_forward_fields(sol.stats, int(z_star.shape[0])),
        **_backward_fields(sol.backward if backward_ran else None),
        **_jacobian_fields(rho, norm),
    )
    return StabilityReport(**fields, warnings=_warnings(fields, rho_threshold))
