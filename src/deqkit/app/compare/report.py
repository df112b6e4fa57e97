"""The comparison table (Markdown), JSON and PNG plots of ``deqkit compare``."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from .models import MODELS

#: The document's table: property -> (standard L layers, Neural ODE, DEQ).
CLAIMS: dict[str, tuple[str, str, str]] = {
    "Forward computation": ("L sequential steps", "Adaptive ODE solve", "Fixed-point solve"),
    "Memory (forward)": ("O(L)", "O(1) (adjoint)", "O(1)"),
    "Memory (backward)": ("O(L)", "O(1) (adjoint)", "O(1)"),
    "Effective depth": ("Fixed (L)", "Adaptive (solver steps)", "Infinite (at equilibrium)"),
    "Expressiveness": ("Unconstrained", "Homeomorphism (no crossing)", "Depends on structure"),
    "Training speed": ("Fast (parallel in batch)", "Slow (sequential ODE)",
                       "Moderate (iterative solve)"),
    "Gradient accuracy": ("Exact", "Approximate (numerical)", "Exact (up to linear solve)"),
}
FAMILIES = ("standard", "ode", "deq")
SHORT = {"resnet": "ResNet", "unrolled": "tied", "node_adjoint": "adjoint",
         "node_direct": "direct", "deq_implicit": "implicit", "deq_jfb": "JFB",
         "deq_phantom": "phantom"}


def fmt_bytes(n: float) -> str:
    if abs(n) < 0.5:  # fitted slopes of flat curves: +-1e-12 B
        return "0 B"
    a = abs(n)
    if a >= 1 << 20:
        return f"{n / (1 << 20):.2f} MiB"
    if a >= 1 << 10:
        return f"{n / 1024:.1f} KiB"
    return f"{n:.0f} B"


def fmt_time(s: float | None) -> str:
    if s is None:
        return "not reached"
    if s >= 1:
        return f"{s:.1f} s"
    if s >= 1e-3:
        return f"{1e3 * s:.1f} ms"
    return f"{1e6 * s:.0f} us"


def _family(key: str) -> str:
    if key in MODELS:
        return MODELS[key][0]
    return "deq" if key.startswith("deq") else "ode" if key.startswith("node") else "standard"


def _keys(res: dict[str, Any], fam: str) -> list[str]:
    return [k for k in res["models"] if MODELS[k][0] == fam]


def _join(parts: list[str]) -> str:
    return "; ".join(p for p in parts if p) or "-"


def build_rows(res: dict[str, Any]) -> list[list[str]]:
    """One row per property of the document's table (+ accuracy, parameters): the claim and
    the measurement for each family."""
    M = res["models"]
    sweep = res.get("memory_sweep", {})
    deepest = max(res["config"]["sweep"]) if res["config"]["sweep"] else None

    def cell(prop: str, fam: str) -> str:
        parts = []
        for k in _keys(res, fam):
            r = M[k]
            s = sweep.get(k)
            if prop == "Forward computation":
                parts.append(f"{SHORT[k]}: {r['forward']['f_evals']:.0f} f evals, "
                             f"{fmt_time(r['forward']['infer_s_per_sample'])}/sample")
            elif prop == "Memory (forward)":
                txt = f"{SHORT[k]}: saved {fmt_bytes(r['memory']['saved_bytes'])}"
                if s:
                    txt += f", {fmt_bytes(s['fit']['saved_bytes']['slope'])}/layer"
                parts.append(txt)
            elif prop == "Memory (backward)":
                txt = f"{SHORT[k]}: peak {fmt_bytes(r['memory']['peak_train_bytes'])}"
                if s:
                    last = s["rows"][-1]["peak_train_bytes"]
                    txt += (f", {fmt_bytes(s['fit']['peak_train_bytes']['slope'])}/layer, "
                            f"{fmt_bytes(last)} @{deepest}")
                parts.append(txt)
            elif prop == "Effective depth":
                d = r["depth"]
                txt = f"{SHORT[k]}: {d['kind']} {d['mean']:.1f}"
                if d["kind"] in ("solver steps", "ODE NFE"):
                    txt += f" (max {d['max']:.0f})"
                parts.append(txt)
            elif prop == "Training speed":
                sp = r["speed"]
                parts.append(f"{SHORT[k]}: {fmt_time(sp['step_s_median'])}/step, "
                             f"{100 * sp['target']:.0f}% val in "
                             f"{fmt_time(sp['time_to_target_s'])}")
            elif prop == "Final test accuracy":
                parts.append(f"{SHORT[k]}: {100 * r['test_acc']:.1f}%")
            elif prop == "Parameters":
                parts.append(f"{SHORT[k]}: {r['params']:,}")
        if prop in ("Memory (forward)", "Memory (backward)"):
            key = "saved_bytes" if prop == "Memory (forward)" else "peak_train_bytes"
            tied = sweep.get("unrolled", {}).get("rows")
            for k, s in sweep.items():
                if _family(k) != fam:
                    continue
                last = s["rows"][-1][key]
                txt = ""
                if k not in M:
                    txt = (f"{k} (sweep only): {fmt_bytes(s['fit'][key]['slope'])}/step, "
                           f"{fmt_bytes(last)} @{deepest}")
                if fam == "deq" and tied and key == "peak_train_bytes":
                    ratio = last / tied[-1][key]
                    txt = (txt or f"{SHORT.get(k, k)} @{deepest}") + (
                        f" = {ratio:.2f}x tied ({100 * (1 - ratio):.0f}% less)")
                if txt:
                    parts.append(txt)
        if prop == "Expressiveness" and "expressiveness" in res:
            e = res["expressiveness"]["models"]
            name = {"standard": "resnet", "ode": "neural_ode", "deq": "deq"}[fam]
            txt = f"y=-x in 1-D: MSE {e[name]['mse']:.3g}"
            if fam == "ode":
                bound = res["expressiveness"]["order_preserving_bound"]
                txt += f" (order-preserving best ~{bound:.3f})"
            parts.append(txt)
        if prop == "Gradient accuracy":
            parts += _grad_cell(res, fam)
        return _join(parts)

    rows = []
    for prop, claims in CLAIMS.items():
        row = [prop]
        for fam, claim in zip(FAMILIES, claims):
            row += [claim, cell(prop, fam)]
        rows.append(row)
    for prop in ("Final test accuracy", "Parameters"):
        row = [prop]
        for fam in FAMILIES:
            row += ["-", cell(prop, fam)]
        rows.append(row)
    return rows


def _grad_cell(res: dict[str, Any], fam: str) -> list[str]:
    g = res.get("gradients", {})
    if fam == "standard":
        return [f"{SHORT[k]}: rel err vs float64 {v['rel_err']:.1e}"
                for k, v in g.get("standard", {}).items()]
    if fam == "ode" and "ode" in g:
        out = []
        for meth, short in (("odeint_adjoint", "adjoint"), ("odeint direct", "direct")):
            pts = [f"{r['rel_err']:.0e}@{r['tol']:.0e}" for r in g["ode"]["rows"]
                   if r["method"] == meth]
            out.append(f"{short} rel err {', '.join(pts)}")
        return out
    if fam == "deq" and "deq" in g:
        rows = g["deq"]["rows"]
        pts = [f"{r['rel_err']:.0e}@{r['tol']:.0e}" for r in rows
               if r["method"] == "implicit GMRES"]
        out = [f"implicit GMRES rel err {', '.join(pts)}"]
        ref = rows[0]["backward_s"]
        for r in rows:
            if r["method"] in ("JFB", "phantom(5, 0.5)"):
                out.append(f"{r['method']}: rel err {r['rel_err']:.2f}, cos {r['cosine']:.3f}, "
                           f"bwd {fmt_time(r['backward_s'])} (Dense ref {fmt_time(ref)})")
        return out
    return []


def markdown_table(rows: list[list[str]]) -> str:
    head = ["Property", "Standard (L layers): claim", "measured", "Neural ODE: claim",
            "measured", "DEQ: claim", "measured"]
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines)


def markdown_report(res: dict[str, Any]) -> str:
    c = res["config"]
    parts = [f"# deqkit compare: {c['data']}",
             "",
             f"width {c['width']}, depth L={c['depth']} (ResNet width {c['resnet_width']}), "
             f"{c['epochs']} epochs, batch {c['batch']}, AdamW lr {c['lr']} cosine, seed "
             f"{c['seed']}, {c['threads']} thread(s); train/val/test "
             f"{c['n_train']}/{c['n_val']}/{c['n_test']}. Total run time "
             f"{res.get('runtime_s', float('nan')):.0f} s.",
             "",
             markdown_table(build_rows(res)),
             "",
             "## Acceptance checks", ""]
    for chk in res.get("checks", []):
        parts.append(f"- [{'x' if chk['met'] else ' '}] {chk['name']}: {chk['detail']}")
    parts += ["", "## Methods", ""]
    parts += [f"- {m}" for m in res.get("methods", [])]
    return "\n".join(parts) + "\n"


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if hasattr(o, "item"):
        return o.item()
    return o


def write_json(res: dict[str, Any], path: str) -> None:
    with open(path, "w") as fh:
        json.dump(_jsonable(res), fh, indent=1)


def write_plots(res: dict[str, Any], out: str) -> list[str]:
    """memory.png (memory vs depth/steps), gradients.png (gradient error vs backward
    tolerance), accuracy.png (validation accuracy vs training wall time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    sweep = res.get("memory_sweep", {})
    if sweep:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for ax, key, title in zip(axes, ("saved_bytes", "peak_train_bytes", "peak_infer_bytes"),
                                  ("saved for backward", "peak, training step",
                                   "peak, inference")):
            for name, s in sweep.items():
                xs = [r["depth"] for r in s["rows"]]
                ax.plot(xs, [r[key] / 1024 for r in s["rows"]], "o-", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("depth L / solver steps / RK4 steps")
            ax.set_ylabel("KiB")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        files.append(os.path.join(out, "memory.png"))
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    g = res.get("gradients", {})
    if "deq" in g or "ode" in g:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        if "deq" in g:
            rows = g["deq"]["rows"]
            pts = [(r["tol"], r["rel_err"]) for r in rows if r["method"] == "implicit GMRES"]
            ax.plot(*zip(*pts), "o-", label="DEQ implicit (GMRES)")
            for r, ls in zip([r for r in rows if r["method"] in ("JFB", "phantom(5, 0.5)")],
                             ("--", ":")):
                ax.axhline(max(r["rel_err"], 1e-17), ls=ls, color="k",
                           label=f"DEQ {r['method']} (no tolerance)")
        if "ode" in g:
            for meth in ("odeint_adjoint", "odeint direct"):
                pts = [(r["tol"], r["rel_err"]) for r in g["ode"]["rows"] if r["method"] == meth]
                ax.plot(*zip(*pts), "s-", label=f"ODE {meth}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("backward / solver tolerance")
        ax.set_ylabel("relative gradient error vs float64 reference")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(os.path.join(out, "gradients.png"))
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for k, r in res["models"].items():
        h = r["history"]
        ax.plot([p["time"] for p in h], [p["val_acc"] for p in h], "o-", ms=3, label=k)
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(os.path.join(out, "accuracy.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


__all__ = ["CLAIMS", "build_rows", "markdown_report", "markdown_table", "write_json",
           "write_plots"]
