r"""DEQ vs Neural ODE vs explicit network, measured with `deqkit compare`.

The source chapter summarises the three model families in a table (forward computation,
memory, effective depth, expressiveness, training speed, gradient accuracy). `deqkit compare`
trains one of each on the same split of scikit-learn's digits and *measures* every row:

| family | models | gradient |
|---|---|---|
| explicit | `ResNetMLP` ($L$ blocks), `UnrolledMLP` (one cell $L$ times) | backprop |
| Neural ODE | `NeuralODEClassifier`, $\dot z = \tanh(Wz + Ux + b) - z$ | adjoint or direct |
| DEQ | `DEQMLP`, $z^\star = \tanh(W z^\star + U x + b)$ | implicit, JFB, phantom |

This tutorial runs the command in its quick mode, reads the JSON it writes and looks at
three rows of the table. From the shell the same run is

```bash
deqkit compare --quick --out runs/compare-quick   # about a minute on one CPU thread
```

(`make demo` runs the full comparison). With `DEQKIT_TUTORIAL_SMALL=1` the script shrinks
the run further (48 training samples, width 8, one epoch, two sweep points) so the test suite
executes it in seconds: the accuracies are then meaningless, but the memory and gradient
measurements below do not depend on how well the models trained.
"""

# %%
import json
import os
from pathlib import Path

from deqkit.app.main import main

SMALL = os.environ.get("DEQKIT_TUTORIAL_SMALL") == "1"
out = Path(os.environ.get("DEQKIT_TUTORIAL_OUT", "runs/tutorials")) / "compare"
argv = ["compare", "--quick", "--out", str(out), "--no-progress"]
if SMALL:  # (sweep points past Anderson's m = 5 history, whose window fills by L = 5)
    argv += ["--subset", "48", "--epochs", "1", "--width", "8", "--depth", "2",
             "--sweep", "6,8", "--tols", "1e-2,1e-8", "--homeo-steps", "3"]
assert main(argv) == 0  # prints the measured table as Markdown
results = json.loads((out / "compare.json").read_text())

# %% [markdown]
# ## Memory: $O(L)$ vs $O(1)$
#
# The memory sweep forces $L$ solver steps (DEQ) or uses $L$ layers / steps (the others) and
# records the profiler's peak of live allocations during one training step. Backpropagating
# through an unrolled network stores every layer's activations, so its peak grows linearly
# in $L$; the DEQ's implicit backward needs only one evaluation of the cell at $z^\star$
# plus the linear solver's workspace, whatever the number of forward steps.

# %%
sweep = results["memory_sweep"]
for name in ("unrolled", "deq_implicit", "deq_neumann_picard"):
    rows = sweep[name]["rows"]
    slope = sweep[name]["fit"]["peak_train_bytes"]["slope"]
    peaks = ", ".join(f"L={r['depth']}: {r['peak_train_bytes'] / 1024:.1f} KiB" for r in rows)
    print(f"{name:20s} {peaks}  (slope {slope / 1024:+.2f} KiB per step)")
unrolled_slope = sweep["unrolled"]["fit"]["peak_train_bytes"]["slope"]
deq_rows = sweep["deq_implicit"]["rows"]
deq_memory_growth = deq_rows[-1]["peak_train_bytes"] / deq_rows[0]["peak_train_bytes"] - 1

# %% [markdown]
# ## Gradient accuracy: exact up to the linear solve
#
# In float64, on the same equilibrium, the implicit gradient computed with GMRES at
# tolerance `tol` is compared with a dense direct solve of $(I - J^\top) u = \nabla\ell$.
# Jacobian-free backpropagation (JFB) replaces $(I - J)^{-1}$ by $I$ and the phantom
# gradient by a few damped unrolled steps: cheaper, but biased.

# %%
grad_rows = results["gradients"]["deq"]["rows"]
for r in grad_rows:
    tol = "" if r["tol"] is None else f" at tol {r['tol']:.0e}"
    print(f"{r['method'] + tol:28s} relative error {r['rel_err']:.1e}, cosine {r['cosine']:.4f}")
tightest = min((r for r in grad_rows if r["method"] == "implicit GMRES"), key=lambda r: r["tol"])
implicit_gradient_error = tightest["rel_err"]
jfb_gradient_error = next(r["rel_err"] for r in grad_rows if r["method"] == "JFB")

# %% [markdown]
# ## Expressiveness and depth
#
# A Neural ODE's flow map is a homeomorphism, so in one dimension it preserves order and
# cannot learn $x \mapsto -x$; the ResNet and the DEQ can (in the quick and full runs; the
# small run trains for only a few steps). The DEQ's effective depth is the number of solver
# steps it needed, chosen per sample by the stopping test.

# %%
for name, r in results["expressiveness"]["models"].items():
    print(f"1-D map x -> -x, {name:10s}: MSE {r['mse']:.3f}")
depth = results["models"]["deq_implicit"]["depth"]
print(f"DEQ solver steps on the test set: mean {depth['mean']:.1f}, max {depth['max']:.0f}")
for check in results["checks"]:
    print(("[met]     " if check["met"] else "[not met] ") + check["name"])
print(f"Full report: {out / 'compare.md'}")

# %% [markdown]
# ## The plots
#
# The run also writes three PNG files next to the report, each answering one question:
#
# - `memory.png`: does memory grow with depth? Three panels (bytes saved for backward, peak of
#   a training step, peak of an inference pass) against $L$ on log-log axes: the explicit,
#   unrolled and direct-ODE curves rise, the DEQ and adjoint-ODE curves are flat. Series that
#   measure the same bytes (the three forced DEQs) stay visible as nested hollow markers.
# - `gradients.png`: how accurate is each gradient? Relative error against the float64
#   reference versus the backward tolerance; JFB and phantom are horizontal lines (no
#   tolerance to tighten).
# - `accuracy.png`: how fast does each model train? Validation accuracy against training wall
#   time on a log axis, with the target accuracy of the time-to-accuracy row.

# %%
for path in results["plots"]:
    print(Path(path).name, f"{Path(path).stat().st_size / 1024:.0f} KiB")
plot_names = sorted(Path(p).name for p in results["plots"])
