"""Shared helpers of the deqkit benchmark scripts (environment header, timing, problems)."""

from __future__ import annotations

import copy
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_state() -> dict[str, str]:
    def run(*cmd: str) -> str:
        try:
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=10)
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "unknown"

    dirty = run("git", "status", "--porcelain", "--", "src")
    return {"commit": run("git", "rev-parse", "--short", "HEAD"), "src_dirty": str(bool(dirty))}


def environment() -> dict[str, Any]:
    import deqkit

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "deqkit": getattr(deqkit, "__version__", "?"),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": [round(v, 2) for v in os.getloadavg()],
        **git_state(),
    }
    try:
        import torchdeq

        env["torchdeq"] = getattr(torchdeq, "__version__", "0.1.0 (no __version__)")
    except ImportError:  # pragma: no cover - torchdeq is a benchmark dependency
        env["torchdeq"] = "not installed"
    return env


def header_lines(env: dict[str, Any]) -> list[str]:
    return [
        f"- torch {env['torch']}, deqkit {env['deqkit']} (git {env['commit']}, src modified: "
        f"{env['src_dirty']}), torchdeq {env.get('torchdeq', '?')}, Python {env['python']}",
        f"- CPU: {env['cpu']} ({env['cpu_count']} logical cores), torch threads: {env['threads']}",
        f"- load average at start: {env['loadavg_at_start']} (other processes share the machine; "
        "timings are interleaved round-robin so that load affects all rows alike)",
    ]


class Timer:
    """Wall (perf_counter) and process-CPU (process_time) time of one call."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def run(self, fn: Callable[[], Any]) -> Any:
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        t1, c1 = time.perf_counter(), time.process_time()
        self.wall.append(t1 - t0)
        self.cpu.append(c1 - c0)
        return out

    @property
    def median(self) -> float:
        return statistics.median(self.wall) if self.wall else float("nan")

    @property
    def minimum(self) -> float:
        return min(self.wall) if self.wall else float("nan")

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu) if self.cpu else float("nan")


def fmt_time(s: float) -> str:
    if s != s:
        return "-"
    if s >= 1.0:
        return f"{s:.2f} s"
    return f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} us"


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------


class TanhCell:
    """f(z, x) = tanh(z W^T + x U^T + b): shared by P1/P1' (Gaussian W) and H/H2 (symmetric W).

    The maths of ``deqkit.zoo.MLPCell`` (``tanh(W z + u)`` with ``u = U x + b``), kept as plain
    tensors rather than the zoo module on purpose: the benchmarks set the spectrum of ``W``
    exactly, differentiate with respect to a ``W`` they own (``type(f)(W, U, b)``), and time f
    itself (bench_floor, repro_findings), so a module call or a precomputed injection would
    change what is measured.
    """

    def __init__(self, W: torch.Tensor, U: torch.Tensor, b: torch.Tensor) -> None:
        self.W, self.U, self.b = W, U, b

    def __call__(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


def make_tanh_problem(
    kind: str,
    norm: float,
    *,
    d: int = 256,
    d_in: int = 64,
    batch: int = 128,
    input_scale: float = 1.0,
    bias_scale: float = 0.1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[TanhCell, torch.Tensor, torch.Tensor]:
    """``kind='gaussian'``: W Gaussian with spectral norm ``norm``; ``kind='symmetric'``:
    W = (A + A^T)/2 with spectral radius ``norm``. Returns ``(f, x, z0)``."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    if kind == "gaussian":
        W = A * (norm / torch.linalg.matrix_norm(A, 2))
    elif kind == "symmetric":
        S = (A + A.T) / 2
        W = S * (norm / torch.linalg.eigvalsh(S).abs().max())
    else:
        raise ValueError(kind)
    U = torch.randn(d, d_in, generator=g, dtype=torch.float64) * (input_scale / d_in**0.5)
    b = torch.randn(d, generator=g, dtype=torch.float64) * bias_scale
    x = torch.randn(batch, d_in, generator=g, dtype=torch.float64)
    f = TanhCell(W.to(dtype), U.to(dtype), b.to(dtype))
    return f, x.to(dtype), torch.zeros(batch, d, dtype=dtype)


class ConvCell(torch.nn.Module):
    """P3: z -> GN3(relu(z + GN2(x + conv2(GN1(relu(conv1(z))))))), GroupNorm with 4 groups.

    The ResNet-style DEQ cell of the implicit-layers tutorial (Kolter, Duvenaud, Johnson), with
    input injection ``x`` of the shape of ``z``. The conv weights are N(0, 0.01^2), which makes
    the map contractive enough for plain iteration (rho(J) measured in the output). Not
    ``deqkit.zoo.ResidualCell``: that is the MDEQ block, which normalises before the first
    ReLU (``relu(GN1(conv1 z))`` instead of ``GN1(relu(conv1 z))``); P3's numbers are kept
    comparable with earlier reports by keeping the tutorial's order."""

    def __init__(self, channels: int = 32, groups: int = 4, std: float = 0.01) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.n1 = torch.nn.GroupNorm(groups, channels)
        self.n2 = torch.nn.GroupNorm(groups, channels)
        self.n3 = torch.nn.GroupNorm(groups, channels)
        with torch.no_grad():
            self.conv1.weight.normal_(0.0, std)
            self.conv2.weight.normal_(0.0, std)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = self.n1(torch.relu(self.conv1(z)))
        return self.n3(torch.relu(z + self.n2(x + self.conv2(y))))


def make_conv_problem(
    *, channels: int = 32, size: int = 8, batch: int = 64, seed: int = 0
) -> tuple[ConvCell, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    f = ConvCell(channels)
    f.requires_grad_(False)
    x = torch.randn(batch, channels, size, size)
    return f, x, torch.zeros(batch, channels, size, size)


def rel_residual(f: Callable[..., torch.Tensor], z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample ||f(z) - z|| / ||f(z)|| (one extra call of f)."""
    with torch.no_grad():
        fz = f(z, x)
        num = torch.linalg.vector_norm((fz - z).flatten(1), dim=1)
        den = torch.linalg.vector_norm(fz.flatten(1), dim=1)
    return num / den


def spectral_radius_estimate(
    f: Callable[..., torch.Tensor], z: torch.Tensor, x: torch.Tensor, k: int = 100
) -> torch.Tensor:
    """Per-sample estimate of rho(df/dz) at ``z`` by ||J^k v||^(1/k) with JVPs (float64)."""
    z64, x64 = z.double(), x.double()
    f64 = _double(f)
    v = torch.randn(z64.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    logn = torch.zeros(z64.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for _ in range(k):
            _, v = torch.func.jvp(lambda zz: f64(zz, x64), (z64,), (v,))
            n = torch.linalg.vector_norm(v.flatten(1), dim=1)
            logn += torch.log(n)
            v = v / n.view(-1, *([1] * (v.dim() - 1)))
    return torch.exp(logn / k)


def _double(f: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    if isinstance(f, TanhCell):
        return TanhCell(f.W.double(), f.U.double(), f.b.double())
    if isinstance(f, torch.nn.Module):
        return copy.deepcopy(f).double()
    return f
