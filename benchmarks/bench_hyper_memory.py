"""Memory benchmark: what one training step of a ``dk.nn.HyperNetwork`` keeps for backward.

Target: a width-``W`` MLP of depth 4, ``Sequential(Linear(W, W), Tanh) x 3 + Linear(W, W)``
(``P = 4 (W^2 + W)`` generated weights), ``W`` in {256, 512, 1024}; one shared context of size
8, a batch of 32 inputs, trunk ``hidden=16, depth=2``.  Two modes of the same hypernetwork
(same parameters):

* ``unchunked``  -- ``chunk_size=None``: one head matmul, autograd keeps all generated weights;
* ``chunked``    -- ``chunk_size=65536``: head evaluated blockwise, each layer's weights
  generated inside a ``torch.utils.checkpoint`` segment and regenerated in the backward.

Per mode it records

* ``saved_bytes``: bytes of the distinct non-parameter storages packed by
  ``torch.autograd.graph.saved_tensors_hooks`` during the forward, i.e. what stays alive for
  the backward (the peak of the saved set: nothing saved is freed before the backward).  The
  checkpoint's own saved tensors are not seen by the outer hooks; what it holds are the
  trunk features and each layer's input (counted separately below; the inputs of layers
  2-4 are the Tanh outputs, already in ``saved_bytes``);
* ``ckpt_inputs_bytes``: bytes of the layer inputs held by the checkpoints (chunked only);
* ``recompute_bytes``: the largest single layer's generated weights, which the chunked
  backward rematerialises transiently (one layer at a time);
* ``step_ms``: median wall time of one training step (forward + backward + SGD step) over
  ``--repeats`` steps after a warm-up, on 1 thread.

Prints a Markdown table and writes ``benchmarks/results/bench_hyper_memory.json``.
Usage: ``python benchmarks/bench_hyper_memory.py [--quick] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from deqkit.nn import HyperNetwork

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CONTEXT_DIM, BATCH, HIDDEN, CHUNK = 8, 32, 16, 65536


def target_mlp(width: int, depth: int = 4) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(width, width))
        if i < depth - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def saved_bytes(hyper: HyperNetwork, c: torch.Tensor, x: torch.Tensor) -> int:
    params = {p.untyped_storage().data_ptr() for p in hyper.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = hyper(c, x)
    out.square().mean().backward()
    hyper.zero_grad(set_to_none=True)
    return sum(seen.values())


def step_ms(hyper: HyperNetwork, c, x, repeats: int) -> float:
    opt = torch.optim.SGD(hyper.parameters(), lr=1e-4)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        loss = hyper(c, x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # first step is a warm-up
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def run(width: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    hyper = HyperNetwork(target_mlp(width), CONTEXT_DIM, hidden=HIDDEN, depth=2)
    c, x = torch.randn(CONTEXT_DIM), torch.randn(BATCH, width)
    n_param_bytes = sum(p.numel() * p.element_size() for p in hyper.parameters())
    layer_bytes = 4 * (width * width + width)
    rows = []
    for mode, chunk in (("unchunked", None), ("chunked", CHUNK)):
        hyper.chunk_size = chunk
        rows.append({
            "width": width,
            "mode": mode,
            "generated_weights": hyper.num_generated,
            "generated_bytes": 4 * hyper.num_generated,
            "param_bytes": n_param_bytes,
            "saved_bytes": saved_bytes(hyper, c, x),
            "ckpt_inputs_bytes": 0 if chunk is None else 4 * 4 * BATCH * width,
            "recompute_bytes": 0 if chunk is None else layer_bytes,
            "step_ms": step_ms(hyper, c, x, repeats),
        })  # fmt: skip
    return rows


def mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="W in {256, 512} only")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    widths = (256, 512) if args.quick else (256, 512, 1024)
    rows = [r for w in widths for r in run(w, args.repeats)]

    print(f"HyperNetwork, target MLP depth 4, batch {BATCH}, hidden {HIDDEN}, chunk {CHUNK}\n")
    print(
        "| W | mode | generated (MiB) | saved for backward (MiB) | ratio | ckpt inputs (MiB) "
        "| recomputed layer (MiB) | step (ms) |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    base = {}
    for r in rows:
        if r["mode"] == "unchunked":
            base[r["width"]] = r["saved_bytes"]
        ratio = r["saved_bytes"] / base[r["width"]]
        r["saved_ratio_vs_unchunked"] = ratio
        print(
            f"| {r['width']} | {r['mode']} | {mib(r['generated_bytes'])} "
            f"| {mib(r['saved_bytes'])} | {ratio:.3f} | {mib(r['ckpt_inputs_bytes'])} "
            f"| {mib(r['recompute_bytes'])} | {r['step_ms']:.1f} |"
        )
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / "bench_hyper_memory.json"
    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "context_dim": CONTEXT_DIM,
        "batch": BATCH,
        "hidden": HIDDEN,
        "chunk_size": CHUNK,
        "repeats": args.repeats,
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
