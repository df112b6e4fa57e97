"""Multi-process (``torchrun``) data-parallel training support for ``deqkit train``.

``deqkit train`` becomes data parallel when it is started by ``torchrun`` (or any launcher
setting ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) with
``WORLD_SIZE > 1``:

* the process group uses gloo on CPU and nccl when CUDA is available;
* the model is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`, which averages
  the gradients of the ranks during ``backward()``;
* :class:`GlobalBatchSampler` splits each *global* batch of ``batch_size`` samples (the very
  batch a single process would draw with the same seed and epoch) into ``world_size``
  contiguous per-rank chunks, so a run on N processes sees the same batches as a run on one;
* metrics are summed (loss sums, correct counts, sample counts) or averaged weighted by the
  number of samples (solver statistics; ``*_max`` and ``nfev`` take the maximum) over ranks,
  so rank 0 logs global numbers;
* only rank 0 writes files (checkpoints, ``metrics.jsonl``, plots, summary).

See ``docs/distributed.md``.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DistEnv",
    "GlobalBatchSampler",
    "detect",
    "fetch",
    "reduce_batch_stats",
]


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job. ``world_size == 1``: plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owns_group: bool = False  # detect() created the process group (shutdown() destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; only for small control data)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        if not self.enabled:
            return t
        red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        # nccl reduces CUDA tensors only; gloo CPU tensors.
        buf = t.to(self.device)
        dist.all_reduce(buf, op=red)
        return buf.to(t.device)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer.") from None


def detect(device: str = "auto") -> DistEnv:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by ``torchrun``); initialise the
    process group when ``WORLD_SIZE > 1`` (idempotent). Single process otherwise.

    ``device`` is the run's config value: ``"auto"``/``"cuda"`` put rank ``LOCAL_RANK`` on
    GPU ``LOCAL_RANK`` with NCCL when CUDA is present (one GPU per process: NCCL cannot share
    a GPU between ranks); ``"cpu"`` uses gloo on the CPU even where GPUs exist.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistEnv()
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world}).")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var) and not dist.is_initialized():
            raise ValueError(
                f"WORLD_SIZE={world} but {var} is not set: start distributed training with "
                "`torchrun --nproc_per_node N -m deqkit train ...` (see docs/distributed.md)."
            )
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed.")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"config `device` = {device!r}: no CUDA device is available here; use "
                         "'cpu' (gloo) or 'auto'.")
    if use_cuda:
        local_world = _env_int("LOCAL_WORLD_SIZE", world)
        if local_world > torch.cuda.device_count():
            raise ValueError(
                f"{local_world} processes on this node but {torch.cuda.device_count()} CUDA "
                f"device(s): NCCL needs one GPU per process. Start torchrun with "
                f"--nproc_per_node {torch.cuda.device_count()}, or train on the CPU with gloo "
                "(--device cpu)."
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    owns = not dist.is_initialized()
    if not owns:
        backend = dist.get_backend()
    else:
        backend = "nccl" if use_cuda else "gloo"
        kwargs: dict[str, Any] = {}
        timeout = os.environ.get("DEQKIT_DIST_TIMEOUT")
        if timeout:
            kwargs["timeout"] = datetime.timedelta(seconds=float(timeout))
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device,
                   backend=backend, owns_group=owns)


def shutdown(env: DistEnv, barrier: bool = True) -> None:
    """Destroy the process group :func:`detect` created (after a final barrier, unless
    ``barrier=False``: on an error, when the other ranks may never arrive)."""
    if env.enabled and env.owns_group and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def local_batch_size(batch_size: int, world_size: int) -> int:
    """Per-rank batch; the global batch stays ``batch_size``, so it must divide evenly."""
    if batch_size % world_size:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the number of processes "
            f"WORLD_SIZE={world_size}: the global batch is split evenly over the ranks "
            "(so that a run on N processes sees the same batches as a run on one). Choose a "
            f"batch_size that is a multiple of {world_size}."
        )
    return batch_size // world_size


def wrap_model(model: nn.Module, env: DistEnv) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` (on this rank's device).

    ``find_unused_parameters=False``: every trainable parameter of the zoo models is used in
    every step (the DEQ's extra evaluation of f inside the implicit adjoint happens within the
    same forward call, and the Jacobian regulariser only touches parameters that are already
    used). ``broadcast_buffers=True`` keeps buffers (spectral-norm vectors, BatchNorm running
    statistics) identical to rank 0's.
    """
    if not env.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if env.device.type == "cuda":
        model.to(env.device)
        return DDP(model, device_ids=[env.device.index], output_device=env.device.index)
    return DDP(model)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


class GlobalBatchSampler:
    """Per-rank index lists of the global batches a single process would use.

    With ``shuffle=True`` the global batches of epoch ``e`` are exactly those of
    ``DataLoader(shuffle=True, batch_size=batch_size, generator=Generator().manual_seed(
    base_seed + e))`` -- the single-process trainer's; rank ``r`` gets the ``r``-th contiguous
    chunk of each. Unlike :class:`torch.utils.data.DistributedSampler` nothing is padded or
    interleaved, so the union of the ranks' batch ``k`` *is* the single-process batch ``k``.
    ``drop_last=True`` leaves out a short last batch. A short last batch is split as evenly
    as possible (chunks differ by at most one); the
    trainer weights each rank's loss by its share so the averaged gradient is the global
    mean. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, *,
                 shuffle: bool, base_seed: int = 0, drop_last: bool = False) -> None:
        self.n, self.batch_size = n, batch_size
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.base_seed = shuffle, base_seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return math.ceil(self.n / self.batch_size)

    def global_batches(self) -> list[list[int]]:
        """The global batches of this epoch: those of ``DataLoader(range(n), batch_size,
        shuffle, generator=Generator().manual_seed(base_seed + epoch))``, which is how the
        single-process trainer draws them (the loader also advances the generator before
        the permutation, so it is used itself rather than re-implemented)."""
        if not self.shuffle:
            idx = list(range(self.n))
            out = [idx[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        else:
            gen = torch.Generator().manual_seed(self.base_seed + self.epoch)
            loader = torch.utils.data.DataLoader(range(self.n), batch_size=self.batch_size,
                                                 shuffle=True, generator=gen)
            out = [b.tolist() for b in loader]
        return out[:len(self)]

    def batches(self) -> Iterator[tuple[list[int], int]]:
        """``(local indices, global batch size)`` per step."""
        for glob in self.global_batches():
            m = len(glob)
            base, extra = divmod(m, self.world_size)
            lo = self.rank * base + min(self.rank, extra)
            hi = lo + base + (1 if self.rank < extra else 0)
            yield glob[lo:hi], m

    def __iter__(self) -> Iterator[list[int]]:
        for local, _ in self.batches():
            yield local

    def check_nonempty(self, what: str) -> None:
        """Every rank must take part in every DDP step: no empty chunk allowed."""
        last = self.batch_size if self.drop_last and len(self) else \
            self.n - (len(self) - 1) * self.batch_size
        if self.n == 0 or last < self.world_size:
            raise ValueError(
                f"{what}: the last batch has {last} sample(s) ({self.n} samples, batch_size "
                f"{self.batch_size}), fewer than the {self.world_size} processes, so a rank "
                "would get no data; change --subset or --batch-size (or use fewer processes)."
            )


def fetch(dataset: Any, indices: Sequence[int]) -> Any:
    """The batch of ``indices`` as a DataLoader with ``num_workers=0`` would collate it."""
    from torch.utils.data import default_collate

    if isinstance(dataset, torch.utils.data.TensorDataset):
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return tuple(t[idx] for t in dataset.tensors)
    getitems = getattr(dataset, "__getitems__", None)
    items = getitems(list(indices)) if getitems is not None else [dataset[i] for i in indices]
    return default_collate(items)


def _is_max_key(key: str) -> bool:
    return key.endswith("_max") or key in ("nfev", "bwd_matvecs")  # batched product counts


def reduce_batch_stats(env: DistEnv, rows: list[dict[str, float]],
                       counts: list[int]) -> list[dict[str, float]]:
    """Combine per-step solver statistics over ranks.

    ``rows[i]`` holds this rank's statistics of step ``i`` (per-sample means over its
    ``counts[i]`` samples). Means become sample-weighted means over all ranks (= the mean
    over the global batch); ``*_max`` and ``nfev`` become the maximum over ranks. Every rank
    must call this with the same number of steps and the same keys.
    """
    if not env.enabled:
        return rows
    # rank 0 always has samples in every step (it takes the first, largest chunk)
    keys = env.broadcast_object(sorted({k for r in rows for k in r}))
    if not rows or not keys:
        return rows
    mean_keys = [k for k in keys if not _is_max_key(k)]
    max_keys = [k for k in keys if _is_max_key(k)]
    w = torch.tensor(counts, dtype=torch.float64)
    out: list[dict[str, float]] = [{} for _ in rows]
    if mean_keys:
        vals = torch.tensor([[r.get(k, 0.0) for k in mean_keys] for r in rows],
                            dtype=torch.float64)
        buf = torch.cat([vals * w[:, None], w[:, None]], dim=1)
        buf = env.all_reduce(buf, "sum")
        means = buf[:, :-1] / buf[:, -1:].clamp_min(1.0)
        for i, row in enumerate(means.tolist()):
            out[i].update(zip(mean_keys, row))
    if max_keys:
        # ranks with no samples in a step contribute -inf
        vals = torch.tensor([[r.get(k, -math.inf) if c else -math.inf for k in max_keys]
                             for r, c in zip(rows, counts)], dtype=torch.float64)
        vals = env.all_reduce(vals, "max")
        for i, row in enumerate(vals.tolist()):
            out[i].update(zip(max_keys, row))
    return out
