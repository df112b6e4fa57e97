r"""Training the networks of a :class:`~deqkit.hyperdeq.HyperAnderson` on a frozen DEQ.

Bai, Koltun, Kolter, "Neural Deep Equilibrium Solvers", ICLR 2022: the solver's networks are
trained on the *solver's* quality (residuals along an unrolled solve), the DEQ frozen.
:func:`train_hyper_solver` minimises :class:`~deqkit.hyperdeq.loss.UnrolledLoss`, whose
steps run in the core iteration engine from the initialiser's differentiable start;
:func:`pretrain_initialiser` fits the initialiser alone to equilibria solved by
:func:`deqkit.fixed_point`. The library layer: nothing here reads a configuration
or imports :mod:`deqkit.app`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_float, check_int
from .._fixed_point import fixed_point
from ..solvers._base import AbstractFixedPointSolver
from ..solvers.anderson import Anderson
from .loss import UnrolledLoss
from .solver import HyperAnderson


def _as_tuple(batch: Any) -> tuple[Tensor, ...]:
    if isinstance(batch, Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(b, Tensor) for b in batch):
        return tuple(batch)
    raise TypeError(
        "train_hyper_solver: each item of `inputs` must be the DEQ cell's input tensor (the "
        f"injection) or a tuple of input tensors, got {type(batch).__name__}."
    )


def _cell_of(deq_layer: Any, owner: str) -> Callable[..., Tensor]:
    cell = deq_layer.cell if isinstance(deq_layer, nn.Module) and hasattr(deq_layer, "cell") else (
        deq_layer
    )
    if not callable(cell):
        raise TypeError(
            f"{owner}: `deq_layer` must be a DEQ layer or a callable cell, got "
            f"{type(deq_layer).__name__}."
        )
    return cell


def _check_solver(solver: Any, owner: str) -> None:
    if not isinstance(solver, HyperAnderson):
        raise TypeError(
            f"{owner}: `solver` must be a HyperAnderson, got {type(solver).__name__}."
        )


@contextlib.contextmanager
def _eval_mode(*objs: Any) -> Iterator[None]:
    """The modules among ``objs`` in eval mode for the block, their modes restored after."""
    modules = [c for c in objs if isinstance(c, nn.Module)]
    modes = [c.training for c in modules]
    for c in modules:
        c.eval()
    try:
        yield
    finally:
        for c, mode in zip(modules, modes):
            c.train(mode)


def _adam(params: list[Tensor], lr: float, steps: int) -> tuple[Any, Any]:
    """Adam with a learning rate cosine-decayed to 10% over ``steps``."""
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.1 * lr)
    return opt, sched


def _reference(cell: Callable[..., Tensor], z0: Tensor, xs: tuple[Tensor, ...],
               solver: AbstractFixedPointSolver, max_steps: int) -> Tensor:
    """A tight equilibrium :math:`z^\\star` (shaped like ``z0``, no grad) from a zero start."""
    with torch.no_grad():
        ref = fixed_point(lambda z, *a: cell(z, *a), torch.zeros_like(z0), solver=solver,
                          max_steps=max_steps, args=xs, throw=False)
    return ref.value.detach()


def _cycle(inputs: Iterable[Any], owner: str) -> Iterator[tuple[Tensor, ...]]:
    """The batches of ``inputs`` (detached tuples), re-iterated when exhausted."""
    while True:
        empty = True
        for batch in inputs:
            empty = False
            yield tuple(t.detach() for t in _as_tuple(batch))
        if empty:
            raise ValueError(f"{owner}: `inputs` is empty.")


def pretrain_initialiser(
    deq_layer: Any,
    inputs: Iterable[Any],
    solver: HyperAnderson,
    steps: int = 500,
    lr: float = 3e-3,
    *,
    target_solver: AbstractFixedPointSolver | None = None,
    target_max_steps: int = 100,
    seed: int = 0,
    cell_steps: int = 0,
) -> dict[str, Any]:
    r"""Fit the initialiser alone to tightly solved equilibria (regression on :math:`z^\star`).

    One pass over ``inputs`` collects the batches and solves each to :math:`z^\star`
    (``target_solver``, no grad); then ``steps`` Adam steps (cosine-decayed learning rate) on
    random batches minimise the mean relative distance
    :math:`\|f^{(c)}(h_\phi(x)) - z^\star\| / \|z^\star\|`, where :math:`f^{(c)}` is
    ``cell_steps`` plain applications of the cell (``cell_steps=0``: the initial state itself
    is regressed). With ``cell_steps=1`` the initial state is fitted so that the solver's
    *first* step (a plain step, which every solve takes and counts) lands near
    :math:`z^\star`; the initial state itself stays cell-free. Only the initialiser's parameters
    move; the DEQ is unchanged. Meant to run before :func:`train_hyper_solver` (see its
    ``init_pretrain_steps``): the unrolled solver loss alone pulls the initial state only
    weakly toward :math:`z^\star`.

    Args:
        deq_layer: a :class:`deqkit.nn.DEQ` or a cell ``cell(z, *inputs)``.
        inputs: an iterable of cell inputs (as for :func:`train_hyper_solver`).
        solver: the :class:`HyperAnderson` whose ``init_map`` is trained (in place).
        steps: optimisation steps. Default: 500.
        lr: Adam learning rate (cosine-decayed to 10%). Default: 3e-3.
        target_solver: solver of the references. Default: ``Anderson(m=5, rtol=1e-6, atol=0)``.
        target_max_steps: step budget of the reference solves. Default: 100.
        seed: seed of the batch order. Default: 0.
        cell_steps: plain cell applications between the initial state and the regression
            target (differentiated through, the cell frozen). Default: 0.

    Returns:
        dict with ``loss`` (per-step mean relative distances), ``time_s`` (including the
        reference solves), ``parameters`` (the initialiser's) and ``steps``.
    """
    _check_solver(solver, "pretrain_initialiser")
    check_int("pretrain_initialiser", "steps", steps)
    check_int("pretrain_initialiser", "target_max_steps", target_max_steps)
    check_int("pretrain_initialiser", "cell_steps", cell_steps, 0)
    check_float("pretrain_initialiser", "lr", lr, gt=0)
    cell = _cell_of(deq_layer, "pretrain_initialiser")
    if target_solver is None:
        target_solver = Anderson(m=5, rtol=1e-6, atol=0)
    t0 = time.perf_counter()
    with _eval_mode(cell, deq_layer), torch.no_grad():
        data = [(xs, _reference(cell, solver.initial_state(*xs), xs, target_solver,
                                target_max_steps)) for xs in _once(inputs)]
    if not data:
        raise ValueError("pretrain_initialiser: `inputs` is empty.")
    params = [p for p in solver.init_map.parameters() if p.requires_grad]
    opt, sched = _adam(params, lr, steps)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    history: list[float] = []
    with _eval_mode(cell, deq_layer):
        for _ in range(steps):
            if not order:
                order = torch.randperm(len(data), generator=gen).tolist()
            xs, z_star = data[order.pop()]
            z = solver.initial_state(*xs)
            # f^(c): plain applications of the cell (a composition, not a solve: no stopping
            # test, and no evaluation of f beyond the c-th)
            for _ in range(cell_steps):
                z = cell(z, *xs)
            history.append(_fit_step(z.flatten(1), z_star, params, opt, sched))
    opt.zero_grad(set_to_none=True)
    return {
        "loss": history,
        "time_s": time.perf_counter() - t0,
        "parameters": sum(p.numel() for p in params),
        "steps": steps,
    }


def _once(inputs: Iterable[Any]) -> Iterator[tuple[Tensor, ...]]:
    """One pass over ``inputs``, each batch as a detached tuple."""
    for batch in inputs:
        yield tuple(t.detach() for t in _as_tuple(batch))


def _fit_step(z: Tensor, z_star: Tensor, params: list[Tensor], opt: Any, sched: Any) -> float:
    """One Adam step on the mean relative distance of (W, D) ``z`` to ``z_star``.

    ``torch.autograd.grad`` over ``params`` only: a DEQ cell applied in between gets no grad.
    """
    zs = z_star.flatten(1).to(z.dtype)
    dist = torch.linalg.vector_norm(z - zs, dim=1) / torch.linalg.vector_norm(
        zs, dim=1
    ).clamp_min(1e-12)
    loss = dist.mean()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for p, g in zip(params, grads):
        p.grad = None if g is None else g
    opt.step()
    sched.step()
    return float(loss.detach())


def train_hyper_solver(
    deq_layer: Any,
    inputs: Iterable[Any],
    solver: HyperAnderson,
    steps: int = 200,
    k: int = 10,
    lr: float = 3e-3,
    *,
    loss: str = "relative",
    tolerances: Iterable[float] = (1e-3, 1e-4),
    init_weight: float = 1.0,
    target_weight: float = 0.0,
    target_solver: AbstractFixedPointSolver | None = None,
    target_max_steps: int = 100,
    grad_clip: float | None = 1.0,
    callback: Callable[[int, float], None] | None = None,
    init_pretrain_steps: int = 0,
    init_pretrain_lr: float | None = None,
    init_pretrain_cell_steps: int = 0,
) -> dict[str, Any]:
    r"""Train a :class:`HyperAnderson` on a frozen DEQ (HyperDEQ, Bai et al., ICLR 2022).

    For each batch of cell inputs :math:`x`, the solve is unrolled for ``k`` steps with
    autograd (in deqkit's iteration engine, as every solve; :mod:`deqkit.hyperdeq.loss`)
    from the predicted start :math:`z^{[0]} = h_\phi(x)`, and the solver's
    parameters :math:`(\phi, \xi)` take an Adam step (cosine-decayed learning rate, gradient
    norm clipped) on

    .. math::
        \mathcal L = \sum_{i=0}^{k} \ell\Big(\frac{\|f(z^{[i]}) - z^{[i]}\|}
        {\|f(z^{[i]})\|}\Big)
        + w_0 \frac{\|z^{[0]} - z^\star\|}{\|z^\star\|}
        + w_z \sum_{i=1}^{k} \frac{\|z^{[i]} - z^\star\|}{\|z^\star\|},

    averaged over the batch, with :math:`\ell(t) = t` (``loss="relative"``),
    :math:`\ell(t) = \log t` (``loss="log"``, which weighs late steps as much as early ones) or
    :math:`\ell(t) = \sum_{\epsilon} \tau\,\mathrm{softplus}(\log_{10}(t/\epsilon)/\tau)`,
    :math:`\tau = 0.25` (``loss="tolerance"``: a smooth count of the steps still above each
    target tolerance :math:`\epsilon` in ``tolerances``, i.e. of the f evaluations a solve
    stopping there spends; steps already below every tolerance cost nothing),
    and :math:`z^\star` a tight reference solve (only computed when :math:`w_0` or
    :math:`w_z` is non-zero). Only the solver's parameters are differentiated
    (``torch.autograd.grad``): the DEQ receives no gradient and is unchanged. The cell is put
    in eval mode during training and restored afterwards.

    Args:
        deq_layer: a :class:`deqkit.nn.DEQ` (its ``cell`` is used) or a cell
            ``cell(z, *inputs)``.
        inputs: an iterable of cell inputs (the injection tensor, or a tuple of tensors), e.g.
            a list of batches of ``model.stem(x)``; re-iterated when exhausted.
        solver: the :class:`HyperAnderson` to train (in place).
        steps: optimisation steps. Default: 200.
        k: unrolled solver steps per loss. Default: 10.
        lr: Adam learning rate (cosine-decayed to 10%). Default: 3e-3.
        loss: ``"relative"``, ``"log"`` or ``"tolerance"``. Default: ``"relative"``.
        tolerances: target relative residuals of ``loss="tolerance"``.
            Default: ``(1e-3, 1e-4)``.
        init_weight: :math:`w_0`, weight of the initialisation loss. Default: 1.0.
        target_weight: :math:`w_z`, weight of the per-step distance to :math:`z^\star`.
            Default: 0.0.
        target_solver: solver of the reference :math:`z^\star`.
            Default: ``Anderson(m=5, rtol=1e-6, atol=0)``.
        target_max_steps: step budget of the reference solve. Default: 100.
        grad_clip: max gradient norm (``None``: no clipping). Default: 1.0.
        callback: called as ``callback(step, loss)`` after every step.
        init_pretrain_steps: first fit the initialiser alone to :math:`z^\star` for this
            many steps (:func:`pretrain_initialiser`, one pass of ``inputs`` for the
            references). Default: 0 (none).
        init_pretrain_lr: learning rate of that phase. Default: ``lr``.
        init_pretrain_cell_steps: ``cell_steps`` of that phase (fit the state after this
            many plain cell steps from the initial state). Default: 0.

    Returns:
        dict with ``loss`` (per-step losses), ``time_s`` (wall time, pretraining included),
        ``parameters`` (the solver's parameter count), ``steps`` and, with pretraining,
        ``pretrain`` (:func:`pretrain_initialiser`'s result).

    Example:
        >>> import torch
        >>> import deqkit as dk
        >>> from deqkit.hyperdeq import HyperAnderson, train_hyper_solver
        >>> _ = torch.manual_seed(0)
        >>> lin = torch.nn.Linear(6, 6, bias=False)
        >>> layer = dk.nn.DEQ(lambda z, u: torch.tanh(0.6 * lin(z) + u))
        >>> data = [torch.randn(8, 6) for _ in range(2)]
        >>> solver = HyperAnderson((6,), rtol=1e-5)
        >>> out = train_hyper_solver(layer, data, solver, steps=3, k=4)
        >>> len(out["loss"]), lin.weight.grad is None
        (3, True)
    """
    _check_solver(solver, "train_hyper_solver")
    spec = _loss_spec(steps, k, target_max_steps, lr, loss, tolerances, init_weight,
                      target_weight, grad_clip, init_pretrain_steps)
    cell = _cell_of(deq_layer, "train_hyper_solver")
    t_start = time.perf_counter()
    pre = None
    if init_pretrain_steps:
        pre = pretrain_initialiser(
            deq_layer, inputs, solver, init_pretrain_steps,
            lr if init_pretrain_lr is None else init_pretrain_lr,
            target_solver=target_solver, target_max_steps=target_max_steps,
            cell_steps=init_pretrain_cell_steps,
        )
    if target_solver is None:
        target_solver = Anderson(m=5, rtol=1e-6, atol=0)
    params = [p for p in solver.parameters() if p.requires_grad]
    opt, sched = _adam(params, lr, steps)
    history: list[float] = []
    batches = _cycle(inputs, "train_hyper_solver")
    with _eval_mode(cell, deq_layer):
        for step_i in range(steps):
            xs = next(batches)
            z0 = solver.initial_state(*xs)
            z_star = None
            if spec.init_weight > 0 or spec.target_weight > 0:
                z_star = _reference(cell, z0, xs, target_solver, target_max_steps)
            total = spec(cell, solver, z0, xs, k, z_star)
            _descend(total, params, opt, sched, grad_clip)
            history.append(float(total.detach()))
            if callback is not None:
                callback(step_i, history[-1])
    out = {
        "loss": history,
        "time_s": time.perf_counter() - t_start,
        "parameters": sum(p.numel() for p in params),
        "steps": steps,
    }
    if pre is not None:
        out["pretrain"] = pre
    return out


def _loss_spec(steps: int, k: int, target_max_steps: int, lr: float, loss: str,
               tolerances: Iterable[float], init_weight: float, target_weight: float,
               grad_clip: float | None, init_pretrain_steps: int) -> UnrolledLoss:
    """Check :func:`train_hyper_solver`'s settings; return its loss."""
    owner = "train_hyper_solver"
    check_int(owner, "steps", steps)
    check_int(owner, "k", k)
    check_int(owner, "target_max_steps", target_max_steps)
    check_float(owner, "lr", lr, gt=0)
    check_float(owner, "init_weight", init_weight, ge=0)
    check_float(owner, "target_weight", target_weight, ge=0)
    check_choice(owner, "loss", loss, ("relative", "log", "tolerance"))
    try:
        tols = [float(t) for t in tolerances]
    except (TypeError, ValueError):
        tols = []
    if not tols or not all(0 < t < math.inf for t in tols):
        raise ValueError(
            "train_hyper_solver: `tolerances` must be a non-empty sequence of floats > 0, got "
            f"{tolerances!r}."
        )
    check_float(owner, "grad_clip", grad_clip, gt=0, finite=False, none=True)
    check_int(owner, "init_pretrain_steps", init_pretrain_steps, 0)
    return UnrolledLoss(kind=loss, log_tols=tuple(math.log10(t) for t in tols),
                        init_weight=float(init_weight), target_weight=float(target_weight))


def _descend(total: Tensor, params: list[Tensor], opt: Any, sched: Any,
             grad_clip: float | None) -> None:
    """One Adam step on ``total`` over ``params`` only (the DEQ gets no gradient); non-finite
    gradient entries become 0 and the gradient norm is clipped to ``grad_clip``."""
    grads = torch.autograd.grad(total, params, allow_unused=True)
    for p, g in zip(params, grads):
        p.grad = None if g is None else torch.nan_to_num(g)
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()


__all__ = ["pretrain_initialiser", "train_hyper_solver"]
