"""Deployment: DEQ forward passes with a fixed number of solver steps (export-friendly).

:func:`export_fixed_steps` turns a :class:`deqkit.nn.DEQ` layer, or any model containing such
layers (e.g. :class:`deqkit.zoo.DEQMLP`, :class:`deqkit.zoo.ConvDEQ`), into an ``nn.Module``
whose solves run exactly ``steps`` updates of plain (damped) iteration or of a graph-friendly
Anderson acceleration: no stopping test, no data-dependent control flow, no host
synchronisation, no batch compaction. The result can be traced by :func:`torch.export.export`
and :func:`torch.onnx.export`. :func:`residual_at` reports the relative residual
:math:`\\|f(z)-z\\| / \\|f(z)\\|` reached after ``steps`` updates, to choose ``steps``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_float, check_int
from .._fixed_point import warn_deprecated
from .._flatten import flatten, make_layout, unflatten
from ..solvers._base import AbstractFixedPointSolver
from ..solvers.anderson import Anderson, anderson_weights
from ..solvers.fixed import FixedSteps
from ..solvers.picard import Picard
from ..stability.parametrizations import parametrization_cache
from ._deq import DEQ

__all__ = ["FixedStepDEQ", "FixedStepModel", "export_fixed_steps", "residual_at"]

#: A fixed-step solve runs Picard or Anderson (optionally wrapped in FixedSteps).
FixedStepSolver = Picard | Anderson | FixedSteps

_NAMES = ("picard", "anderson")
#: the defaults of the deprecated keyword arguments (``regularisation`` is larger than
#: Anderson's own default, for float32 elimination)
_LEGACY = {"m": 5, "beta": 1.0, "regularisation": 1e-6}


def _legacy_solver(owner: str, name: str | None, options: dict[str, Any]) -> Picard | Anderson:
    """The solver object meant by a deprecated name (``None``: not given, Picard) and keyword
    arguments."""
    solver = "picard" if name is None else check_choice(owner, "solver", name, _NAMES)
    opts = {**_LEGACY, **options}
    check_int(owner, "m", opts["m"])
    check_float(owner, "beta", opts["beta"], gt=0, le=1)
    check_float(owner, "regularisation", opts["regularisation"], gt=0, finite=False)
    if solver == "anderson":
        obj: Picard | Anderson = Anderson(m=opts["m"], beta=float(opts["beta"]),
                                          regularisation=float(opts["regularisation"]))
        text = (f"dk.Anderson(m={obj.m}, beta={obj.beta}, "
                f"regularisation={obj.regularisation})")
    else:
        obj = Picard(damping=float(opts["beta"]))
        text = "dk.Picard()" if obj.damping == 1.0 else f"dk.Picard(damping={obj.damping})"
    given = ", ".join([f"solver={name!r}"] * (name is not None)
                      + [f"{k}={v!r}" for k, v in options.items()])
    warn_deprecated(
        f"{owner}({given}) is deprecated and will be removed in the next release; pass the "
        f"solver object solver={text} instead."
    )
    return obj


def fixed_step_solver(owner: str, solver: Any, options: dict[str, Any]) -> Picard | Anderson:
    """The Picard or Anderson object whose steps a fixed-step solve runs.

    ``solver`` is ``dk.Picard(damping=...)``, ``dk.Anderson(m=..., beta=...,
    regularisation=...)`` or either in ``dk.FixedSteps`` (tolerances are not used); ``None``
    is ``dk.Picard()``. Backward compatibility: the names ``"picard"``/``"anderson"`` and the
    keyword arguments ``m``, ``beta``, ``regularisation`` (``options``, the ones given) still
    work with a ``DeprecationWarning`` naming the object to pass.
    """
    if isinstance(solver, str) or (solver is None and options):
        return _legacy_solver(owner, solver, options)
    if options:
        raise TypeError(
            f"{owner}: {sorted(options)} are fields of the solver object; set them there, "
            "e.g. solver=dk.Anderson(m=5, beta=1.0, regularisation=1e-6)."
        )
    if solver is None:
        return Picard()
    if isinstance(solver, FixedSteps):
        solver = solver.solver
    if not isinstance(solver, (Picard, Anderson)):
        got = solver if isinstance(solver, AbstractFixedPointSolver) else type(solver).__name__
        raise TypeError(
            f"{owner}: `solver` must be dk.Picard(...) or dk.Anderson(...) (a fixed number of "
            f"their steps exports to a static graph), got {got}."
        )
    return solver


def _spd_solve_ones(A: Tensor) -> Tensor:
    """``A^{-1} 1`` for a batch ``(B, n, n)`` of symmetric positive definite matrices.

    Gaussian elimination without pivoting (safe for SPD), unrolled over the static ``n``: only
    slicing and elementwise ops, so it exports to ONNX (which has no linear-solve operator).
    ``A`` is first divided by its mean diagonal (the weights do not depend on the scale), which
    keeps float32 elimination away from overflow and underflow.
    """
    n = A.shape[-1]
    A = A / (A.diagonal(dim1=1, dim2=2).mean(dim=1) + torch.finfo(A.dtype).tiny)[:, None, None]
    rows = [
        torch.cat((A[:, i], torch.ones_like(A[:, i, :1])), dim=1) for i in range(n)
    ]  # augmented rows (B, n + 1)
    for j in range(n):
        rows[j] = rows[j] / rows[j][:, j : j + 1]
        for i in range(j + 1, n):
            rows[i] = rows[i] - rows[i][:, j : j + 1] * rows[j]
    y: list[Tensor] = [A[:, 0, 0]] * n
    for i in reversed(range(n)):
        yi = rows[i][:, n]
        for j in range(i + 1, n):
            yi = yi - rows[i][:, j] * y[j]
        y[i] = yi
    return torch.stack(y, dim=1)


class FixedStepDEQ(nn.Module):
    r"""A :class:`deqkit.nn.DEQ` evaluated with exactly ``steps`` solver updates.

    Same call signature as the layer it wraps (``layer(*inputs, z0=None)``) and the same
    parameters (shared, not copied). The state is flattened to ``(B, D)`` in float32 at least,
    as in :func:`deqkit.fixed_point`, and cast back to the cell's dtype for every cell call.
    ``steps`` is the number of cell evaluations in the graph; the output is the last iterate
    :math:`z_K`.

    * ``dk.Picard(damping=λ)``: :math:`z_{k+1} = (1-\lambda) z_k + \lambda f(z_k)`.
    * ``dk.Anderson(m, beta, regularisation)``: type-II Anderson with memory ``m`` over Python
      lists of past iterates (static shapes), mixing weights from the trace-normalised,
      Tikhonov-regularised Gram system :math:`(\hat H + \mu I)\,y = \mathbf 1`,
      :math:`\alpha = y / \mathbf 1^\top y` (:math:`\mu` = ``regularisation``), solved by
      unrolled elimination; a non-finite :math:`\alpha` falls back to a plain step with
      ``torch.where`` (no host sync). In float32 use a ``regularisation`` of about 1e-6 (the
      Gram matrix is normalised to unit mean diagonal).

    The solver's ``rtol``/``atol`` are not used (there is no stopping test).

    Args:
        deq: the :class:`deqkit.nn.DEQ` layer (its ``cell`` and ``init_state`` are used).
        steps: number of updates (cell evaluations), ``>= 1``.
        solver: ``dk.Picard(...)`` or ``dk.Anderson(...)``, also inside ``dk.FixedSteps``.
            Default: ``dk.Picard()``. The names ``"picard"``/``"anderson"`` and the keyword
            arguments ``m``, ``beta``, ``regularisation`` are deprecated
            (``DeprecationWarning``; ``"anderson"`` meant
            ``dk.Anderson(m=5, beta=1.0, regularisation=1e-6)``).
        track_residual: also evaluate the cell once more at :math:`z_K` and store the
            per-sample relative residual in ``last_residual`` (eager use only, not for
            export). Default: False.

    Attributes:
        solver: the Picard or Anderson object whose steps run.
        last_residual: ``(B,)`` float32 tensor, :math:`\|f(z_K)-z_K\| / \|f(z_K)\|` of the latest
            call made with ``track_residual=True`` (else ``None``).

    Example:
        >>> import torch, deqkit as dk
        >>> lin = torch.nn.Linear(4, 4)
        >>> layer = dk.nn.DEQ(lambda z, x: torch.tanh(0.3 * lin(z) + x))
        >>> fixed = FixedStepDEQ(layer, steps=12, solver=dk.Anderson(regularisation=1e-6))
        >>> fixed(torch.randn(2, 4)).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        deq: DEQ,
        steps: int,
        solver: FixedStepSolver | str | None = None,
        *,
        track_residual: bool = False,
        **options: Any,
    ) -> None:
        super().__init__()
        if not isinstance(deq, DEQ):
            raise TypeError(f"FixedStepDEQ: `deq` must be a dk.nn.DEQ, got {type(deq).__name__}.")
        if type(deq).forward is not DEQ.forward:
            raise TypeError(
                f"FixedStepDEQ: {type(deq).__name__} computes its cell's inputs in its own "
                "forward (e.g. MonotoneDEQ's splitting map); only layers that call their cell "
                "with the layer's inputs (dk.nn.DEQ.forward) can be exported."
            )
        _check_options("FixedStepDEQ", options)
        check_int("FixedStepDEQ", "steps", steps)
        self.deq = deq
        self.training = deq.training  # not .train(): that would recurse into the shared cell
        self.steps = steps
        self.solver = fixed_step_solver("FixedStepDEQ", solver, options)
        self.track_residual = track_residual
        self.last_residual: Tensor | None = None

    @property
    def cell(self) -> Any:
        return self.deq.cell

    def _anderson_weights(self, G: list[Tensor], regularisation: float) -> Tensor:
        Gs = torch.stack(G, dim=1)  # (B, n, D), oldest first
        H = torch.bmm(Gs, Gs.transpose(1, 2))  # (B, n, n)
        # the shared weights, with an elimination that exports to ONNX (no linear-solve op)
        return anderson_weights(H, len(G) - 1, regularisation, solve=_spd_solve_ones,
                                dtype=None).squeeze(1)

    def _solve(self, fn: Any, z: Tensor) -> Tensor:
        solver = self.solver
        if isinstance(solver, Picard):
            beta = solver.damping
            for _ in range(self.steps):
                fz = fn(z)
                z = fz if beta == 1.0 else torch.lerp(z, fz, beta)
            return z
        m, beta = solver.m, solver.beta
        F: list[Tensor] = []
        G: list[Tensor] = []
        for _ in range(self.steps):
            fz = fn(z)
            F.append(fz)
            G.append(fz - z)
            F, G = F[-m:], G[-m:]
            if len(F) == 1:
                z = fz if beta == 1.0 else torch.lerp(z, fz, beta)
                continue
            alpha = self._anderson_weights(G, solver.regularisation).unsqueeze(1)  # (B, 1, n)
            z = torch.bmm(alpha, torch.stack(F, dim=1)).squeeze(1)
            if beta != 1.0:
                z = z - (1.0 - beta) * torch.bmm(alpha, torch.stack(G, dim=1)).squeeze(1)
        return z

    def forward(self, *inputs: Any, z0: Any = None) -> Any:
        if z0 is None:
            z0 = self.deq.init_state(*inputs)
        layout = make_layout(z0)
        cell = self.deq.cell

        def fn(zf: Tensor) -> Tensor:
            return flatten(layout, cell(unflatten(layout, zf), *inputs))

        cm = parametrization_cache(cell)
        with cm:
            zf = self._solve(fn, flatten(layout, z0))
            if self.track_residual:
                with torch.no_grad():
                    fz = fn(zf)
                    fz, zd = fz.float(), zf.detach().float()
                    absr = torch.linalg.vector_norm(fz - zd, dim=1)
                    fnorm = torch.linalg.vector_norm(fz, dim=1)
                    self.last_residual = absr / fnorm.clamp_min(torch.finfo(absr.dtype).tiny)
        return unflatten(layout, zf)

    def extra_repr(self) -> str:
        return f"steps={self.steps}, solver={self.solver!r}"


def _check_options(owner: str, options: dict[str, Any]) -> None:
    """Only the deprecated ``m``, ``beta``, ``regularisation`` may be passed by keyword."""
    unknown = sorted(set(options) - set(_LEGACY))
    if unknown:
        raise TypeError(f"{owner} got unknown keyword argument(s) {unknown}.")


def _swap_deqs(module: nn.Module, make: Any, found: list[FixedStepDEQ]) -> nn.Module:
    """A shallow copy of ``module`` with every ``DEQ`` submodule replaced by ``make(deq)``.

    Modules on the path to a DEQ are shallow-copied (own ``_modules`` dict, shared parameters
    and buffers); the others are reused, so the original model is left untouched.
    """
    if isinstance(module, DEQ):
        fixed = make(module)
        found.append(fixed)
        return fixed
    if not any(isinstance(m, DEQ) for m in module.modules()):
        return module
    new = copy.copy(module)
    new._modules = dict(module._modules)
    for name, child in module._modules.items():
        if child is not None:
            new._modules[name] = _swap_deqs(child, make, found)
    return new


class FixedStepModel(nn.Module):
    """A model whose DEQ layers are replaced by :class:`FixedStepDEQ` (see
    :func:`export_fixed_steps`, which builds it).

    ``forward`` has the signature of the wrapped model. Parameters and buffers are shared with
    the original model.

    Args:
        model: the original model, or a :class:`deqkit.nn.DEQ` layer.
        steps: number of updates per solve, ``>= 1``.
        solver: ``dk.Picard(...)`` or ``dk.Anderson(...)`` (see :class:`FixedStepDEQ`).
            Default: ``dk.Picard()``.
        **options: the deprecated ``m``, ``beta``, ``regularisation`` of
            :class:`FixedStepDEQ`.

    Attributes:
        module: the model with swapped layers (a :class:`FixedStepDEQ` if ``model`` is a DEQ).
        layers: the :class:`FixedStepDEQ` layers, in ``named_modules`` order.
        example_residual: max relative residual on ``example_inputs`` when
            :func:`export_fixed_steps` was given them, else ``None``.

    Example:
        >>> import torch, deqkit as dk
        >>> model = dk.zoo.DEQMLP((6,), 3, width=8).eval()
        >>> fixed = dk.FixedStepModel(model, steps=30)
        >>> x = torch.randn(2, 6)
        >>> len(fixed.layers), torch.allclose(fixed(x), model(x), atol=1e-4)
        (1, True)
    """

    def __init__(self, model: nn.Module, steps: int, solver: FixedStepSolver | str | None = None,
                 **options: Any) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"export_fixed_steps: expected an nn.Module, got {type(model).__name__}."
            )
        _check_options("FixedStepModel", options)
        check_int("FixedStepModel", "steps", steps)
        solver = fixed_step_solver("FixedStepModel", solver, options)  # once, not per layer
        found: list[FixedStepDEQ] = []
        self.module = _swap_deqs(model, lambda deq: FixedStepDEQ(deq, steps, solver), found)
        if not found:
            raise ValueError(
                f"export_fixed_steps: {type(model).__name__} contains no dk.nn.DEQ layer."
            )
        self.training = model.training  # not .train(): it would recurse into shared modules
        self.layers = found  # plain list: the layers are already registered under `module`
        self.steps = steps
        self.solver = solver
        self.example_residual: float | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def residual(self, *inputs: Any, **kwargs: Any) -> Tensor:
        """Per-sample relative residual :math:`\\|f(z_K)-z_K\\| / \\|f(z_K)\\|` on ``inputs``.

        Runs the model once (no grad) with one extra cell call per DEQ layer; with several
        DEQ layers the elementwise maximum over layers is returned. Returns a ``(B,)`` float32
        tensor.
        """
        for layer in self.layers:
            layer.track_residual, layer.last_residual = True, None
        try:
            self.module(*inputs, **kwargs)
        finally:
            for layer in self.layers:
                layer.track_residual = False
        res = [layer.last_residual for layer in self.layers if layer.last_residual is not None]
        if not res:
            raise RuntimeError("residual: no DEQ layer was called by the model's forward.")
        return torch.stack(res).amax(dim=0)


def export_fixed_steps(
    model_or_deq: nn.Module,
    steps: int,
    solver: FixedStepSolver | str | None = None,
    example_inputs: tuple[Any, ...] | None = None,
    **options: Any,
) -> FixedStepModel:
    r"""An export-friendly copy of a DEQ model whose solves run exactly ``steps`` updates.

    Every :class:`deqkit.nn.DEQ` inside ``model_or_deq`` (or the layer itself) is replaced,
    in a shallow copy that shares all parameters and buffers, by a :class:`FixedStepDEQ`:
    ``steps`` cell evaluations of plain/damped iteration (``dk.Picard``) or of Anderson
    acceleration with a fixed memory (``dk.Anderson``), with no stopping test, host
    synchronisation or batch compaction, so that :func:`torch.export.export` and
    :func:`torch.onnx.export` can trace it. The original model is not modified. Put the model
    in eval mode first (training-mode spectral normalisation and dropout mutate state).

    Whether ``steps`` suffices is the caller's choice: :meth:`FixedStepModel.residual` (or
    :func:`residual_at`) gives :math:`\|f(z_K)-z_K\| / \|f(z_K)\|` per sample; with
    ``example_inputs`` its maximum is stored in ``example_residual``. For a contraction with
    Lipschitz constant :math:`L` the error in :math:`z` is at most
    :math:`\text{residual}\cdot\|f(z_K)\|/(1-L)`.

    Args:
        model_or_deq: a :class:`deqkit.nn.DEQ` or a module containing some.
        steps: number of updates per solve (cell evaluations), ``>= 1``.
        solver: ``dk.Picard(...)`` or ``dk.Anderson(...)`` (see :class:`FixedStepDEQ`).
            Default: ``dk.Picard()``.
        example_inputs: a tuple of inputs to check the module on and to record
            ``example_residual``. Default: None.
        **options: the deprecated ``m``, ``beta``, ``regularisation`` (set them on the solver
            object instead).

    Returns:
        A :class:`FixedStepModel` with the call signature of ``model_or_deq``.

    Raises:
        ValueError, TypeError: invalid arguments, or no DEQ layer in the model.

    Reference: a fixed number of solver steps as the inference-time DEQ ("fixed-depth"
        evaluation), cf. Geng et al. (2021), "On Training Implicit Models" and Bai, Kolter,
        Koltun (2019), "Deep Equilibrium Models".

    Example:
        >>> import torch, deqkit as dk
        >>> model = dk.zoo.DEQMLP((6,), 3, width=8).eval()
        >>> x = torch.randn(4, 6)
        >>> anderson = dk.Anderson(m=5, regularisation=1e-6)
        >>> fixed = export_fixed_steps(model, steps=20, solver=anderson, example_inputs=(x,))
        >>> fixed.example_residual < 1e-4
        True
        >>> ep = torch.export.export(fixed, (x,))
        >>> torch.allclose(ep.module()(x), model(x), atol=1e-4)
        True
    """
    _check_options("export_fixed_steps", options)
    solver = fixed_step_solver("export_fixed_steps", solver, options)
    fixed = FixedStepModel(model_or_deq, steps, solver)
    if example_inputs is not None:
        if not isinstance(example_inputs, tuple):
            raise TypeError(
                "export_fixed_steps: `example_inputs` must be a tuple of inputs, got "
                f"{type(example_inputs).__name__}; e.g. example_inputs=(x,)."
            )
        fixed.example_residual = float(fixed.residual(*example_inputs).max())
    return fixed


def residual_at(
    model_or_deq: nn.Module,
    steps: int,
    inputs: tuple[Any, ...],
    solver: FixedStepSolver | str | None = None,
    **options: Any,
) -> Tensor:
    r"""Per-sample relative residual :math:`\|f(z_K)-z_K\| / \|f(z_K)\|` after ``steps`` updates.

    Args:
        model_or_deq: a :class:`deqkit.nn.DEQ` or a module containing some.
        steps: number of updates, ``>= 1``.
        inputs: tuple of inputs of ``model_or_deq``.
        solver: ``dk.Picard(...)`` or ``dk.Anderson(...)``. Default: ``dk.Picard()``.
        **options: the deprecated ``m``, ``beta``, ``regularisation``.

    Returns:
        A ``(B,)`` float32 tensor (max over DEQ layers when there are several).

    Example:
        >>> import torch, deqkit as dk
        >>> model = dk.zoo.DEQMLP((6,), 3, width=8).eval()
        >>> x = torch.randn(4, 6)
        >>> r5, r20 = (float(residual_at(model, k, (x,)).max()) for k in (5, 20))
        >>> r20 < r5
        True
    """
    _check_options("residual_at", options)
    solver = fixed_step_solver("residual_at", solver, options)
    return export_fixed_steps(model_or_deq, steps, solver).residual(*inputs)
