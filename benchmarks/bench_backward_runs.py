#!/usr/bin/env python
"""Whole training runs with each backward-pass method: VJPs per step, accuracy, time to target.

Issue 16's target over a whole training run: backward VJPs per step <= 0.5x today's implicit
GMRES at the same final accuracy (within 0.3 points), by any combination of the levers that
are ``TrainConfig`` fields (``adjoint``, ``backward_max_steps``, ``reuse_forward``,
``backward_rtol_from_forward``, ``shine_refine``, ``adjoint_cache`` when the core has it).

Two workloads, each trained to the end once per (configuration, seed):

* ``digits``: ``dk.zoo.ConvDEQ`` on the 8x8 digits with the ``TrainConfig`` defaults
  (``deqkit train`` without flags) and 12 epochs, as ``make demo``'s ``deqkit compare``;
* ``mnist1d``: ``configs/mnist1d_deq.toml`` (read with the CLI's own loader), 20 epochs.

Every run is a subprocess (``train(cfg)`` of ``deqkit.app.train.run``, one torch thread, its
run folder under ``--runs-dir``), ``--jobs`` of them at a time. The subprocesses import
deqkit from a copy of ``src/`` taken when the script starts (``--src`` to choose another),
so edits made to the tree while it runs do not mix into the results. From each run's
``metrics.jsonl`` and ``summary.json``: final test accuracy, backward VJPs per training step
(the linear solve's ``bwd_matvecs`` + the one VJP that carries u into the parameters),
forward ``nfev`` per step, training wall time, the epoch and time at which the validation
accuracy first reaches the workload's target (the baseline's median final validation
accuracy - 0.3 points), ``bwd_grad_error`` and the fraction of unconverged backward solves.
Per configuration: medians over the seeds, ratios to the baseline, and the verdict
"target met" = VJP ratio <= 0.5 and median test accuracy >= baseline's - 0.3 points.

Usage: ``.venv/bin/python benchmarks/bench_backward_runs.py [--quick] [--out PATH]
[--jobs 2] [--seeds-digits 3] [--seeds-mnist1d 2] [--workloads digits,mnist1d]
[--configs 'LABEL;...'] [--merge] [--report-only]`` (full: 60 runs, ~40 min on 2 cores;
--quick: digits, 2 epochs, 1 seed, 3 configurations, < 1 min). ``--merge`` keeps the runs of
an earlier ``--out`` that are not rerun (e.g. the adjoint-cache rows run later);
``--report-only`` rewrites the tables of ``--out`` from its run folders without training.
Writes
``benchmarks/results/bench_backward_runs.json`` and the printed tables to the ``.txt`` next
to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _deqbench import RESULTS_DIR, ROOT, environment, header_lines, md_table

HALF = "half"  # backward_max_steps: half of the workload's own budget
BASELINE = "implicit GMRES (baseline)"
CACHE_FIELD = "adjoint_cache"

# (label, overrides of the workload's settings); HALF is resolved per workload
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    (BASELINE, {}),
    ("GMRES, max_steps/2", {"backward_max_steps": HALF}),
    ("GMRES, max_steps/2 + reuse", {"backward_max_steps": HALF, "reuse_forward": True}),
    ("GMRES + reuse", {"reuse_forward": True}),
    ("GMRES rtol_from_forward", {"backward_rtol_from_forward": True}),
    ("GMRES + reuse + rtol_from_forward",
     {"reuse_forward": True, "backward_rtol_from_forward": True}),
    ("SHINE r0", {"adjoint": "shine", "shine_refine": 0}),
    ("SHINE r2", {"adjoint": "shine", "shine_refine": 2}),
    ("SHINE r4", {"adjoint": "shine", "shine_refine": 4}),
    ("JFB", {"adjoint": "jfb"}),
    ("adjoint cache", {CACHE_FIELD: True}),
    ("adjoint cache, max_steps/2", {CACHE_FIELD: True, "backward_max_steps": HALF}),
]
QUICK_CONFIGS = (BASELINE, "GMRES, max_steps/2 + reuse", "SHINE r0")

DIGITS: dict[str, Any] = {"model": "conv_deq", "data": "digits", "epochs": 12}
MNIST1D_TOML = ROOT / "configs" / "mnist1d_deq.toml"
WORKLOAD_EPOCHS = {"digits": 12, "mnist1d": 20}
ACC_TOL = 0.003  # 0.3 points
VJP_TARGET = 0.5

RUNNER = """
import json, sys
from deqkit.app.config import from_mapping, with_model_preset
from deqkit.app.train.run import train
train(from_mapping(with_model_preset(json.loads(sys.argv[1]))))
"""
FIELDS_PROBE = ("import dataclasses, json; from deqkit.app.config import TrainConfig; "
                "print(json.dumps([f.name for f in dataclasses.fields(TrainConfig)]))")


# ---------------------------------------------------------------------------------------------
# Workloads, configurations, source snapshot
# ---------------------------------------------------------------------------------------------


def workload_settings(name: str, epochs: int | None) -> dict[str, Any]:
    """The settings of a workload (``epochs`` overrides its own)."""
    if name == "digits":
        base = dict(DIGITS)
    else:
        from deqkit.app.config import load_file  # the loader of `deqkit train --config`

        base = load_file(str(MNIST1D_TOML))
    base["epochs"] = epochs or WORKLOAD_EPOCHS[name]
    return base


def resolve(overrides: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` with HALF replaced by half of the workload's backward budget."""
    from deqkit.app.config import default_of

    out = dict(overrides)
    if out.get("backward_max_steps") == HALF:
        full = base.get("backward_max_steps", default_of("backward_max_steps"))
        out["backward_max_steps"] = max(1, int(full) // 2)
    return out


def snapshot_src(runs_dir: Path) -> Path:
    """A copy of the repository's ``src/`` for the subprocesses to import deqkit from."""
    dest = runs_dir / "src"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(ROOT / "src", dest,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest


@functools.cache
def fingerprint(src: Path) -> str:
    """sha256 (12 hex digits) of the ``.py`` files under ``src``: which code a run used."""
    h = hashlib.sha256()
    for f in sorted(src.rglob("*.py")):
        h.update(str(f.relative_to(src)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def child_env(src: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="default")
    return env


def config_fields(src: Path) -> set[str]:
    """The ``TrainConfig`` fields of the deqkit in ``src`` (empty if it does not import)."""
    try:
        out = subprocess.run([sys.executable, "-c", FIELDS_PROBE], env=child_env(src),
                             capture_output=True, text=True, timeout=120, check=True)
        return set(json.loads(out.stdout.strip().splitlines()[-1]))
    except (subprocess.SubprocessError, ValueError, IndexError):
        return set()


def available(overrides: dict[str, Any], fields: set[str]) -> bool:
    return all(k in fields for k in overrides)


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    workload: str
    label: str
    seed: int
    values: dict[str, Any]
    run_dir: Path


def slug(label: str) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in label.lower())
    return "-".join(p for p in keep.split("-") if p)


def run_job(job: Job, src: Path) -> dict[str, Any]:
    """Train one run in a subprocess; its row (metrics, or the error)."""
    if job.run_dir.exists():
        shutil.rmtree(job.run_dir)
    job.run_dir.mkdir(parents=True)
    values = {**job.values, "out": str(job.run_dir), "progress": False, "plots": False,
              "threads": 1, "seed": job.seed}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(values)], cwd=ROOT,
                          env=child_env(src), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (job.run_dir / "stdout.txt").write_text(proc.stdout)
    (job.run_dir / "stderr.txt").write_text(proc.stderr)
    row: dict[str, Any] = {"workload": job.workload, "config": job.label, "seed": job.seed,
                           "settings": values, "rc": proc.returncode,
                           "process_wall_s": round(wall, 2), "run_dir": str(job.run_dir),
                           "src": f"{src} ({fingerprint(src)})",
                           "warnings": warning_lines(proc.stderr)}
    if proc.returncode != 0:
        row["error"] = proc.stderr.strip().splitlines()[-3:]
        return row
    row.update(read_run(job.run_dir))
    return row


def warning_lines(stderr: str) -> list[str]:
    """Distinct warning lines of a run's stderr (at most 5)."""
    seen: list[str] = []
    for line in stderr.splitlines():
        if "Warning" in line and line.strip() not in seen:
            seen.append(line.strip())
    return seen[:5]


def _mean(records: list[dict[str, Any]], key: str) -> float | None:
    vals = [float(r[key]) for r in records if key in r and r[key] is not None]
    vals = [v for v in vals if not math.isnan(v)]
    return statistics.fmean(vals) if vals else None


def read_run(run_dir: Path) -> dict[str, Any]:
    """Per-run numbers from ``metrics.jsonl`` (per-epoch records) and ``summary.json``."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    recs = [r for r in recs if "val_acc" in r and "step" not in r]  # epoch records only
    summary = json.loads((run_dir / "summary.json").read_text())
    matvecs = _mean(recs, "train_bwd_matvecs") or 0.0  # none recorded: no linear solve (JFB)
    conv = _mean(recs, "train_bwd_converged")
    return {
        "test_acc": summary["test_acc"], "final_val_acc": summary.get("final_val_acc"),
        "train_time": summary["train_time"], "train_cpu_time": summary["train_cpu_time"],
        "bwd_matvecs_per_step": matvecs, "vjps_per_step": matvecs + 1.0,
        "bwd_steps": _mean(recs, "train_bwd_steps"), "nfev_per_step": _mean(recs, "train_nfev"),
        "fwd_steps": _mean(recs, "train_fwd_steps"),
        "fwd_converged": _mean(recs, "train_fwd_converged"),
        "bwd_unconverged": None if conv is None else 1.0 - conv,
        "bwd_grad_error": _mean(recs, "train_bwd_grad_error"),
        "curve": [{"epoch": r["epoch"], "val_acc": r["val_acc"], "train_time": r["train_time"],
                   "train_cpu_time": r.get("train_cpu_time"),
                   "bwd_matvecs": r.get("train_bwd_matvecs"), "nfev": r.get("train_nfev")}
                  for r in recs],
    }


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------


def _median(vals: list[float | None]) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


Reach = tuple[int | None, float | None, float | None]


def reach(row: dict[str, Any], target: float) -> Reach:
    """The first epoch whose validation accuracy >= target, with the cumulative training wall
    and CPU seconds at its end (Nones: never)."""
    for r in row.get("curve", []):
        if r["val_acc"] >= target - 1e-9:
            return r["epoch"], r["train_time"], r.get("train_cpu_time")
    return None, None, None


def aggregate(rows: list[dict[str, Any]], workload: str) -> list[dict[str, Any]]:
    """Per configuration of ``workload``: medians over its seeds and the verdict."""
    mine = [r for r in rows if r["workload"] == workload]
    base = [r for r in mine if r["config"] == BASELINE and r["rc"] == 0]
    if not base:
        return []
    base_test = statistics.median(r["test_acc"] for r in base)
    base_vjps = statistics.median(r["vjps_per_step"] for r in base)
    target = statistics.median(r["final_val_acc"] for r in base) - ACC_TOL
    out = []
    for label in [c for c, _ in CONFIGS if any(r["config"] == c for r in mine)]:
        runs = [r for r in mine if r["config"] == label]
        out.append(_agg_config(label, runs, base_test, base_vjps, target))
    return out


def _agg_config(label: str, runs: list[dict[str, Any]], base_test: float, base_vjps: float,
                target: float) -> dict[str, Any]:
    ok = [r for r in runs if r["rc"] == 0]
    hits = [reach(r, target) for r in ok]
    med: dict[str, Any] = {k: _median([r.get(k) for r in ok]) for k in (
        "test_acc", "vjps_per_step", "bwd_matvecs_per_step", "nfev_per_step", "train_time",
        "train_cpu_time", "bwd_grad_error", "bwd_unconverged", "fwd_converged")}
    agg = {"config": label, "seeds": sorted(r["seed"] for r in ok),
           "failed_seeds": sorted(r["seed"] for r in runs if r["rc"] != 0),
           **med, "val_target": target,
           "reached_target": sum(h[0] is not None for h in hits),
           "epoch_to_target": _median_inf([h[0] for h in hits]),
           "time_to_target": _median_inf([h[1] for h in hits]),
           "cpu_time_to_target": _median_inf([h[2] for h in hits])}
    if med["test_acc"] is None:
        return {**agg, "vjp_ratio": None, "acc_diff_points": None, "target_met": False}
    agg["vjp_ratio"] = med["vjps_per_step"] / base_vjps
    agg["acc_diff_points"] = 100.0 * (med["test_acc"] - base_test)
    agg["target_met"] = bool(agg["vjp_ratio"] <= VJP_TARGET + 1e-9
                             and agg["acc_diff_points"] >= -100.0 * ACC_TOL - 1e-9)
    return agg


def _median_inf(vals: list[float | None]) -> float | None:
    """Median where None (never reached) counts as infinity; None if the median is."""
    if not vals:
        return None
    m = statistics.median([math.inf if v is None else v for v in vals])
    return None if math.isinf(m) else m


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def agg_table(aggs: list[dict[str, Any]]) -> str:
    rows = []
    for a in aggs:
        seeds = str(len(a["seeds"])) + (f" ({len(a['failed_seeds'])} failed)"
                                        if a["failed_seeds"] else "")
        rows.append([
            a["config"], seeds, _f(a["test_acc"] and 100 * a["test_acc"], ".1f"),
            _f(a["acc_diff_points"], "+.1f"), _f(a["vjps_per_step"], ".2f"),
            _f(a["vjp_ratio"], ".2f") + "x", _f(a["nfev_per_step"], ".1f"),
            f"{_f(a['train_time'], '.1f')} / {_f(a['train_cpu_time'], '.1f')}",
            f"{_f(a['epoch_to_target'], '.0f')} / {_f(a['time_to_target'], '.1f')} / "
            f"{_f(a['cpu_time_to_target'], '.1f')} ({a['reached_target']}/{len(a['seeds'])})",
            _f(a["bwd_unconverged"], ".3f"), _f(a["bwd_grad_error"], ".1e"),
            "**yes**" if a["target_met"] else "no"])
    return md_table(["config", "seeds", "test acc %", "Δ acc (pts)", "VJPs/step",
                     "/ baseline", "fwd nfev/step", "train s wall / CPU",
                     "val target: epoch / wall s / CPU s",
                     "bwd unconverged", "bwd grad_error", "target met"], rows)


def runs_table(rows: list[dict[str, Any]], workload: str, target: float | None) -> str:
    out = []
    order = {c: i for i, (c, _) in enumerate(CONFIGS)}
    for r in sorted((r for r in rows if r["workload"] == workload),
                    key=lambda r: (order.get(r["config"], 99), r["seed"])):
        if r["rc"] != 0:
            out.append([r["config"], r["seed"], f"FAILED rc {r['rc']}: "
                        f"{' '.join(r.get('error', []))[-120:]}", *["-"] * 7])
            continue
        ep, t, c = reach(r, target) if target is not None else (None, None, None)
        out.append([r["config"], r["seed"], f"{100 * r['test_acc']:.1f}",
                    f"{100 * r['final_val_acc']:.1f}", f"{r['vjps_per_step']:.2f}",
                    _f(r["nfev_per_step"], ".1f"),
                    f"{r['train_time']:.1f} / {r['train_cpu_time']:.1f}",
                    f"{_f(ep, 'd')} / {_f(t, '.1f')} / {_f(c, '.1f')}",
                    _f(r["bwd_unconverged"], ".3f"),
                    len(r["warnings"])])
    return md_table(["config", "seed", "test acc %", "final val %", "VJPs/step",
                     "fwd nfev/step", "train s wall / CPU", "val target: epoch / wall s / CPU s",
                     "bwd unconverged",
                     "warning lines"], out)


def report(res: dict[str, Any]) -> str:
    buf = io.StringIO()
    with redirect_stdout(buf):
        print(f"# Whole training runs per backward method ({res['mode']} run)\n")
        env = res["env"]
        print("\n".join(header_lines(env)[:2]))
        print(f"- load average at start: {env['loadavg_at_start']} (other processes share the "
              "machine; see the note on wall times at the end)")
        print(f"- deqkit imported by the runs from: {', '.join(sorted(res['srcs']))}")
        print(f"- `{CACHE_FIELD}` in TrainConfig: {res['cache_available']}")
        for wl, aggs in res["aggregates"].items():
            _workload_section(res, wl, aggs)
        print(footer(res))
    return buf.getvalue()


def _workload_section(res: dict[str, Any], wl: str, aggs: list[dict[str, Any]]) -> None:
    s = res["workloads"][wl]
    print(f"\n## {wl}: {s['description']}\n")
    print(f"settings: {json.dumps(s['settings'])}; seeds {s['seeds']}")
    target = aggs[0]["val_target"] if aggs else None
    if target is not None:
        print(f"validation target: {100 * target:.2f}% (baseline median final val accuracy "
              "- 0.3 points)\n")
    print(agg_table(aggs))
    print(f"\n### {wl}: runs\n")
    print(runs_table(res["runs"], wl, target))


def footer(res: dict[str, Any]) -> str:
    return (
        "\nVJPs/step: mean over the run's training steps of the backward linear solve's "
        "products with J^T (`bwd_matvecs`; SHINE counts the one residual product it reports) "
        "+ 1, the VJP that carries u into the parameters (JFB: that one only). Medians over "
        "the seeds; '/ baseline' and 'Δ acc' against the baseline's medians; 'target met' = "
        f"VJPs/step <= {VJP_TARGET}x the baseline and median test accuracy >= the baseline's "
        "- 0.3 points (digits: 250 test and 250 val samples, one sample = 0.4 points, so there "
        "it means no test sample lost; MNIST-1D: 1000 test, 500 val). 'val target': median "
        "over the seeds of the first epoch whose validation accuracy reaches the target, and "
        "the cumulative training wall and CPU seconds at its end (never = infinity; in "
        "brackets, the seeds that reached it). 'train s wall / CPU': the training epochs' "
        "wall time and process CPU time (evaluations excluded). "
        "'bwd unconverged': fraction of backward solves that missed their tolerance; "
        "'bwd grad_error': the adjoint's a-posteriori estimate of the relative error of u "
        "(mean over the run; '-' where not reported).\n"
        f"Wall times were measured with {res['jobs']} runs in parallel and other processes "
        "possibly sharing the 2 cores, so they are indicative only (a run's CPU time is less "
        "affected: it does not count the time waiting for a core); VJPs and accuracies are "
        "deterministic per seed. "
        f"Load average at end: {res.get('loadavg_end')}; total {res.get('total_s', 0):.0f} s.")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="digits only, 2 epochs, 1 seed, 3 configurations (< 1 min)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "bench_backward_runs.json"))
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    ap.add_argument("--seeds-digits", type=int, default=3)
    ap.add_argument("--seeds-mnist1d", type=int, default=2)
    ap.add_argument("--workloads", default="digits,mnist1d")
    ap.add_argument("--configs", default=None, help="';'-separated labels or their slugs "
                    "(e.g. 'shine-r0;adjoint-cache'; default: all)")
    ap.add_argument("--epochs", type=int, default=None, help="override every workload's")
    ap.add_argument("--runs-dir", default="/tmp/bench_backward_runs")
    ap.add_argument("--src", default=None, help="folder to import deqkit from (default: a "
                    "copy of the repository's src/ taken at start)")
    ap.add_argument("--report-only", action="store_true",
                    help="no training: re-read the run folders of an existing --out and "
                    "rewrite its tables")
    ap.add_argument("--merge", action="store_true",
                    help="keep the runs of an existing --out that are not rerun")
    a = ap.parse_args(argv)
    if a.quick:
        a.workloads, a.seeds_digits, a.epochs = "digits", 1, a.epochs or 2
        a.configs = a.configs or ";".join(QUICK_CONFIGS)
    return a


def selected(configs: str | None) -> set[str]:
    """The labels named by ``--configs`` (labels or slugs, ';'-separated; None: all)."""
    labels = {c: slug(c) for c, _ in CONFIGS}
    names = [n.strip() for n in configs.split(";")] if configs else []
    unknown = [n for n in names if n not in labels and n not in labels.values()]
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; choose from {list(labels.values())}")
    return {c for c, s in labels.items() if not names or c in names or s in names}


def plan(a: argparse.Namespace, fields: set[str], runs_dir: Path) -> tuple[list[Job], list[str]]:
    """The jobs to run (MNIST-1D first: the long ones) and the labels left out."""
    wanted = selected(a.configs)
    jobs, missing = [], []
    for wl in sorted(a.workloads.split(","), key=lambda w: w != "mnist1d"):
        base = workload_settings(wl, a.epochs)
        nseeds = a.seeds_digits if wl == "digits" else a.seeds_mnist1d
        for label, over in CONFIGS:
            if label not in wanted:
                continue
            if not available(over, fields):
                missing += [label] if label not in missing else []
                continue
            jobs += [Job(wl, label, seed, {**base, **resolve(over, base)},
                         runs_dir / wl / slug(label) / f"seed{seed}") for seed in range(nseeds)]
    return jobs, missing


def execute(jobs: list[Job], src: Path, n: int) -> list[dict[str, Any]]:
    def one(job: Job) -> dict[str, Any]:
        row = run_job(job, src)
        status = "ok" if row["rc"] == 0 else f"FAILED rc {row['rc']}"
        extra = (f"test {row['test_acc']:.3f}  VJPs/step {row['vjps_per_step']:.2f}  "
                 f"train {row['train_time']:.1f} s" if row["rc"] == 0 else "")
        print(f"  [{job.workload} | {job.label} | seed {job.seed}] {status}  {extra}  "
              f"({row['process_wall_s']:.0f} s wall)", file=sys.stderr, flush=True)
        return row

    with ThreadPoolExecutor(max_workers=max(1, n)) as pool:
        return list(pool.map(one, jobs))


def run_all(a: argparse.Namespace, src: Path, runs_dir: Path) -> tuple[list[dict], bool]:
    """Every job; the adjoint-cache rows, when the field is missing at start, are retried
    at the end with a fresh copy of src/ (the field may have landed meanwhile)."""
    fields = config_fields(src)
    if not fields:
        raise SystemExit(f"deqkit from {src} does not import (see `PYTHONPATH={src} python -c "
                         "'import deqkit.app.config'`)")
    jobs, missing = plan(a, fields, runs_dir)
    print(f"{len(jobs)} runs, {a.jobs} at a time; not available now: {missing or 'none'}",
          file=sys.stderr, flush=True)
    rows = execute(jobs, src, a.jobs)
    if missing and a.src is None:
        late = snapshot_src(runs_dir / "late")
        fields = config_fields(late)
        wanted = argparse.Namespace(**{**vars(a), "configs": ";".join(missing)})
        jobs, still = plan(wanted, fields, runs_dir)
        print(f"late check: {len(jobs)} runs now available; still missing: {still or 'none'}",
              file=sys.stderr, flush=True)
        rows += execute(jobs, late, a.jobs)
    return rows, CACHE_FIELD in fields


def merge(rows: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return rows
    new = {(r["workload"], r["config"], r["seed"]) for r in rows}
    old = json.loads(path.read_text()).get("runs", [])
    return [r for r in old if (r["workload"], r["config"], r["seed"]) not in new] + rows


def describe(a: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for wl in a.workloads.split(","):
        desc = ("ConvDEQ on digits, TrainConfig defaults" if wl == "digits" else
                f"ConvDEQ on MNIST-1D, {MNIST1D_TOML.relative_to(ROOT)}")
        seeds = a.seeds_digits if wl == "digits" else a.seeds_mnist1d
        out[wl] = {"description": desc, "settings": workload_settings(wl, a.epochs),
                   "seeds": list(range(seeds))}
    return out


def reread(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """An earlier result and its runs, re-read from their run folders where still there."""
    old = json.loads(path.read_text())
    for r in old["runs"]:
        if r["rc"] == 0 and (Path(r["run_dir"]) / "summary.json").exists():
            r.update(read_run(Path(r["run_dir"])))
    return old, old["runs"]


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    t0 = time.perf_counter()
    if a.report_only:
        old, rows = reread(Path(a.out))
        a = argparse.Namespace(**{**vars(a), **old["args"], "report_only": True, "out": a.out})
        return write(a, old["env"], rows, old["cache_available"],
                     {"loadavg_end": old.get("loadavg_end"), "total_s": old.get("total_s")})
    env = environment()
    runs_dir = Path(a.runs_dir) / ("quick" if a.quick else "full")
    runs_dir.mkdir(parents=True, exist_ok=True)
    src = Path(a.src) if a.src else snapshot_src(runs_dir)
    rows, cache_ok = run_all(a, src, runs_dir)
    if a.merge:
        rows = merge(rows, Path(a.out))
    return write(a, env, rows, cache_ok,
                 {"loadavg_end": [round(v, 2) for v in os.getloadavg()],
                  "total_s": time.perf_counter() - t0})


def write(a: argparse.Namespace, env: dict[str, Any], rows: list[dict[str, Any]],
          cache_ok: bool, end: dict[str, Any]) -> int:
    """Aggregate, print the tables, write the JSON and the .txt."""
    workloads = sorted({r["workload"] for r in rows}, key=lambda w: w != "digits")
    res: dict[str, Any] = {
        "env": {**env, "threads": 1}, "mode": "quick" if a.quick else "full",
        "args": vars(a), "jobs": a.jobs, "configs": [[c, o] for c, o in CONFIGS],
        "workloads": describe(argparse.Namespace(**{**vars(a),
                                                    "workloads": ",".join(workloads)})),
        "cache_available": cache_ok, "srcs": sorted({r["src"] for r in rows}), "runs": rows,
        "aggregates": {wl: aggregate(rows, wl) for wl in workloads}, **end}
    text = report(res)
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    out.with_suffix(".txt").write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
