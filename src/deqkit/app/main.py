"""Command line: ``deqkit compare``, ``deqkit train``, ``deqkit eval``, ``deqkit demo``
(or ``python -m deqkit ...``)."""

from __future__ import annotations

import argparse
import sys
import time

import torch

import deqkit as dk


def _demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    d, n, b = args.width, 64, args.batch
    dt = torch.float64 if args.float64 else torch.float32
    W = torch.randn(d, d, dtype=dt)
    W = args.norm * W / torch.linalg.matrix_norm(W, 2)
    U = torch.randn(n, d, dtype=dt) / n**0.5
    bias = 0.1 * torch.randn(d, dtype=dt)
    x = torch.randn(b, n, dtype=dt)
    W.requires_grad_(True)

    def f(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ W.T + x @ U + bias)

    print(
        f"deqkit {dk.__version__} demo: z = tanh(W z + U x + b), d={d}, batch={b}, "
        f"||W||_2={args.norm}, {dt}, rtol={args.rtol}\n"
    )
    solvers = {
        "Picard": dk.Picard(rtol=args.rtol, atol=0),
        "Anderson(m=5)": dk.Anderson(rtol=args.rtol, atol=0),
        "Broyden": dk.Broyden(rtol=args.rtol, atol=0),
        "NewtonKrylov": dk.NewtonKrylov(rtol=args.rtol, atol=0),
    }
    rows = []
    z0 = torch.zeros(b, d, dtype=dt)
    with torch.no_grad():
        ref = dk.fixed_point(f, z0, dk.NewtonKrylov(rtol=1e-12 if args.float64 else 1e-6, atol=0),
                             args=(x,), max_steps=100).value
    for name, solver in solvers.items():
        with torch.no_grad():
            t = time.perf_counter()
            sol = dk.fixed_point(f, z0, solver, args=(x,), max_steps=args.max_steps, throw=False)
            ms = 1e3 * (time.perf_counter() - t)
        err = float((sol.value - ref).norm() / ref.norm())
        st = sol.stats
        rows.append((name, sol.result.name, f"{float(st['nstep'].float().mean()):.1f}",
                     str(int(st["nstep"].max())), str(int(st["nfev"])),
                     f"{float(st['rel_residual'].max()):.1e}", f"{err:.1e}", f"{ms:.1f}"))
    head = ("solver", "result", "mean steps", "max steps", "nfev", "max rel res", "err vs ref",
            "ms")
    _table(head, rows)

    print("\nGradient of sum(z*^2) w.r.t. W, relative error vs the dense implicit reference "
          "(backward rtol 1e-10 in float64, 1e-5 in float32):")
    grads = {}
    brtol = 1e-10 if args.float64 else 1e-5  # what the dtype can reach
    adjoints = {
        "Implicit+Dense (ref)": dk.ImplicitAdjoint(dk.Dense()),
        "Implicit+GMRES": dk.ImplicitAdjoint(dk.GMRES(rtol=brtol, atol=0)),
        "Implicit+BiCGStab": dk.ImplicitAdjoint(dk.BiCGStab(rtol=brtol, atol=0)),
        "Implicit+Neumann": dk.ImplicitAdjoint(dk.Neumann(rtol=brtol, atol=0, max_steps=200),
                                               on_failure="ignore"),
        "JacobianFree": dk.JacobianFreeAdjoint(),
        "Phantom(5, 0.5)": dk.PhantomAdjoint(5, 0.5),
        "Unrolled": dk.UnrolledAdjoint(),
    }
    rows = []
    for name, adj in adjoints.items():
        t = time.perf_counter()
        sol = dk.fixed_point(f, z0, dk.Anderson(rtol=args.rtol, atol=0), adjoint=adj,
                             args=(x,), max_steps=args.max_steps, throw=False)
        (g,) = torch.autograd.grad((sol.value**2).sum(), W)
        ms = 1e3 * (time.perf_counter() - t)
        grads[name] = g
        ref_g = grads["Implicit+Dense (ref)"]
        rel = float((g - ref_g).norm() / ref_g.norm())
        cos = float(torch.nn.functional.cosine_similarity(g.flatten(), ref_g.flatten(), dim=0))
        bw = sol.backward.get("nmatvec", "-")
        rows.append((name, f"{rel:.1e}", f"{cos:.5f}", str(bw), f"{ms:.1f}"))
    _table(("adjoint", "rel err", "cosine", "backward matvecs", "fwd+bwd ms"), rows)
    return 0


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


_TRAIN_FLAGS = {
    # flag: (config key, type, help)
    "--model": ("model", str, "model name (deqkit.zoo.MODELS), default conv_deq"),
    "--data": ("data", str, "dataset: digits, mnist1d, text, npz:PATH; default digits"),
    "--data-root": ("data_root", str, "folder for cached/generated data"),
    "--subset": ("subset", int, "use only the first N training samples"),
    "--epochs": ("epochs", int, "training epochs (default 10)"),
    "--batch-size": ("batch_size", int, "batch size (default 64)"),
    "--lr": ("lr", float, "peak learning rate (default 2e-3)"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay (default 1e-4)"),
    "--optimizer": ("optimizer", str, "adamw | adam | sgd"),
    "--schedule": ("schedule", str, "cosine | constant"),
    "--seed": ("seed", int, "random seed (default 0)"),
    "--label-smoothing": ("label_smoothing", float, "label smoothing (default 0)"),
    "--augment-shift": ("augment_shift", int, "random roll of signals/images by up to N"),
    "--ema": ("ema", float, "exponential moving average of the weights with this decay "
              "(e.g. 0.99), updated after every optimiser step and used for validation, test, "
              "best.pt and `deqkit eval`; 0 = off (default)"),
    "--threads": ("threads", int, "torch intra-op threads (default 1)"),
    "--device": ("device", str, "auto | cpu | cuda | cuda:N (default auto: CUDA if present)"),
    "--precision": ("precision", str, "fp32 | bf16 | fp16 autocast (fp16 uses a GradScaler)"),
    "--solver": ("solver", str, "anderson | picard | broyden | newton_krylov"),
    "--rtol": ("rtol", float, "forward relative tolerance (default 1e-3)"),
    "--atol": ("atol", float, "forward absolute tolerance (default 0)"),
    "--max-steps": ("max_steps", int, "forward step budget in training (default 20)"),
    "--eval-max-steps": ("eval_max_steps", int, "forward step budget in evaluation"),
    "--adjoint": ("adjoint", str, "implicit | jfb | phantom | unrolled | onestep"),
    "--residual-weight": ("residual_weight", float,
                          "onestep adjoint: fixed-point residual penalty (default 1.0)"),
    "--backward-solver": ("backward_solver", str, "gmres | bicgstab | neumann | dense"),
    "--backward-rtol": ("backward_rtol", float, "backward relative tolerance (default 1e-4)"),
    "--backward-max-steps": ("backward_max_steps", int, "backward iteration budget"),
    "--jac-reg": ("jac_reg", float, "Jacobian regularisation weight (default 0)"),
    "--jac-reg-freq": ("jac_reg_freq", float, "fraction of steps with the regulariser"),
    "--out": ("out", str, "run folder (default runs/MODEL-DATA-seedN)"),
    "--log-every": ("log_every", int, "also log every N training steps to metrics.jsonl"),
}


def _train_cmd(args: argparse.Namespace) -> int:
    from .config import from_mapping, load_file, parse_pairs, with_model_preset
    from .train.engine import read_run_config, train

    values: dict = {}
    if args.resume:
        out = args.out or (load_file(args.config).get("out") if args.config else None)
        if not out:
            raise ValueError("--resume needs --out RUN_DIR (or a config file with `out`).")
        if not isinstance(out, str):
            raise ValueError(f"config `out` = {out!r} is invalid: expected a folder path (a "
                             "non-empty string, e.g. \"runs/a\").")
        values.update(read_run_config(out))
    if args.config:
        values.update(load_file(args.config))
    for key, _, _ in _TRAIN_FLAGS.values():
        v = getattr(args, key)
        if v is not None:
            values[key] = v
    for flag, key in (("--model-arg", "model_args"), ("--data-arg", "data_args"),
                      ("--solver-arg", "solver_args")):
        pairs = parse_pairs(getattr(args, key), flag)
        if pairs:
            values[key] = {**values.get(key, {}), **pairs}
    if args.no_progress:
        values["progress"] = False
    if args.no_plots:
        values["plots"] = False
    if args.warm_start:
        values["warm_start"] = True
    if not args.resume:  # a resumed run keeps its recorded config
        values = with_model_preset(values)
    cfg = from_mapping(values, source=args.config or "command line")
    train(cfg, resume=args.resume, stop_after=args.stop_after)
    return 0


def _eval_cmd(args: argparse.Namespace) -> int:
    from .train.engine import eval_checkpoint

    eval_checkpoint(args.checkpoint, max_steps=args.max_steps, split=args.split,
                    device=args.device)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deqkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a zoo model on embedded or user data")
    tr.add_argument("--config", help="TOML/YAML/JSON file with config keys (flags override it)")
    for flag, (key, typ, hlp) in _TRAIN_FLAGS.items():
        tr.add_argument(flag, dest=key, type=typ, default=None, help=hlp)
    tr.add_argument("--model-arg", dest="model_args", action="append", metavar="K=V",
                    help="model hyperparameter, repeatable (e.g. --model-arg channels=48)")
    tr.add_argument("--data-arg", dest="data_args", action="append", metavar="K=V")
    tr.add_argument("--solver-arg", dest="solver_args", action="append", metavar="K=V",
                    help="solver option, e.g. --solver-arg m=6")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    tr.add_argument("--no-plots", action="store_true", help="no PNG plots")
    tr.add_argument("--warm-start", action="store_true",
                    help="start each training solve from the sample's equilibrium of the last "
                    "epoch (dk.nn.FixedPointCache; single process; saved in warm_start.pt)")
    tr.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    tr.set_defaults(func=_train_cmd)
    ev = sub.add_parser("eval", help="evaluate a checkpoint (test metrics, solver statistics)")
    ev.add_argument("checkpoint")
    ev.add_argument("--max-steps", type=int, default=None, help="test-time step budget")
    ev.add_argument("--split", default="test", choices=("train", "val", "test"))
    ev.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    ev.set_defaults(func=_eval_cmd)
    from .compare import add_compare_parser

    add_compare_parser(sub)
    demo = sub.add_parser("demo", help="solve and differentiate a small DEQ with every solver")
    demo.add_argument("--width", type=int, default=256)
    demo.add_argument("--batch", type=int, default=128)
    demo.add_argument("--norm", type=float, default=0.9, help="spectral norm of W")
    demo.add_argument("--rtol", type=float, default=1e-5)
    demo.add_argument("--max-steps", type=int, default=100)
    demo.add_argument("--float64", action="store_true")
    demo.add_argument("--threads", type=int, default=1)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    from .files import RunError

    try:
        return int(args.func(args))
    except ValueError as err:  # configuration/data errors: a clear message, no traceback
        print(f"deqkit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RunError as err:  # a locked or unwritable run folder, a diverged loss
        print(f"deqkit {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
