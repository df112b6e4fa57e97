"""``deqkit demo``: solve and differentiate one small DEQ with every solver and adjoint.

The layer is ``z = tanh(W z + U x + b)`` with ``||W||_2`` set by ``--norm`` (below 1: a
contraction). The first table compares the forward solvers against a tight Newton-Krylov
reference, the second the gradients of every adjoint against the dense implicit one.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

import deqkit as dk

Layer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser("demo", help="solve and differentiate a small DEQ with every "
                              "solver and adjoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=256, help="state size d (default: 256)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default: 128)")
    p.add_argument("--norm", type=float, default=0.9, help="spectral norm of W (default: 0.9)")
    p.add_argument("--rtol", type=float, default=1e-5,
                   help="forward relative tolerance (default: 1e-05)")
    p.add_argument("--max-steps", type=int, default=100,
                   help="forward step budget (default: 100)")
    p.add_argument("--float64", action="store_true", help="solve in float64")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=run_demo)
    return p


def table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Print a Markdown table."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def _problem(args: argparse.Namespace) -> tuple[Layer, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer ``f(z, x)``, its weight ``W`` (requires grad), the input and ``z0``."""
    if args.width < 1 or args.batch < 1 or args.max_steps < 1 or not args.rtol > 0:
        raise ValueError("--width, --batch and --max-steps must be >= 1 and --rtol > 0.")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    d, n, b = args.width, 64, args.batch
    dt = torch.float64 if args.float64 else torch.float32
    W = torch.randn(d, d, dtype=dt)
    W = args.norm * W / torch.linalg.matrix_norm(W, 2)
    U = torch.randn(n, d, dtype=dt) / n**0.5
    bias = 0.1 * torch.randn(d, dtype=dt)
    W.requires_grad_(True)

    def f(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ W.T + x @ U + bias)

    return f, W, torch.randn(b, n, dtype=dt), torch.zeros(b, d, dtype=dt)


def _forward_table(args: argparse.Namespace, f: Layer, x: torch.Tensor,
                   z0: torch.Tensor) -> None:
    solvers = {
        "Picard": dk.Picard(rtol=args.rtol, atol=0),
        "Anderson(m=5)": dk.Anderson(rtol=args.rtol, atol=0),
        "Broyden": dk.Broyden(rtol=args.rtol, atol=0),
        "NewtonKrylov": dk.NewtonKrylov(rtol=args.rtol, atol=0),
    }
    rows = []
    with torch.no_grad():
        ref = dk.fixed_point(f, z0, dk.NewtonKrylov(rtol=1e-12 if args.float64 else 1e-6,
                                                    atol=0), args=(x,), max_steps=100).value
        for name, solver in solvers.items():
            t = time.perf_counter()
            sol = dk.fixed_point(f, z0, solver, args=(x,), max_steps=args.max_steps,
                                 throw=False)
            ms = 1e3 * (time.perf_counter() - t)
            err = float((sol.value - ref).norm() / ref.norm())
            st = sol.stats
            rows.append((name, sol.result.name, f"{float(st['nstep'].float().mean()):.1f}",
                         str(int(st["nstep"].max())), str(int(st["nfev"])),
                         f"{float(st['rel_residual'].max()):.1e}", f"{err:.1e}", f"{ms:.1f}"))
    table(("solver", "result", "mean steps", "max steps", "nfev", "max rel res", "err vs ref",
           "ms"), rows)


def _gradient_table(args: argparse.Namespace, f: Layer, W: torch.Tensor, x: torch.Tensor,
                    z0: torch.Tensor) -> None:
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
    rows, ref_g = [], None
    for name, adj in adjoints.items():
        t = time.perf_counter()
        sol = dk.fixed_point(f, z0, dk.Anderson(rtol=args.rtol, atol=0), adjoint=adj,
                             args=(x,), max_steps=args.max_steps, throw=False)
        (g,) = torch.autograd.grad((sol.value**2).sum(), W)
        ms = 1e3 * (time.perf_counter() - t)
        ref_g = g if ref_g is None else ref_g
        rel = float((g - ref_g).norm() / ref_g.norm())
        cos = float(torch.nn.functional.cosine_similarity(g.flatten(), ref_g.flatten(), dim=0))
        bw = sol.backward.get("nmatvec", "-")
        rows.append((name, f"{rel:.1e}", f"{cos:.5f}", str(bw), f"{ms:.1f}"))
    table(("adjoint", "rel err", "cosine", "backward matvecs", "fwd+bwd ms"), rows)


def run_demo(args: argparse.Namespace) -> int:
    """``deqkit demo``: the solver table, then the gradient table."""
    f, W, x, z0 = _problem(args)
    print(f"deqkit {dk.__version__} demo: z = tanh(W z + U x + b), d={args.width}, "
          f"batch={args.batch}, ||W||_2={args.norm}, {x.dtype}, rtol={args.rtol}\n")
    _forward_table(args, f, x, z0)
    print("\nGradient of sum(z*^2) w.r.t. W, relative error vs the dense implicit reference "
          "(backward rtol 1e-10 in float64, 1e-5 in float32):")
    _gradient_table(args, f, W, x, z0)
    return 0
