"""GPU throughput of deqkit's solvers and a DEQ training step, in one short run.

Meant for a lent GPU machine (one call of a few minutes): measures, on CUDA when present,

* forward solves of a tanh cell (d=1024, batch 512) and a conv cell (64 channels, 16x16,
  batch 256) with Picard and Anderson at rtol 1e-4: f evaluations, median time, samples/s,
  and the overhead time / (nfev x time of one f call);
* one training step (forward + implicit backward) of ``dk.zoo.ConvDEQ`` on 32x32 images,
  float32 and bf16 autocast: median time and images/s;

prints a Markdown table and writes ``benchmarks/results/gpu.json``. ``--device cpu --quick``
runs the same code path on the CPU (a smoke test; numbers are not GPU numbers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import deqkit as dk


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device: torch.device, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class TanhCell(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        with torch.no_grad():
            self.lin.weight.mul_(0.9 / torch.linalg.matrix_norm(self.lin.weight, 2))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z) + x)


class ConvCell(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        self.n1, self.n2, self.n3 = nn.GroupNorm(8, c), nn.GroupNorm(8, c), nn.GroupNorm(8, c)
        for conv in (self.c1, self.c2):
            nn.init.normal_(conv.weight, std=0.01)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = self.n1(torch.relu(self.c1(z)))
        return self.n3(torch.relu(z + self.n2(x + self.c2(y))))


def solver_rows(device: torch.device, quick: bool, repeats: int) -> list[dict]:
    torch.manual_seed(0)  # the same cells and inputs in every run (runs are then comparable)
    rows = []
    d, b = (256, 128) if quick else (1024, 512)
    c, s, bc = (16, 8, 32) if quick else (64, 16, 256)
    problems = {
        f"tanh d={d} B={b}": (TanhCell(d), torch.randn(b, d), torch.zeros(b, d)),
        f"conv {c}ch {s}x{s} B={bc}": (ConvCell(c), torch.randn(bc, c, s, s),
                                        torch.zeros(bc, c, s, s)),
    }
    for name, (cell, x, z0) in problems.items():
        cell = cell.to(device).requires_grad_(False)
        x, z0 = x.to(device), z0.to(device)
        with torch.no_grad():
            t_f = _median_time(lambda: cell(z0, x), device, 3 * repeats)  # noqa: B023
            for sname, solver in (("Picard", dk.Picard(rtol=1e-4, atol=0)),
                                  ("Anderson(m=5)", dk.Anderson(rtol=1e-4, atol=0))):
                def solve():
                    return dk.fixed_point(cell, z0, solver, args=(x,), max_steps=100,  # noqa: B023
                                          throw=False)

                sol = solve()
                t = _median_time(solve, device, repeats)
                nfev = int(sol.stats["nfev"])
                rows.append({"problem": name, "solver": sname, "nfev": nfev,
                             "result": sol.result.name, "time_ms": 1e3 * t,
                             "samples_per_s": x.shape[0] / t, "t_f_ms": 1e3 * t_f,
                             "overhead": t / (nfev * t_f)})
    return rows


def training_rows(device: torch.device, quick: bool, repeats: int) -> list[dict]:
    rows = []
    size, batch, ch = (8, 32, 16) if quick else (32, 128, 64)
    for precision in ("float32", "bf16-autocast", "fp16-autocast+GradScaler"):
        torch.manual_seed(0)
        model = dk.zoo.ConvDEQ((3, size, size), 10, channels=ch).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        dtype = {"float32": None, "bf16-autocast": torch.bfloat16}.get(precision, torch.float16)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)

        def step():
            with torch.autocast(device.type, dtype=dtype or torch.float32,  # noqa: B023
                                enabled=dtype is not None):  # noqa: B023
                loss = nn.functional.cross_entropy(model(x).float(), y)  # noqa: B023
            opt.zero_grad(set_to_none=True)  # noqa: B023
            scaler.scale(loss).backward()  # noqa: B023
            scaler.step(opt)  # noqa: B023
            scaler.update()  # noqa: B023

        solver = None  # the model's own; under autocast, tolerances above the dtype's eps
        if dtype is not None:  # (bf16 2^-7, fp16 2^-10)
            solver = dk.Anderson(rtol=2e-2 if dtype is torch.bfloat16 else 2e-3, atol=0)
        with model.deq.overrides(solver=solver):
            t = _median_time(step, device, repeats)
        st = model.deq.last_solution.stats
        rows.append({"model": f"ConvDEQ {ch}ch {size}x{size}", "precision": precision,
                     "batch": batch, "step_ms": 1e3 * t, "images_per_s": batch / t,
                     "fwd_steps": float(st["nstep"].float().mean())})
    return rows


def step_rows(device: torch.device, quick: bool, repeats: int) -> list[dict]:
    """Where an Anderson step's time goes on this device: the batched small solve (on the
    device, and copied to the CPU and back), the Gram row, the mixing, one cell call."""
    w, d, m = (128, 256, 5) if quick else (512, 1024, 5)
    A = torch.randn(w, m, m, dtype=torch.float64, device=device)
    A = A @ A.transpose(1, 2) + torch.eye(m, dtype=torch.float64, device=device)
    ones = torch.ones(w, m, 1, dtype=torch.float64, device=device)
    G = torch.randn(w, m, d, device=device)
    r = torch.randn(w, d, device=device)
    alpha = torch.randn(w, 1, m, device=device)

    def host_solve() -> torch.Tensor:
        return torch.linalg.solve_ex(A.cpu(), ones.cpu())[0].to(device)

    cases = {
        "linalg.solve_ex on device (W x 5 x 5, f64)": lambda: torch.linalg.solve_ex(A, ones),
        "same, via the host (copy, CPU solve, copy back)": host_solve,
        "Gram row matmul (W x 1 x D @ W x D x 5)":
            lambda: torch.matmul(r.unsqueeze(1), G.transpose(1, 2)),
        "mixing bmm (W x 1 x 5 @ W x 5 x D)": lambda: torch.bmm(alpha, G),
        "host sync (tolist of 2 flags)": lambda: torch.stack(((r > 0).any(),
                                                              (r > 0).all())).tolist(),
    }
    rows = []
    for name, fn in cases.items():
        t = _median_time(fn, device, 10 * repeats)
        rows.append({"op": name, "W": w, "D": d, "time_us": 1e6 * t})
    return rows


def _table(rows: list[dict]) -> str:
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v)
                                     for v in r.values()) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes (CPU smoke test)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu.json"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":  # a smoke run: one thread, as every CPU benchmark here
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"deqkit {dk.__version__}, torch {torch.__version__}, device {name}\n")
    solves = solver_rows(device, args.quick, args.repeats)
    print(_table(solves), "\n")
    train = training_rows(device, args.quick, args.repeats)
    print(_table(train), "\n")
    steps = step_rows(device, args.quick, args.repeats)
    print(_table(steps))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"device": name, "torch": torch.__version__, "quick": args.quick,
                   "solves": solves, "training": train, "anderson_step_parts": steps}, fh,
                  indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
