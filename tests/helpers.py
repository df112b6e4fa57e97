"""Shared problem catalogue and registries for the tests."""

from __future__ import annotations

import json

import torch

import deqkit as dk

F64 = torch.float64


def contractive_matrix(d: int, norm: float, *, symmetric: bool = False, dtype=F64, gen=None):
    A = torch.randn(d, d, dtype=dtype, generator=gen)
    if symmetric:
        A = A + A.T
    return norm * A / torch.linalg.matrix_norm(A, 2)


def linear_problem(B=4, d=6, n=3, norm=0.7, dtype=F64, seed=0):
    """The document's exercise: f(z) = W z + U x + b with ||W|| < 1."""
    g = torch.Generator().manual_seed(seed)
    W = contractive_matrix(d, norm, dtype=dtype, gen=g)
    U = torch.randn(d, n, dtype=dtype, generator=g)
    b = torch.randn(d, dtype=dtype, generator=g)
    x = torch.randn(B, n, dtype=dtype, generator=g)
    return W, U, b, x


def linear_fixed_point(W, U, b, x):
    d = W.shape[0]
    rhs = x @ U.T + b
    return torch.linalg.solve(torch.eye(d, dtype=W.dtype) - W, rhs.T).T


def tight_solvers(rtol=1e-12):
    return [
        dk.Picard(rtol=rtol, atol=0),
        dk.Picard(rtol=rtol, atol=0, damping=0.8),
        dk.Anderson(rtol=rtol, atol=0),
        dk.Anderson(rtol=rtol, atol=0, m=3, beta=0.7),
        dk.Broyden(rtol=rtol, atol=0),
        dk.Broyden(rtol=rtol, atol=0, memory=4, line_search=True),
        dk.NewtonKrylov(rtol=rtol, atol=0, linear_solver=dk.GMRES(rtol=1e-10, atol=0)),
    ]


def tight_linear_solvers():
    return [
        dk.GMRES(rtol=1e-12, atol=0),
        dk.GMRES(rtol=1e-12, atol=0, restart=3, max_steps=300),
        dk.BiCGStab(rtol=1e-12, atol=0),
        dk.Neumann(rtol=1e-12, atol=0, max_steps=500),
        dk.Dense(),
    ]


def solver_id(s) -> str:
    return repr(s)


# ------------------------------------------------------------------- deqkit train, quickly

#: a small digits run of the CLI's training (a few seconds)
CLI_QUICK = dict(model="deq_mlp", data="digits", subset=256, epochs=2, batch_size=64,
                 progress=False, plots=False, max_steps=10, eval_max_steps=15,
                 model_args={"width": 32}, lr=1e-2)


def quick_config(tmp_path, name, **kw):
    """A :class:`~deqkit.app.config.TrainConfig` of :data:`CLI_QUICK` writing to
    ``tmp_path / name``, with ``kw`` overriding."""
    from deqkit.app.config import TrainConfig

    return TrainConfig(**{**CLI_QUICK, "out": str(tmp_path / name), **kw})


def read_records(path):
    """The records of a run's ``metrics.jsonl``."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
