"""``deqkit compare``: train the model families on one task and measure the document's table."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from deqkit.data import load_dataset

from .expressiveness import homeomorphism_experiment
from .measure import (
    deq_gradient_accuracy,
    effective_depth,
    explicit_gradient_accuracy,
    forward_cost,
    memory_of,
    memory_sweep,
    ode_gradient_accuracy,
    sweep_factories,
    training_speed,
)
from .memory import PEAK_METHOD, SAVED_METHOD, verify_peak_method
from .models import MODELS, accuracy, build_models, n_params, train_model
from .report import build_rows, fmt_bytes, markdown_report, markdown_table, write_json, write_plots

DEFAULTS = dict(width=64, depth=8, epochs=12, batch=64, lr=3e-3, sweep="4,8,16,32,64,128",
                tols="1e-2,1e-4,1e-6,1e-8", homeo_steps=200, target=None)
QUICK = dict(epochs=2, sweep="4,16,64", tols="1e-2,1e-8", homeo_steps=100)
TARGETS = {"digits": 0.95, "mnist1d": 0.6}

Log = Callable[[str], None]
Split = tuple[Tensor, Tensor]


@dataclasses.dataclass(frozen=True)
class Settings:
    """The resolved options of one comparison run (command-line value, else the --quick or
    full default)."""

    data: str
    width: int
    depth: int
    epochs: int
    batch: int
    lr: float
    sweep: list[int]
    tols: list[float]
    homeo_steps: int
    target: float
    out: str
    quick: bool
    seed: int
    threads: int
    subset: int | None
    resnet_width: int | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        """Fill every option left unset (None) from :data:`QUICK` / :data:`DEFAULTS`."""
        quick = bool(args.quick)

        def opt(name: str) -> Any:
            v = getattr(args, name, None)
            if v is not None:
                return v
            return QUICK[name] if quick and name in QUICK else DEFAULTS[name]

        return cls(data=args.data, width=opt("width"), depth=opt("depth"),
                   epochs=opt("epochs"), batch=opt("batch"), lr=opt("lr"),
                   sweep=_numbers(opt("sweep"), int), tols=_numbers(opt("tols"), float),
                   homeo_steps=opt("homeo_steps"),
                   target=opt("target") or TARGETS.get(args.data, 0.9),
                   out=args.out or os.path.join("runs", f"compare-{args.data}"), quick=quick,
                   seed=args.seed, threads=int(args.threads), subset=args.subset,
                   resnet_width=args.resnet_width or None)


def _numbers(s: str, kind: Callable[[str], Any]) -> list[Any]:
    return [kind(v) for v in s.split(",") if v.strip()]


def _progress(log: Log | None, t_start: float) -> Log:
    """``log`` with the elapsed time prefixed (a no-op without ``log``)."""

    def say(msg: str) -> None:
        if log is not None:
            log(f"[compare {time.perf_counter() - t_start:6.1f}s] {msg}")

    return say


def run_compare(args: argparse.Namespace, log: Log | None = None) -> dict[str, Any]:
    """Run the comparison described by ``args`` (see :func:`add_compare_parser`); write the
    Markdown table, JSON and PNG plots to ``args.out``; return the results dict."""
    t_start = time.perf_counter()
    say = _progress(log, t_start)
    s = Settings.from_args(args)
    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    os.makedirs(s.out, exist_ok=True)
    splits = load_dataset(s.data, flatten=True, seed=s.seed, subset=s.subset)
    train, val, test = splits.train.tensors, splits.val.tensors, splits.test.tensors
    in_shape, ncls = tuple(splits.spec.input_shape), splits.spec.num_classes
    say(f"data {s.data}: train/val/test {len(train[0])}/{len(val[0])}/{len(test[0])}, in "
        f"{in_shape}, {ncls} classes")
    probe = verify_peak_method()
    say(f"profiler memory check: 1 MiB allocation -> {fmt_bytes(probe['measured_peak'])} "
        f"({'ok' if probe['ok'] else 'FAILED'})")
    models = build_models(in_shape, ncls, width=s.width, depth=s.depth,
                          resnet_width=s.resnet_width, seed=s.seed)
    res: dict[str, Any] = {"config": _config(s, models, train, val, test),
                           "profiler_check": probe}
    res["models"] = {name: _train_and_measure(name, model, s, train, val, test, say)
                     for name, model in models.items()}
    mb = min(s.batch, len(train[0]))
    say(f"memory sweep over depth/steps {s.sweep} (width {s.width}, batch {mb})")
    res["memory_sweep"] = memory_sweep(
        sweep_factories(models, s.width, in_shape, ncls, full=not s.quick), s.sweep,
        train[0][:mb], train[1][:mb], progress=say)
    res["expressiveness"] = _expressiveness(s, say)
    res["gradients"] = _gradients(models, test, s, say)
    res["checks"] = acceptance_checks(res)
    res["methods"] = methods(res)
    res["runtime_s"] = time.perf_counter() - t_start
    _write_outputs(res, s.out, echo=log is not None)
    return res


def _config(s: Settings, models: dict[str, nn.Module], train: Split, val: Split,
            test: Split) -> dict[str, Any]:
    """The run's configuration as recorded in the JSON and the report."""
    return dict(data=s.data, width=s.width, depth=s.depth,
                resnet_width=models["resnet"].stem.out_features, epochs=s.epochs,
                batch=s.batch, lr=s.lr, seed=s.seed, sweep=s.sweep, tolerances=s.tols,
                quick=s.quick, threads=s.threads, subset=s.subset, target=s.target,
                n_train=len(train[0]), n_val=len(val[0]), n_test=len(test[0]),
                torch=torch.__version__)


def _train_and_measure(name: str, model: nn.Module, s: Settings, train: Split, val: Split,
                       test: Split, say: Log) -> dict[str, Any]:
    """Train one model and measure its row of the table: accuracy, speed, forward cost,
    effective depth, memory of one training step."""
    say(f"training {name} ({MODELS[name][1]}, {n_params(model):,} parameters)")
    tr = train_model(model, train, val, s.epochs, s.batch, lr=s.lr, seed=s.seed,
                     progress=say, name=name, evals_per_epoch=4)
    xte, yte = test
    r: dict[str, Any] = {"label": MODELS[name][1], "family": MODELS[name][0],
                         "params": n_params(model), "history": tr["history"],
                         "step_times": tr["step_times"]}
    r["test_acc"] = accuracy(model, xte, yte)
    r["speed"] = training_speed(tr, s.target)
    r["forward"] = forward_cost(model, xte, repeats=3 if s.quick else 5)
    r["depth"] = effective_depth(model, xte)
    model.train()
    mb = min(s.batch, len(train[0]))
    r["memory"] = memory_of(model, list(model.parameters()), train[0][:mb], train[1][:mb])
    say(f"{name}: test acc {r['test_acc']:.3f}, step {1e3 * r['speed']['step_s_median']:.1f}"
        f" ms, f evals {r['forward']['f_evals']:.0f}, train-step peak "
        f"{fmt_bytes(r['memory']['peak_train_bytes'])}")
    return r


def _expressiveness(s: Settings, say: Log) -> dict[str, Any]:
    say("expressiveness: 1-D y = -x (Neural ODE vs ResNet vs DEQ)")
    out = homeomorphism_experiment(steps=s.homeo_steps, seed=s.seed)
    for k, v in out["models"].items():
        say(f"  {k}: MSE {v['mse']:.4f} ({v['time_s']:.1f} s)")
    return out


def _gradients(models: dict[str, nn.Module], test: Split, s: Settings,
               say: Log) -> dict[str, Any]:
    """Gradient accuracy of the explicit models, the DEQ and the Neural ODE (float64)."""
    say("gradient accuracy (float64 references)")
    gb = min(32 if s.quick else 64, len(test[0]))
    x, y = test[0][:gb], test[1][:gb]
    out: dict[str, Any] = {
        "standard": {k: explicit_gradient_accuracy(models[k], x, y)
                     for k in ("resnet", "unrolled")},
        "deq": deq_gradient_accuracy(models["deq_implicit"], x, y, s.tols,
                                     repeats=1 if s.quick else 3),
    }
    say("  DEQ done; Neural ODE (reference: odeint direct at rtol=atol=1e-10)")
    out["ode"] = ode_gradient_accuracy(models["node_adjoint"], x[:32], y[:32], s.tols)
    return out


def _write_outputs(res: dict[str, Any], out: str, echo: bool) -> None:
    """compare.md, compare.json and the plots; with ``echo``, print the table, the checks
    and what was written."""
    with open(os.path.join(out, "compare.md"), "w") as fh:
        fh.write(markdown_report(res))
    write_json(res, os.path.join(out, "compare.json"))  # the results, should plotting fail
    res["plots"] = write_plots(res, out)
    write_json(res, os.path.join(out, "compare.json"))
    if not echo:
        return
    print("\n" + markdown_table(build_rows(res)) + "\n")
    for c in res["checks"]:
        print(f"[{'met' if c['met'] else 'NOT met'}] {c['name']}: {c['detail']}")
    print(f"\nwrote {out}/compare.md, compare.json, " +
          ", ".join(os.path.basename(p) for p in res["plots"]) +
          f" in {res['runtime_s']:.0f} s")


def acceptance_checks(res: dict[str, Any]) -> list[dict[str, Any]]:
    checks = []
    sw = res.get("memory_sweep", {})

    def add(name: str, met: bool, detail: str) -> None:
        checks.append({"name": name, "met": bool(met), "detail": detail})

    if "unrolled" in sw:
        u = sw["unrolled"]["rows"]
        fit = sw["unrolled"]["fit"]["peak_train_bytes"]
        add("unrolled training-step memory grows about linearly",
            fit["slope"] > 0 and fit["r2"] >= 0.95,
            f"slope {fmt_bytes(fit['slope'])}/step, R^2 {fit['r2']:.4f}")
        ud = u[-1]["peak_train_bytes"]
        for key, what in (("deq_implicit_picard", "Picard forward, GMRES backward as trained"),
                          ("deq_implicit", "Anderson(m=5) forward, GMRES backward, as trained"),
                          ("deq_neumann_picard", "Picard forward, Neumann implicit backward")):
            if key not in sw:
                continue
            d = sw[key]["rows"]
            lo, hi = d[0]["peak_train_bytes"], d[-1]["peak_train_bytes"]
            add(f"DEQ ({what}) training-step peak memory at {d[-1]['depth']} steps within 10% "
                f"of {d[0]['depth']} steps", abs(hi - lo) <= 0.1 * lo,
                f"{fmt_bytes(lo)} -> {fmt_bytes(hi)} ({100 * (hi / lo - 1):+.1f}%; mean steps "
                f"used {d[0].get('steps_used', float('nan')):.0f} -> "
                f"{d[-1].get('steps_used', float('nan')):.0f})")
            cross = (5 * hi - fit["intercept"]) / fit["slope"] if fit["slope"] > 0 else None
            add(f"DEQ ({what}) <= 1/5 of unrolled at {d[-1]['depth']}", hi <= ud / 5,
                f"{fmt_bytes(hi)} vs {fmt_bytes(ud)}: ratio {hi / ud:.3f}, reduction "
                f"{100 * (1 - hi / ud):.1f}% (DEQ paper: up to 88%)"
                + (f"; the unrolled fit reaches 5x at L ~ {cross:.0f}" if cross else ""))
    if "node_adjoint" in sw and "node_direct" in sw:
        a, dr = sw["node_adjoint"]["fit"]["peak_train_bytes"], sw["node_direct"]["fit"][
            "peak_train_bytes"]
        add("ODE adjoint memory flat vs direct backprop growing (informational)",
            abs(a["slope"]) < 0.1 * dr["slope"],
            f"slopes {fmt_bytes(a['slope'])}/step (adjoint) vs {fmt_bytes(dr['slope'])}/step "
            "(direct)")
    g = res.get("gradients", {}).get("deq")
    if g:
        tight = [r for r in g["rows"] if r["method"] == "implicit GMRES"]
        if tight:
            t = min(tight, key=lambda r: r["tol"])
            add(f"DEQ implicit gradient at backward tol {t['tol']:.0e} within 1e-6 of the Dense "
                "reference (float64)", t["rel_err"] <= 1e-6, f"rel err {t['rel_err']:.2e}")
    e = res.get("expressiveness", {}).get("models")
    if e:
        add("1-D y = -x: Neural ODE fails (MSE > 0.2), ResNet and DEQ succeed (MSE < 0.05)",
            e["neural_ode"]["mse"] > 0.2 and e["resnet"]["mse"] < 0.05 and e["deq"]["mse"] < 0.05,
            f"ODE {e['neural_ode']['mse']:.3f}, ResNet {e['resnet']['mse']:.2e}, "
            f"DEQ {e['deq']['mse']:.2e}")
    pc = res.get("profiler_check")
    if pc:
        add("profiler peak-memory method sees a known 1 MiB allocation", pc["ok"],
            f"measured {fmt_bytes(pc['measured_peak'])}")
    return checks


def methods(res: dict[str, Any]) -> list[str]:
    c = res["config"]
    return [
        "Models: 'tied' = deqkit.zoo.UnrolledMLP (cell tanh(Wz + Ux + b), ||W||_2 <= 0.9, L "
        "Picard steps, backprop); 'ResNet' = deqkit.zoo.ResNetMLP (L untied pre-norm tanh "
        f"blocks, width {c['resnet_width']} matched to the DEQ's parameter count unless "
        "--resnet-width); Neural ODE = deqkit.zoo.NeuralODEClassifier (dz/dt = tanh(Wz + Ux + "
        "b) - z, z(0)=0, T=1, dopri5 rtol 1e-3 atol 1e-4; odeint_adjoint or odeint); DEQ = "
        "deqkit.zoo.DEQMLP (same cell; Anderson m=5 rtol 1e-4, 20 steps in training, 50 in "
        "evaluation; backward ImplicitAdjoint(GMRES rtol 1e-4, restart 5, 20 steps), "
        "JacobianFreeAdjoint, PhantomAdjoint(5, 0.5), the backward reusing the forward "
        "(reuse: the same GMRES preconditioned by Anderson's secant estimate of (I - J)^-1, "
        "ImplicitAdjoint(reuse_forward=True); SHINE: SHINEAdjoint(refine=2), the estimate "
        "itself refined by two fixed-point steps), or the reversible pair (dk.Reversible(0.5) "
        "forward, ReversibleAdjoint(checkpoint_every=4): exact backprop through the steps run, "
        "rebuilt backwards). Same data split, seed, epochs, AdamW + cosine schedule.",
        "Forward computation: cell evaluations per forward pass on the test set in eval mode "
        "(DEQ and tied: Solution stats nfev, which for the tied net is L + 1: its Picard "
        "driver evaluates f once more to test the residual; ODE: NFE; ResNet: L blocks), and "
        "the median of repeated "
        "inference passes over the test set divided by its size.",
        "Memory (forward) = " + SAVED_METHOD + ". Memory (backward) = " + PEAK_METHOD +
        f", for one training step (forward + cross-entropy + backward) on a batch of "
        f"{min(c['batch'], c['n_train'])}; memory_sweep.*.peak_infer_bytes is the same for a "
        "no-grad inference pass. Measured identically for every model.",
        "Memory growth: L in " + str(c["sweep"]) + " blocks (ResNet, width " + str(c["width"]) +
        " for all models here), tied steps (unrolled), forced solver steps of the trained DEQ "
        "(a copy run under DEQ.overrides(solver=dk.FixedSteps(...), max_steps=L): exactly L "
        "updates, no tolerance test, so no sample leaves the batch early; 'mean steps used' "
        "in the checks confirms it) with its Anderson(m=5) solver "
        "('deq_implicit', also JFB/phantom) or dk.Picard ('deq_implicit_picard'), both with the "
        "trained ImplicitAdjoint(GMRES restart 5) backward whose Krylov basis is a constant "
        "~(6 x batch x width) workspace, and with Picard + ImplicitAdjoint(Neumann rtol 1e-4) "
        "('deq_neumann_picard', O(1) workspace); fixed RK4 steps "
        "(step_size 1/n) of the trained ODE with odeint (direct) or odeint_adjoint; slopes are "
        "least-squares fits of bytes vs L.",
        "Effective depth: mean (max) over test samples of DEQ solver steps (eval budget 50), "
        "ODE NFE per test batch (adaptive dopri5), L for the explicit models.",
        "Expressiveness: 1-D models with state = output (no read-out) trained full batch "
        "(Adam lr 1e-2) on y = -x, x ~ U[-1, 1]; ODE dz/dt = g(z) (dopri5 rtol 1e-5) from z(0)="
        "x; ResNet z + g_l(z) from z_0 = x (4 blocks); DEQ z* = V tanh(A_z z + A_x x + b) + c "
        "with ||V|| ||A_z|| <= 0.9; MSE on 1024 fresh samples.",
        "Training speed: median wall time of a training step (forward + backward + AdamW) and "
        f"training wall time (evaluation excluded) until validation accuracy >= "
        f"{100 * c['target']:.0f}%, checked 4 times per epoch.",
        "Gradient accuracy: relative error ||g - g_ref|| / ||g_ref|| and cosine of all "
        "parameter gradients of the cross-entropy on a test batch, in float64. DEQ: same z* "
        "(Anderson rtol 1e-12) for all; reference ImplicitAdjoint(Dense()); GMRES(rtol=tol, "
        "atol=0, restart 64, 200 steps); JFB; phantom(5, 0.5); GMRES at 1e-4 preconditioned by "
        "the forward's inverse estimate (reuse); SHINE(2); backward times are medians. "
        "ODE: reference odeint direct backprop dopri5 rtol=atol=1e-10; odeint_adjoint and "
        "odeint at rtol=atol=tol. Standard: float32 backprop vs float64 backprop.",
        f"Timings are wall-clock on {c['threads']} CPU thread(s) shared with other jobs: "
        "indicative only.",
    ]


def add_compare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``compare`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "compare",
        help="train a ResNet, a tied unrolled net, Neural ODEs and DEQs on one task and "
             "measure the document's comparison table",
        description=__doc__,
    )
    p.add_argument("--data", default="digits", choices=("digits", "mnist1d"))
    p.add_argument("--width", type=int, default=None, help="state width (default 64)")
    p.add_argument("--depth", type=int, default=None, help="L: ResNet blocks / tied steps "
                   "(default 8)")
    p.add_argument("--resnet-width", type=int, default=0,
                   help="ResNet width (default 0: match the DEQ's parameter count)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 12; "
                   "--quick: 2)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 3e-3)")
    p.add_argument("--sweep", default=None,
                   help="depths/steps of the memory sweep (default 4,8,16,32,64,128)")
    p.add_argument("--tols", default=None,
                   help="backward tolerances of the gradient study (default 1e-2,1e-4,1e-6,1e-8)")
    p.add_argument("--homeo-steps", type=int, default=None,
                   help="training steps of the 1-D y=-x experiment (default 200)")
    p.add_argument("--target", type=float, default=None,
                   help="validation accuracy target for time-to-accuracy (digits 0.95)")
    p.add_argument("--subset", type=int, default=None, help="use the first N training samples")
    p.add_argument("--quick", action="store_true", help="small, fast run (< 60 s)")
    p.add_argument("--out", default=None, help="output folder (default runs/compare-DATA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.set_defaults(func=compare_command)
    return p


def compare_command(args: argparse.Namespace) -> int:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    res = run_compare(args, log=None if args.no_progress else log)
    if args.no_progress:
        print(markdown_table(build_rows(res)))
    return 0

