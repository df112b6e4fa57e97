"""Memory measurements: bytes saved for backward, peak live bytes, and slope fits."""

from __future__ import annotations

import contextlib
import gc
import os
import re
import sys
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

SAVED_METHOD = (
    "saved-for-backward bytes: torch.autograd.graph.saved_tensors_hooks pack hook during one "
    "training step (forward + loss), each storage counted once (de-duplicated by storage "
    "data_ptr), only storages still held by the graph when the forward pass returns (weak "
    "references), parameters and the input batch excluded; tensors an autograd.Function keeps as "
    "plain ctx attributes (e.g. z* in deqkit's ImplicitAdjoint, one B x width tensor) are not "
    "seen by the hook"
)
PEAK_METHOD = (
    "peak live bytes: torch.profiler.profile(profile_memory=True) on CPU; the allocator's "
    "[memory] events (+bytes on allocation, -bytes on free) sorted by time and summed, the "
    "maximum of the running sum is the peak of bytes allocated inside the measured call above "
    "the level at its start (counts every CPU tensor allocation, ctx attributes included)"
)


def saved_tensor_bytes(
    fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()
) -> tuple[int, Any]:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs and still holds
    when it returns (the graph of ``fn()``'s output, kept alive by the returned value).

    Every tensor packed by autograd is attributed to its storage; each storage is counted once
    (``untyped_storage().nbytes()``, de-duplicated by ``data_ptr``). A weak reference to a
    detached alias of every saved tensor tells which storages are still held when ``fn``
    returns: graphs built and dropped inside ``fn`` (e.g. of a residual norm) do not count.
    Storages of ``exclude`` (parameters, inputs: live whatever the depth) are left out.
    Returns ``(bytes, fn())``; also sets ``saved_tensor_bytes.total`` to the bytes saved
    during ``fn`` whether held or not.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    live: dict[int, tuple[int, list[weakref.ref]]] = {}
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        # a detached alias: returning ``t`` itself can make a saved output reference its own
        # grad_fn (a reference cycle), which would keep dropped graphs alive
        d = t.detach()
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in skip:
            return d
        entry = live.get(ptr)
        if entry is None or not any(r() is not None for r in entry[1]):  # new (or reused) address
            live[ptr] = (st.nbytes(), [weakref.ref(d)])
            total[0] += st.nbytes()
        else:
            entry[1].append(weakref.ref(d))
        return d

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    gc.collect(1)  # young generations only: a full collection costs ~0.3 s here
    held = sum(n for n, refs in live.values() if any(r() is not None for r in refs))
    saved_tensor_bytes.total = int(total[0])  # type: ignore[attr-defined]
    return int(held), out


def _memory_events(prof: Any) -> list[tuple[int, int]]:
    """(time ns, signed bytes) of the CPU allocator events recorded by ``prof``."""
    events = []
    kineto = getattr(prof.profiler, "kineto_results", None)
    if kineto is None:  # pragma: no cover - depends on the torch build
        raise RuntimeError("torch.profiler has no kineto results: memory events unavailable")
    for e in kineto.events():
        if e.name() == "[memory]" and "CPU" in str(e.device_type()):
            events.append((int(e.start_ns()), int(e.nbytes())))
    events.sort(key=lambda p: p[0])  # stable: ties keep the recorded order
    return events


def peak_from_events(events: Iterable[tuple[int, int]]) -> int:
    """Maximum of the running sum of signed allocation sizes (>= 0), in time order."""
    run = peak = 0
    for _, nbytes in sorted(events, key=lambda p: p[0]):
        run += nbytes
        peak = max(peak, run)
    return int(peak)


#: Lines the profiler's native code (kineto, the CPU allocator) writes to the process's
#: stderr on every start/stop; dropped by :func:`quiet_profiler`, anything else is kept.
PROFILER_NOISE = re.compile(
    r"SyncActivityProfilerHandler|Memory block of unknown size was allocated before the "
    r"profiling started|^\s*$"
)


@contextlib.contextmanager
def quiet_profiler() -> Iterator[None]:
    """Within the block, drop the profiler's native log lines from stderr.

    Kineto writes ``profiler_start``/``profiler_stop`` lines (and the CPU allocator a warning
    on the first memory profile) straight to file descriptor 2 on every profiling session, which
    neither ``warnings`` filters nor the profiler's options reach. The block points fd 2 at a
    temporary file and, on exit, writes back to fd 2 every captured line that is not such a
    message (:data:`PROFILER_NOISE`), so real errors still show.
    """
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stderr.flush()  # Python-level text written before the block goes out first
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2: nothing to silence
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(AttributeError, OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if not PROFILER_NOISE.search(ln)]
            if kept:
                os.write(2, "".join(kept).encode())


def peak_live_bytes(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Peak bytes allocated on the CPU while ``fn()`` runs, above the level at its start.

    Uses ``torch.profiler.profile(profile_memory=True)`` with its native log lines silenced
    (:func:`quiet_profiler`); returns ``(peak_bytes, fn())``.
    """
    gc.collect(1)  # young generations only: a full collection costs ~0.3 s here
    with warnings.catch_warnings(), quiet_profiler():
        # some torch versions (2.11) warn about event cycles even for one-shot profiling
        warnings.filterwarnings("ignore", message=".*Profiler clears events")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
    return peak_from_events(_memory_events(prof)), out


def verify_peak_method(nbytes: int = 1 << 20) -> dict[str, Any]:
    """Check :func:`peak_live_bytes` on a known allocation (``nbytes`` float32 bytes)."""

    def alloc() -> float:
        t = torch.ones(nbytes // 4)
        return float(t[0])

    peak, _ = peak_live_bytes(alloc)
    return {"allocated": nbytes, "measured_peak": peak, "ok": nbytes <= peak < 2 * nbytes}


def fit_slope(xs: Iterable[float], ys: Iterable[float]) -> dict[str, float]:
    """Least-squares line ``y = slope * x + intercept``; also R^2."""
    x = np.asarray(list(xs), dtype=np.float64)
    y = np.asarray(list(ys), dtype=np.float64)
    if x.size < 2:
        raise ValueError("fit_slope needs at least two points")
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    ss = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss if ss > 0 else 1.0
    return {"slope": float(slope), "intercept": float(intercept), "r2": r2}


__all__ = [
    "PEAK_METHOD",
    "PROFILER_NOISE",
    "SAVED_METHOD",
    "fit_slope",
    "peak_from_events",
    "peak_live_bytes",
    "quiet_profiler",
    "saved_tensor_bytes",
    "verify_peak_method",
]
