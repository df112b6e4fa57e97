"""Smoke test of benchmarks/bench_lm_depth.py (equal-tokens DEQ vs explicit-depth LM)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_lm_depth.py"


def _load():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_lm_depth", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    mod = _load()
    out = tmp_path_factory.mktemp("lmdepth") / "quick.json"
    threads = torch.get_num_threads()
    try:
        res = mod.main(["--quick", "--steps", "4", "--eval-every", "2", "--seeds", "0",
                        "--rows", "L1,deq-implicit,deq-rev", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return mod, res, json.loads(out.read_text())


def test_quick_json_structure(quick_run):
    _, _res, data = quick_run
    assert set(data) >= {"config", "environment", "rows", "table", "seeds", "splits"}
    assert data["config"]["steps"] == 4 and data["seeds"] == [0]
    kinds = [r["kind"] for r in data["rows"]]
    assert kinds == ["L1", "deq-implicit", "deq-rev"]
    for r in data["rows"]:
        for key in ("best_val_bpc", "final_val_bpc", "train_cpu_s", "cpu_ms_per_step"):
            assert math.isfinite(r[key]), (r["kind"], key)
        assert math.isfinite(r["test"]["bpc"]) and 0 < r["test"]["bpc"] < 10
        assert r["memory"]["peak_bytes"] > 0 and r["memory"]["saved_bytes"] > 0
        assert [p["step"] for p in r["curve"]] == [2, 4]
        assert r["best_step"] in (2, 4) and r["tokens"] == 4 * 32 * 64
        if r["kind"].startswith("deq"):
            assert math.isfinite(r["test"]["fwd_rel_res"]) and r["test"]["fwd_steps"] >= 1
            stats = r["train_stats_last10pct"]
            assert math.isfinite(stats["fwd_rel_res"])
        if r["kind"] == "deq-rev":  # the reversible backward reports its reconstruction error
            assert 0 <= stats["bwd_recon_error_max"] < 1e-2
    assert "Medians over seeds" in data["table"] and "Every seed" in data["table"]


def test_quick_is_deterministic(quick_run):
    """Same seed, same batches: a second explicit run gives the same numbers."""
    mod, _, data = quick_run
    args = mod.parse_args(["--quick", "--steps", "4", "--eval-every", "2"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        splits = mod.load_dataset("text", block_size=64, seed=0)
        row = mod.run_row("L1", 0, splits, args, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    first = next(r for r in data["rows"] if r["kind"] == "L1")
    assert row["test"]["bpc"] == pytest.approx(first["test"]["bpc"], abs=1e-6)
    assert [p["val_bpc"] for p in row["curve"]] == pytest.approx(
        [p["val_bpc"] for p in first["curve"]], abs=1e-6)


def test_batch_order_same_for_every_row():
    mod = _load()
    a = mod.batch_order(100, 32, 0, 7)
    b = mod.batch_order(100, 32, 0, 7)
    assert len(a) == 7 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(len(x) == 32 for x in a)
    assert not torch.equal(mod.batch_order(100, 32, 1, 1)[0], a[0])
