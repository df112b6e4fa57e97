"""Warm starts across calls: the last equilibrium of each sample, kept by integer id."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._checks import check_bool, check_int
from .._flatten import Layout, flatten, make_layout, unflatten

State = Any  # Tensor | tuple[Tensor, ...]


class FixedPointCache:
    r"""Store each sample's equilibrium and start its next solve there (warm starts).

    Samples that come back (the same training example in the next epoch, the next frame of a
    video, the next step of a diffusion sampler) usually have an equilibrium close to their
    previous one, so starting there saves solver steps:

    .. math::
        z^{[0]}_i = \begin{cases} z^\star_{i,\text{prev}} & \text{if sample } i
        \text{ was stored before,} \\ \text{default}_i & \text{otherwise,}\end{cases}

    where :math:`z^\star_{i,\text{prev}}` is the value stored by the last :meth:`update` for
    id :math:`i`. Stored values are detached copies (no graph is kept), and ``z0`` carries no
    gradient in deqkit (:func:`~deqkit.fixed_point` differentiates the equilibrium, not the
    path), so warm starts change where the solver starts, not what it converges to: with a
    converged solve the result is the same equilibrium, up to the tolerance.

    Memory: ``capacity x D`` values of the state's solver dtype (float32 at least), allocated
    on the first :meth:`update` on that state's device; ``storage_device="cpu"`` keeps them
    on the host instead (e.g. a GPU model with a large dataset). A training step with a
    fixed step budget trains a deeper effective solve when it warm-starts (the budget is
    spent from where the last epoch ended), as in DEQ optical flow (Bai et al. 2022), which
    reuses the previous frame's flow the same way.

    The same cache keeps any per-sample vectors: a second instance passed as
    ``adjoint_cache`` (:func:`~deqkit.fixed_point`, :meth:`~deqkit.nn.DEQ.warm_start`)
    keeps each sample's adjoint vector and starts its next implicit backward solve there.

    Args:
        capacity: number of ids; valid ids are ``0 .. capacity - 1`` (e.g. dataset indices).
        only_converged: :meth:`update` stores a sample only where ``converged`` (when given)
            is True, so a failed solve never becomes a start point. Default: True.
        keep_unfinished: with ``only_converged``, also store the samples that
            :meth:`update` is told ran out of steps (``unfinished``) if their value is finite:
            a budget-limited solve (a small or growing training budget,
            :class:`~deqkit.nn.DEQSchedule`) returns its lowest-residual iterate, no worse a
            start than the one it had, so the next solve goes on from there instead of from
            the default. Diverged or non-finite samples are never stored. Default: False.
        storage_device: where the stored values live (``None``: the state's device).

    Example:
        >>> import torch, deqkit as dk
        >>> W = 0.5 * torch.eye(3, dtype=torch.float64)
        >>> x = torch.arange(12, dtype=torch.float64).reshape(4, 3)
        >>> f = lambda z, x: z @ W.T + x
        >>> cache = dk.nn.FixedPointCache(capacity=10)
        >>> ids = torch.tensor([2, 5, 7, 9])
        >>> solver = dk.Picard(rtol=1e-12, atol=0)
        >>> z0 = cache.initial(ids, torch.zeros_like(x))  # nothing stored yet: the default
        >>> cold = dk.fixed_point(f, z0, solver, max_steps=100, args=(x,))
        >>> cache.update(ids, cold.value, converged=cold.stats["converged"])
        >>> warm = dk.fixed_point(f, cache.initial(ids, torch.zeros_like(x)), solver,
        ...                       max_steps=100, args=(x,))
        >>> int(cold.stats["nstep"].max()), int(warm.stats["nstep"].max())
        (39, 0)
        >>> torch.allclose(warm.value, cold.value)
        True
    """

    def __init__(
        self,
        capacity: int,
        *,
        only_converged: bool = True,
        keep_unfinished: bool = False,
        storage_device: torch.device | str | None = None,
    ) -> None:
        check_int("FixedPointCache", "capacity", capacity,
                  example="len(train_set) (one slot per sample id)")
        check_bool("FixedPointCache", "only_converged", only_converged)
        check_bool("FixedPointCache", "keep_unfinished", keep_unfinished)
        self.capacity = capacity
        self.only_converged = only_converged
        self.keep_unfinished = keep_unfinished
        self.storage_device = None if storage_device is None else torch.device(storage_device)
        self._layout: Layout | None = None
        self._values: Tensor | None = None  # (capacity, D)
        self._seen: Tensor | None = None  # (capacity,) bool

    # ------------------------------------------------------------------------------ helpers

    def _check_ids(self, ids: Tensor, batch: int, where: str) -> Tensor:
        if not isinstance(ids, Tensor) or ids.dtype not in (torch.int32, torch.int64):
            got = ids.dtype if isinstance(ids, Tensor) else type(ids).__name__
            raise TypeError(
                f"FixedPointCache.{where}: `ids` must be an int64 tensor of sample ids, got "
                f"{got}; e.g. the dataset indices of the batch."
            )
        if ids.dim() != 1 or ids.shape[0] != batch:
            raise ValueError(
                f"FixedPointCache.{where}: `ids` must have shape ({batch},) (one id per sample "
                f"of the batch), got {tuple(ids.shape)}."
            )
        if batch and (int(ids.min()) < 0 or int(ids.max()) >= self.capacity):
            raise ValueError(
                f"FixedPointCache.{where}: ids must lie in [0, {self.capacity}), got "
                f"[{int(ids.min())}, {int(ids.max())}]; raise `capacity`."
            )
        return ids.long()

    def _same_layout(self, layout: Layout, where: str) -> None:
        if self._layout is not None and (
            self._layout.shapes != layout.shapes or self._layout.is_tuple != layout.is_tuple
        ):
            raise ValueError(
                f"FixedPointCache.{where}: the state's per-sample shapes "
                f"{[tuple(s) for s in layout.shapes]} differ from the stored ones "
                f"{[tuple(s) for s in self._layout.shapes]}; use one cache per state layout."
            )

    # ---------------------------------------------------------------------------------- API

    def initial(self, ids: Tensor, default: State) -> State:
        """The initial guess for the samples ``ids``: their stored equilibrium where there is
        one, ``default`` (a state of the batch, e.g. zeros) elsewhere."""
        layout = make_layout(default, "default")
        ids = self._check_ids(ids, layout.batch, "initial")
        self._same_layout(layout, "initial")
        if self._values is None or self._seen is None:
            return default
        if self._values.shape[1] != layout.width:
            raise ValueError(
                f"FixedPointCache.initial: `default` has {layout.width} values per sample, "
                f"the stored states {self._values.shape[1]}; use one cache per state layout."
            )
        flat = flatten(layout, default).detach()
        idx = ids.to(self._values.device)
        stored = self._values.index_select(0, idx).to(device=flat.device, dtype=flat.dtype)
        seen = self._seen.index_select(0, idx).to(flat.device)
        return unflatten(layout, torch.where(seen.unsqueeze(1), stored, flat))

    @torch.no_grad()
    def update(self, ids: Tensor, z: State, converged: Tensor | None = None,
               unfinished: Tensor | None = None) -> None:
        """Store detached copies of ``z`` (the batch's equilibria) under ``ids`` (unique
        within the batch). With ``only_converged`` and ``converged`` (a bool per sample,
        e.g. ``sol.stats["converged"]``) only converged samples are stored; with
        ``keep_unfinished`` also the finite ones of ``unfinished`` (a bool per sample: ran out
        of steps, e.g. ``sol.stats["status"] == RESULTS.max_steps_reached.code``)."""
        layout = make_layout(z, "z")
        ids = self._check_ids(ids, layout.batch, "update")
        self._same_layout(layout, "update")
        if ids.numel() != torch.unique(ids).numel():
            raise ValueError(
                "FixedPointCache.update: `ids` contains duplicates; each sample of a batch "
                "needs its own id."
            )
        flat = flatten(layout, z).detach()
        if self._values is None:
            device = self.storage_device or flat.device
            self._layout = layout
            self._values = torch.zeros(self.capacity, layout.width, dtype=flat.dtype,
                                       device=device)
            self._seen = torch.zeros(self.capacity, dtype=torch.bool, device=device)
        assert self._seen is not None
        if converged is not None and self.only_converged:
            if not isinstance(converged, Tensor) or converged.shape != (layout.batch,):
                raise ValueError(
                    "FixedPointCache.update: `converged` must be a bool tensor of shape "
                    f"({layout.batch},), e.g. sol.stats['converged']."
                )
            keep = converged.to(torch.bool).to(flat.device)
            if self.keep_unfinished and unfinished is not None:
                if not isinstance(unfinished, Tensor) or unfinished.shape != (layout.batch,):
                    raise ValueError(
                        "FixedPointCache.update: `unfinished` must be a bool tensor of shape "
                        f"({layout.batch},), e.g. sol.stats['status'] == "
                        "RESULTS.max_steps_reached.code.")
                # a row sum is finite only if every value is (an overflowing sum of finite
                # values is refused too: harmless, the sample just starts from the default)
                finite = torch.isfinite(flat.sum(dim=1))
                keep = keep | (unfinished.to(torch.bool).to(flat.device) & finite)
            ids, flat = ids[keep.to(ids.device)], flat[keep]
        idx = ids.to(self._values.device)
        self._values.index_copy_(0, idx, flat.to(self._values.device, self._values.dtype))
        self._seen.index_fill_(0, idx, True)

    def clear(self) -> None:
        """Forget every stored equilibrium (e.g. after the model changed a lot)."""
        if self._seen is not None:
            self._seen.zero_()

    def __len__(self) -> int:
        """Number of ids with a stored equilibrium."""
        return 0 if self._seen is None else int(self._seen.sum())

    def state_dict(self) -> dict[str, Any]:
        """The stored values and the seen-mask (for checkpoints; ``torch.save``-able)."""
        return {"capacity": self.capacity, "values": self._values, "seen": self._seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the layout is re-learnt on the next :meth:`update` or
        checked on the next :meth:`initial`)."""
        if state.get("capacity") != self.capacity:
            raise ValueError(
                f"FixedPointCache.load_state_dict: capacity {state.get('capacity')!r} in the "
                f"state, {self.capacity} here."
            )
        self._values, self._seen = state["values"], state["seen"]

    def __repr__(self) -> str:
        return (f"FixedPointCache(capacity={self.capacity}, stored={len(self)}, "
                f"only_converged={self.only_converged}, "
                f"keep_unfinished={self.keep_unfinished})")
