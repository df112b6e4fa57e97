"""``DEQ``: an ``nn.Module`` over :func:`deqkit.fixed_point`."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._checks import check_bool, check_int
from .._fixed_point import fixed_point, resolve_adjoint, resolve_solver
from .._flatten import StateShapeError, flatten, make_layout, unflatten
from .._solution import RESULTS, Solution
from ..adjoint._base import AbstractAdjoint
from ..solvers._base import AbstractFixedPointSolver
from ..stability.parametrizations import parametrization_cache
from ..stability.regularisers import jacobian_frobenius_reg
from ._cache import FixedPointCache
from ._dropout import VariationalDropout


class DEQWarning(RuntimeWarning):
    """A DEQ layer's forward solve produced non-finite values or diverged.

    Example:
        >>> import warnings, torch, deqkit as dk
        >>> layer = dk.nn.DEQ(lambda z, x: 3 * z + x, solver=dk.Picard(), max_steps=50)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = layer(torch.ones(2, 3))
        >>> caught[0].category.__name__, layer.last_solution.result
        ('DEQWarning', <RESULTS.diverged: 3>)
    """


def _positional_masks(module: nn.Module) -> bool:
    """Whether the cell draws per-sample dropout masks by batch position (slicing the batch
    would misalign them; the samples stay independent)."""
    return any(isinstance(m, VariationalDropout) and m.training and m.p > 0
               for m in module.modules())


def _batch_statistics(module: nn.Module) -> bool:
    """Whether the cell couples the samples through batch statistics (BatchNorm in training
    mode): the batch is then one problem, not B independent ones."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
               for m in module.modules())


def _lift(state: Any) -> Any:
    """``(B, ...)`` -> ``(1, B, ...)`` for a tensor or each part of a tuple."""
    if isinstance(state, (tuple, list)):
        return tuple(p.unsqueeze(0) for p in state)
    return state.unsqueeze(0)


def _lower(state: Any) -> Any:
    if isinstance(state, (tuple, list)):
        return tuple(p.squeeze(0) for p in state)
    return state.squeeze(0)


def _spread(sol: Solution, batch: int) -> Solution:
    """A solve of the lifted ``(1, B, ...)`` problem reported per sample: every sample gets
    the batch's statistics (``nfev_samples`` counts B samples per evaluation)."""
    stats = {k: (v.expand(batch) if isinstance(v, torch.Tensor) and v.shape == (1,) else v)
             for k, v in sol.stats.items()}
    if "trace" in stats:
        stats["trace"] = stats["trace"].expand(-1, batch)
    stats["nfev_samples"] = stats["nfev"] * batch
    return Solution(value=_lower(sol.value), result=sol.result, stats=stats,
                    backward=sol.backward)


class DEQ(nn.Module):
    r"""A deep equilibrium layer: returns :math:`z^\star = \text{cell}(z^\star, x)`.

    ``cell(z, *inputs)`` computes the next state from the current one and the (injected)
    inputs; the layer finds its fixed point with ``solver`` and differentiates through it with
    ``adjoint`` (implicit by default). Inputs are passed to the solver as per-sample ``args``,
    so samples that converge stop costing compute (``compact=True``). Parametrized weights of
    the cell (e.g. spectral normalisation) are computed once per forward call, not once per
    iteration. A cell with :class:`~deqkit.nn.VariationalDropout` in training mode is solved
    without compaction (its per-sample masks are drawn by batch position); call
    :func:`~deqkit.nn.reset_dropout` before each forward to draw new masks. A cell with
    BatchNorm in training mode couples the samples through the batch statistics, so the batch
    is solved as one problem (state ``(1, B, ...)``: one stopping test on the norm over the
    whole batch, one set of Anderson weights, the implicit gradient of the coupled system);
    every sample then reports the batch's statistics in ``last_solution``. To run the layer
    with other solver settings for a while (a larger evaluation budget, a tighter solver, a
    learned initialiser), use ``with layer.overrides(...)`` (:meth:`overrides`) rather than
    setting the attributes.

    Args:
        cell: an ``nn.Module`` (or callable) ``cell(z, *inputs) -> z_next``.
        solver: forward solver (a solver object; names such as ``"anderson"`` are deprecated).
            Default: ``Anderson()``.
        adjoint: gradient. Default: ``ImplicitAdjoint()``.
        max_steps: step budget in training mode. Default: 30.
        eval_max_steps: step budget in eval mode (often larger). Default: ``max_steps``.
        throw: raise on failed solves. Default: False (read ``last_solution``); non-finite
            or diverged solves emit a :class:`DEQWarning`.
        compact: drop converged samples from the working batch. Default: True.
        **kwargs: further keyword arguments of :func:`deqkit.fixed_point` (``trace``,
            ``compact_ratio``, ``divergence_ratio``, ``patience``); unknown names raise
            TypeError.

    Attributes:
        last_solution: the :class:`~deqkit.Solution` of the latest forward call.

    Reference: Bai, Kolter, Koltun (2019), "Deep Equilibrium Models", NeurIPS.

    Example:
        >>> import torch, deqkit as dk
        >>> class Cell(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(8, 8)
        ...     def forward(self, z, x):
        ...         return torch.tanh(0.5 * self.lin(z) + x)
        >>> layer = dk.nn.DEQ(Cell(), solver=dk.Anderson(rtol=1e-6))
        >>> z = layer(torch.randn(4, 8))  # state shaped like the input by default
        >>> layer.last_solution.result
        <RESULTS.successful: 0>
    """

    _FP_KWARGS = ("trace", "compact_ratio", "divergence_ratio", "patience")

    def __init__(
        self,
        cell: Any,
        solver: AbstractFixedPointSolver | str | None = None,
        adjoint: AbstractAdjoint | None = None,
        max_steps: int = 30,
        eval_max_steps: int | None = None,
        throw: bool = False,
        compact: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if not callable(cell):
            raise TypeError(f"DEQ: `cell` must be callable, got {type(cell).__name__}.")
        unknown = sorted(set(kwargs) - set(self._FP_KWARGS))
        if unknown:
            raise TypeError(
                f"DEQ got unknown keyword argument(s) {unknown}; allowed: "
                f"{list(self._FP_KWARGS)} besides solver, adjoint, max_steps, eval_max_steps, "
                "throw, compact."
            )
        owner = type(self).__name__
        self.cell = cell
        self.solver = _check_field(owner, "solver", solver)
        self.adjoint = _check_field(owner, "adjoint", adjoint)
        self.max_steps = _check_field(owner, "max_steps", max_steps)
        eval_max_steps = _check_field(owner, "eval_max_steps", eval_max_steps, none=True)
        self.eval_max_steps = eval_max_steps if eval_max_steps is not None else max_steps
        self.throw = _check_field(owner, "throw", throw)
        self.compact = compact
        self.fp_kwargs = kwargs
        self.last_solution: Solution | None = None
        self._last_call: tuple[tuple[Any, ...], Any] | None = None
        self._warm: tuple[Any, torch.Tensor, Any] | None = None

    def init_state(self, *inputs: Any) -> Any:
        """Initial guess: ``cell.init_state(*inputs)`` if the cell defines it, else zeros
        shaped like the first input."""
        if hasattr(self.cell, "init_state"):
            return self.cell.init_state(*inputs)
        x = inputs[0]
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                "DEQ: cannot build a default initial state from a non-tensor input; define "
                "`init_state(*inputs)` on the cell or pass z0=..."
            )
        return torch.zeros_like(x)

    @contextlib.contextmanager
    def overrides(
        self,
        *,
        solver: AbstractFixedPointSolver | str | None = None,
        adjoint: AbstractAdjoint | None = None,
        max_steps: int | None = None,
        eval_max_steps: int | None = None,
        init_state: Any = None,
        throw: bool | None = None,
    ) -> Iterator[DEQ]:
        """This layer with these solver settings, for the ``with`` block.

        Sets each given (non-``None``) field, validated as the constructor validates it, and
        restores the previous values on exit, also when the block raises; blocks nest (the
        inner one wins, and restores the outer one's values). Yields the layer itself.

        The fields are set on the instance without ``nn.Module`` registration: a solver that
        is itself an ``nn.Module`` (:class:`~deqkit.hyperdeq.HyperAnderson`) does not become a
        submodule, so ``parameters()`` and ``state_dict()`` are the same inside the block.

        Args:
            solver: forward solver (keyword only, as all below).
            adjoint: gradient.
            max_steps: step budget in training mode (``eval_max_steps`` is not changed).
            eval_max_steps: step budget in eval mode.
            init_state: a callable ``init_state(*inputs) -> z0`` used in place of
                :meth:`init_state` (e.g. a learned initialiser).
            throw: raise on failed solves.

        Example:
            >>> import torch, deqkit as dk
            >>> layer = dk.nn.DEQ(lambda z, x: 0.5 * z + x, solver=dk.Picard(), max_steps=30)
            >>> with layer.overrides(solver=dk.FixedSteps(dk.Picard()), max_steps=3) as deq:
            ...     _ = deq(torch.ones(2, 3))
            ...     int(deq.last_solution.stats["nstep"].max())
            3
            >>> layer.max_steps, type(layer.solver).__name__
            (30, 'Picard')
        """
        given = {"solver": solver, "adjoint": adjoint, "max_steps": max_steps,
                 "eval_max_steps": eval_max_steps, "init_state": init_state, "throw": throw}
        owner = type(self).__name__
        new = {k: _check_field(owner, k, v) for k, v in given.items() if v is not None}
        # the instance __dict__ shadows nn.Module's _modules/_parameters: nothing registered
        saved = {k: (k in self.__dict__, self.__dict__.get(k)) for k in new}
        self.__dict__.update(new)
        try:
            yield self
        finally:
            for k, (had, old) in saved.items():
                if had:
                    self.__dict__[k] = old
                else:
                    self.__dict__.pop(k, None)

    @contextlib.contextmanager
    def warm_start(self, cache: Any, ids: torch.Tensor, *, adjoint_cache: Any = None) -> Any:
        """Within the block, calls without ``z0`` start each sample ``ids[b]`` from its
        equilibrium stored in ``cache`` (a :class:`~deqkit.nn.FixedPointCache`; the default
        initial state where none is stored) and store their result back (converged samples
        only, with the cache's default), so that a model calling this layer internally can
        warm-start across epochs without changing its ``forward``.

        ``adjoint_cache`` (another :class:`~deqkit.nn.FixedPointCache`, or None) does the
        same for the implicit backward solve: each sample's adjoint vector is stored and
        the next backward solve of that sample starts from it (see
        :func:`~deqkit.fixed_point`'s ``adjoint_cache``; needs
        :class:`~deqkit.ImplicitAdjoint`). ``cache`` may be None to warm-start only the
        backward.

        Example:
            >>> import torch, deqkit as dk
            >>> layer = dk.nn.DEQ(lambda z, x: 0.5 * z + x,
            ...                   solver=dk.Picard(rtol=1e-10, atol=0), max_steps=100)
            >>> cache, x, ids = dk.nn.FixedPointCache(8), torch.ones(2, 3), torch.tensor([4, 6])
            >>> with layer.warm_start(cache, ids):
            ...     _ = layer(x)  # cold: nothing stored yet
            >>> with layer.warm_start(cache, ids):
            ...     z = layer(x)  # starts at the stored equilibrium
            >>> int(layer.last_solution.stats["nstep"].max()), torch.allclose(z, 2 * x)
            (0, True)
        """
        for name, value in (("cache", cache), ("adjoint_cache", adjoint_cache)):
            if value is not None and not isinstance(value, FixedPointCache):
                raise TypeError(
                    f"DEQ.warm_start: `{name}` must be a dk.nn.FixedPointCache or None, got "
                    f"{type(value).__name__}."
                )
        if cache is None and adjoint_cache is None:
            raise ValueError("DEQ.warm_start: pass `cache` (forward equilibria), "
                             "`adjoint_cache` (backward adjoint vectors) or both.")
        if cache is not None and cache is adjoint_cache:
            raise ValueError(
                "DEQ.warm_start: `cache` and `adjoint_cache` must be two caches (one keeps "
                "equilibria, the other adjoint vectors).")
        previous, self._warm = self._warm, (cache, ids, adjoint_cache)
        try:
            yield self
        finally:
            self._warm = previous

    def forward(self, *inputs: Any, z0: Any = None) -> Any:
        warm = self._warm
        fwd_cache = warm[0] if warm is not None and z0 is None else None
        default_z0 = (z0 is None and not hasattr(self.cell, "init_state")
                      and "init_state" not in self.__dict__)
        if z0 is None:
            z0 = self.init_state(*inputs)
        if fwd_cache is not None:
            z0 = fwd_cache.initial(warm[1], z0)
        max_steps = self.max_steps if self.training else self.eval_max_steps
        module = isinstance(self.cell, nn.Module)
        kw = dict(solver=self.solver, adjoint=self.adjoint, max_steps=max_steps,
                  throw=self.throw, **self.fp_kwargs)
        if warm is not None and warm[2] is not None:
            kw["adjoint_cache"] = (warm[2], warm[1])
        with parametrization_cache(self.cell):
            try:
                if module and _batch_statistics(self.cell):
                    sol = self._solve_coupled(z0, inputs, kw)
                else:
                    # per-sample dropout masks follow batch positions: keep the batch whole
                    compact = self.compact and not (module and _positional_masks(self.cell))
                    sol = fixed_point(self.cell, z0, args=tuple(inputs), compact=compact, **kw)
            except StateShapeError as err:
                if not default_z0:
                    raise
                raise ValueError(
                    f"DEQ: {err} The initial state defaults to zeros shaped like the first "
                    f"input {tuple(inputs[0].shape)}, but the cell's state has another shape: "
                    "pass the initial state, layer(x, z0=torch.zeros(batch, ...)), or define "
                    "`init_state(*inputs)` on the cell."
                ) from None
        self.last_solution = sol
        self._last_call = (tuple(inputs), sol.value)
        if fwd_cache is not None:
            unfinished = sol.stats["status"] == RESULTS.max_steps_reached.code \
                if fwd_cache.keep_unfinished else None
            fwd_cache.update(warm[1], sol.value, converged=sol.stats["converged"],
                             unfinished=unfinished)
        if sol.result in (RESULTS.nonfinite, RESULTS.diverged):
            warnings.warn(
                f"{type(self).__name__} forward: {sol.summary()}. {sol.result.message}",
                DEQWarning, stacklevel=2,
            )
        return sol.value

    def _solve_coupled(self, z0: Any, inputs: tuple[Any, ...], kw: dict[str, Any]) -> Solution:
        """Solve a batch-coupled cell as one problem: state ``(1, B, ...)``."""
        if "adjoint_cache" in kw:
            raise ValueError(
                "DEQ.warm_start: `adjoint_cache` needs per-sample solves; this cell couples "
                "the batch (batch statistics), so its backward is one system. Drop "
                "adjoint_cache.")
        batch = (z0[0] if isinstance(z0, (tuple, list)) else z0).shape[0]
        cell = self.cell

        def f(z: Any) -> Any:
            return _lift(cell(_lower(z), *inputs))

        f.__wrapped__ = cell  # type: ignore[attr-defined]
        return _spread(fixed_point(f, _lift(z0), compact=False, **kw), batch)

    def jacobian_regularisation(
        self, n_samples: int = 1, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        r"""Hutchinson estimate of :math:`\|J_f(z^\star)\|_F^2 / D` at the last equilibrium.

        Add ``weight * layer.jacobian_regularisation()`` to the training loss (Bai, Koltun,
        Kolter 2021, "Stabilizing Equilibrium Models by Jacobian Regularization"); it is
        differentiable w.r.t. the cell's parameters (double backward through one cell call)
        and independent of the adjoint used for the equilibrium. Tuple states are handled.
        Call it after a forward pass in training mode.
        """
        if self._last_call is None:
            raise RuntimeError(
                "DEQ.jacobian_regularisation() needs a forward pass first: call the layer, "
                "then add the regulariser to the loss."
            )
        inputs, value = self._last_call
        layout = make_layout(value, "state")
        z = flatten(layout, value).detach().requires_grad_()
        # The regulariser needs a double backward through the cell, which torch.compile's
        # AOTAutograd does not support: evaluate the eager cell under a compiled one (same
        # parameters, same values; the solves and the implicit backward stay compiled).
        cell = _eager(self.cell)

        def f(zf: torch.Tensor) -> torch.Tensor:
            return flatten(layout, cell(unflatten(layout, zf), *inputs))

        # the fused attention kernels (flash, memory-efficient) have no double backward:
        # attention inside the cell runs the plain (math) kernel for the regulariser
        with parametrization_cache(cell), sdpa_kernel(SDPBackend.MATH):
            return jacobian_frobenius_reg(f, z, n_samples=n_samples, generator=generator)

    def extra_repr(self) -> str:
        return (
            f"solver={self.solver}, adjoint={self.adjoint}, max_steps={self.max_steps}, "
            f"eval_max_steps={self.eval_max_steps}"
        )


def _check_field(owner: str, name: str, value: Any, *, none: bool = False) -> Any:
    """One solver setting of a :class:`DEQ` (constructor or :meth:`DEQ.overrides`), checked;
    returns the value to store (``solver=None``/``adjoint=None`` give the defaults)."""
    if value is None and none:
        return None
    if name == "solver":
        return resolve_solver(value)
    if name == "adjoint":
        return resolve_adjoint(value)
    if name in ("max_steps", "eval_max_steps"):
        return check_int(owner, name, value, 0)
    if name == "throw":
        return check_bool(owner, name, value)
    if not callable(value):
        raise TypeError(
            f"{owner}: `init_state` must be callable as init_state(*inputs) -> z0, got "
            f"{type(value).__name__}."
        )
    return value


def _eager(cell: Any) -> Any:
    """The eager callable under a ``torch.compile``d module or function (else ``cell``)."""
    orig = getattr(cell, "_orig_mod", None)  # torch.compile(module) -> OptimizedModule
    if isinstance(orig, nn.Module):
        return orig
    return getattr(cell, "_torchdynamo_orig_callable", cell)  # torch.compile(function)
