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
         "deq_phantom": "phantom", "deq_reuse": "reuse", "deq_shine": "SHINE",
         "deq_reversible": "reversible"}


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
    rows = []
    for prop, claims in CLAIMS.items():
        row = [prop]
        for fam, claim in zip(FAMILIES, claims):
            row += [claim, _cell(res, prop, fam)]
        rows.append(row)
    for prop in ("Final test accuracy", "Parameters"):
        row = [prop]
        for fam in FAMILIES:
            row += ["-", _cell(res, prop, fam)]
        rows.append(row)
    return rows


def _cell(res: dict[str, Any], prop: str, fam: str) -> str:
    """The measured cell of property ``prop`` for family ``fam``."""
    sweep = res.get("memory_sweep", {})
    deepest = max(res["config"]["sweep"]) if res["config"]["sweep"] else None
    parts = [_model_part(prop, k, res["models"][k], sweep.get(k), deepest)
             for k in _keys(res, fam)]
    if prop in ("Memory (forward)", "Memory (backward)"):
        parts += _sweep_parts(res, prop, fam, deepest)
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


def _model_part(prop: str, k: str, r: dict[str, Any], s: dict[str, Any] | None,
                deepest: int | None) -> str:
    """Model ``k``'s part of the ``prop`` cell ("" when the row takes nothing from it)."""
    if prop == "Forward computation":
        return (f"{SHORT[k]}: {r['forward']['f_evals']:.0f} f evals, "
                f"{fmt_time(r['forward']['infer_s_per_sample'])}/sample")
    if prop == "Memory (forward)":
        txt = f"{SHORT[k]}: saved {fmt_bytes(r['memory']['saved_bytes'])}"
        return txt + (f", {fmt_bytes(s['fit']['saved_bytes']['slope'])}/layer" if s else "")
    if prop == "Memory (backward)":
        txt = f"{SHORT[k]}: peak {fmt_bytes(r['memory']['peak_train_bytes'])}"
        if s:
            txt += (f", {fmt_bytes(s['fit']['peak_train_bytes']['slope'])}/layer, "
                    f"{fmt_bytes(s['rows'][-1]['peak_train_bytes'])} @{deepest}")
        return txt
    if prop == "Effective depth":
        d = r["depth"]
        txt = f"{SHORT[k]}: {d['kind']} {d['mean']:.1f}"
        return txt + (f" (max {d['max']:.0f})" if d["kind"] in ("solver steps", "ODE NFE")
                      else "")
    if prop == "Training speed":
        sp = r["speed"]
        return (f"{SHORT[k]}: {fmt_time(sp['step_s_median'])}/step, "
                f"{100 * sp['target']:.0f}% val in {fmt_time(sp['time_to_target_s'])}")
    if prop == "Final test accuracy":
        return f"{SHORT[k]}: {100 * r['test_acc']:.1f}%"
    if prop == "Parameters":
        return f"{SHORT[k]}: {r['params']:,}"
    return ""


def _sweep_parts(res: dict[str, Any], prop: str, fam: str, deepest: int | None) -> list[str]:
    """Memory sweep entries of family ``fam``: sweep-only series, and the DEQs' peak as a
    fraction of the tied network's at the deepest point."""
    key = "saved_bytes" if prop == "Memory (forward)" else "peak_train_bytes"
    sweep = res.get("memory_sweep", {})
    tied = sweep.get("unrolled", {}).get("rows")
    parts = []
    for k, s in sweep.items():
        if _family(k) != fam:
            continue
        last = s["rows"][-1][key]
        txt = ""
        if k not in res["models"]:
            txt = (f"{k} (sweep only): {fmt_bytes(s['fit'][key]['slope'])}/step, "
                   f"{fmt_bytes(last)} @{deepest}")
        if fam == "deq" and tied and key == "peak_train_bytes":
            ratio = last / tied[-1][key]
            txt = (txt or f"{SHORT.get(k, k)} @{deepest}") + (
                f" = {ratio:.2f}x tied ({100 * (1 - ratio):.0f}% less)")
        if txt:
            parts.append(txt)
    return parts


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
            if r["method"] in ("JFB", "phantom(5, 0.5)", "SHINE(2)"):
                out.append(f"{r['method']}: rel err {r['rel_err']:.2f}, cos {r['cosine']:.3f}, "
                           f"bwd {fmt_time(r['backward_s'])} (Dense ref {fmt_time(ref)})")
        plain = {r["tol"]: r for r in rows if r["method"] == "implicit GMRES"}
        for r in rows:
            if r["method"] == "implicit GMRES, reuse" and "matvecs" in r:
                base = plain.get(r["tol"], {}).get("matvecs")
                vs = f" (plain GMRES: {base})" if base is not None else ""
                out.append(f"GMRES reusing the forward: rel err {r['rel_err']:.0e}@"
                           f"{r['tol']:.0e}, {r['matvecs']} products{vs}")
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


#: Plot style of every series: (label, colour, marker, line style). Distinct markers and dash
#: patterns keep series that measure the same bytes visible on top of each other.
STYLE: dict[str, tuple[str, str, str, str]] = {
    "resnet": ("ResNet (L blocks)", "tab:blue", "o", "-"),
    "unrolled": ("tied, unrolled L steps", "tab:cyan", "s", "-"),
    "node_direct": ("Neural ODE, direct backprop", "tab:orange", "^", "-"),
    "node_adjoint": ("Neural ODE, adjoint", "tab:brown", "v", "--"),
    "deq_implicit": ("DEQ Anderson, implicit GMRES", "tab:red", "D", "-"),
    "deq_implicit_picard": ("DEQ Picard, implicit GMRES", "tab:pink", "P", "--"),
    "deq_neumann_picard": ("DEQ Picard, implicit Neumann", "tab:purple", "X", ":"),
    "deq_jfb": ("DEQ, JFB", "tab:green", "<", "-."),
    "deq_phantom": ("DEQ, phantom(5, 0.5)", "tab:olive", ">", ":"),
    "deq_reuse": ("DEQ, implicit reusing the forward", "tab:red", "h", ":"),
    "deq_shine": ("DEQ, SHINE", "tab:green", "*", "--"),
    "deq_reversible": ("DEQ, reversible", "tab:gray", "d", "-"),
}


def _style(name: str, i: int, label: str | None = None) -> dict[str, Any]:
    """Matplotlib keywords of series ``name``, the ``i``-th drawn: hollow markers that shrink
    and lines that thin with ``i``, so later series sit visibly inside earlier ones."""
    default, color, marker, ls = STYLE.get(name, (name, f"C{i % 10}", "o", "-"))
    return dict(label=label or default, color=color, marker=marker, ls=ls,
                ms=max(4.0, 11.0 - 1.1 * i), mfc="none", mew=1.6,
                lw=max(1.0, 2.6 - 0.2 * i), zorder=2 + i)


def _legend(ax: Any, where: str = "inside", ncol: int = 1) -> None:
    """The panel's legend, ``"inside"`` the axes, or ``"below"`` / ``"right"`` of them, where
    it cannot hide a curve."""
    kw: dict[str, Any] = {"fontsize": 7.5, "ncol": ncol, "framealpha": 0.85}
    if where == "below":
        kw.update(loc="upper center", bbox_to_anchor=(0.5, -0.14))
    elif where == "right":
        kw.update(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.legend(**kw)


def _figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib figure drawn by the Agg (file) backend, outside pyplot: no global state
    and no backend switch for the caller (matplotlib is imported only when plotting)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str) -> str:
    fig.savefig(path, dpi=110)
    return path


def _plot_memory(res: dict[str, Any], path: str) -> str:
    """memory.png: the three memory measures vs depth / steps, one panel each."""
    sweep, c = res["memory_sweep"], res["config"]
    fig = _figure((16, 6.4))
    axes = fig.subplots(1, 3)
    depths = sorted({r["depth"] for s in sweep.values() for r in s["rows"]})
    panels = (("saved_bytes", "Memory (forward): bytes saved for backward"),
              ("peak_train_bytes", "Memory (backward): peak of a training step"),
              ("peak_infer_bytes", "Peak of an inference pass (no grad)"))
    for ax, (key, title) in zip(axes, panels):
        for i, (name, s) in enumerate(sweep.items()):
            ax.plot([r["depth"] for r in s["rows"]], [r[key] / 1024 for r in s["rows"]],
                    **_style(name, i))
        ax.set_xscale("log", base=2)
        ax.set_xticks(depths, [str(d) for d in depths], minor=False)
        ax.set_xticks([], minor=True)
        ax.set_yscale("log")
        ax.set_xlabel("L: layers / unrolled steps / forced DEQ steps / RK4 steps (log)")
        ax.set_ylabel("KiB (log)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        _legend(ax, "below", ncol=2)
    fig.suptitle(f"Memory vs depth: O(L) grows with L, O(1) stays flat (width {c['width']}, "
                 f"batch {min(c['batch'], c['n_train'])})", fontsize=11)
    return _save(fig, path)


def _plot_gradients(res: dict[str, Any], path: str) -> str:
    """gradients.png: gradient error vs backward / solver tolerance (float64 references)."""
    g = res["gradients"]
    fig = _figure((7.5, 5))
    ax = fig.subplots()
    i = 0
    if "deq" in g:
        rows = g["deq"]["rows"]
        pts = [(r["tol"], r["rel_err"]) for r in rows if r["method"] == "implicit GMRES"]
        ax.plot(*zip(*pts), **_style("deq_implicit", i, "DEQ implicit, GMRES at tolerance"))
        for r in rows:
            if r["method"] in ("JFB", "phantom(5, 0.5)", "SHINE(2)"):
                name = {"JFB": "deq_jfb", "SHINE(2)": "deq_shine"}.get(r["method"],
                                                                      "deq_phantom")
                _, color, _, ls = STYLE[name]
                ax.axhline(max(r["rel_err"], 1e-17), ls=ls, color=color, lw=1.8,
                           label=f"DEQ {r['method']} (no tolerance)")
    if "ode" in g:
        for name, meth in (("node_adjoint", "odeint_adjoint"), ("node_direct", "odeint direct")):
            i += 1
            pts = [(r["tol"], r["rel_err"]) for r in g["ode"]["rows"] if r["method"] == meth]
            ax.plot(*zip(*pts), **_style(name, i, f"Neural ODE, {meth} at tolerance"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("backward / solver tolerance (tighter to the right)")
    ax.set_ylabel("relative gradient error vs float64 reference")
    ax.set_title("Gradient accuracy: implicit DEQ and ODE errors shrink with the tolerance;\n"
                 "JFB and phantom gradients keep a fixed bias", fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(fig, path)


def _plot_accuracy(res: dict[str, Any], path: str) -> str:
    """accuracy.png: validation accuracy vs training wall time (log axis, zoomed)."""
    fig = _figure((9.5, 5))
    ax = fig.subplots()
    target = res["config"]["target"]
    finals, times = [], []
    for i, (k, r) in enumerate(res["models"].items()):
        h = [p for p in r["history"] if p["time"] > 0]  # the untrained point has no log time
        if not h:
            continue
        st = _style(k, i)
        # about a dozen markers per series: dense evaluation points would hide the lines
        st.update(ms=max(3.5, st["ms"] * 0.6), lw=1.6, markevery=max(1, len(h) // 12))
        ax.plot([p["time"] for p in h], [p["val_acc"] for p in h], **st)
        finals.append(h[-1]["val_acc"])
        times += [p["time"] for p in h]
    ax.axhline(target, color="k", ls="--", lw=1, label=f"target {100 * target:.0f}%")
    ax.set_xscale("log")
    if finals:  # from well below the worst final accuracy to just above the best
        lo = min(min(finals) - 0.15, target - 0.05)
        ax.set_ylim(max(0.0, lo), min(1.0, max(*finals, target) + 0.02))
        ax.set_xlim(min(times) / 1.3, max(times) * 1.3)
    ax.set_xlabel("training wall time, evaluation excluded (s, log)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Training speed: validation accuracy vs wall time "
                 "(earlier points below the axis)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    _legend(ax, "right")
    return _save(fig, path)


def write_plots(res: dict[str, Any], out: str) -> list[str]:
    """memory.png (memory vs depth/steps), gradients.png (gradient error vs backward
    tolerance), accuracy.png (validation accuracy vs training wall time)."""
    files = []
    if res.get("memory_sweep"):
        files.append(_plot_memory(res, os.path.join(out, "memory.png")))
    g = res.get("gradients", {})
    if "deq" in g or "ode" in g:
        files.append(_plot_gradients(res, os.path.join(out, "gradients.png")))
    files.append(_plot_accuracy(res, os.path.join(out, "accuracy.png")))
    return files


__all__ = ["CLAIMS", "STYLE", "build_rows", "markdown_report", "markdown_table", "write_json",
           "write_plots"]
