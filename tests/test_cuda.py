"""The core on a CUDA device: the same exact answers as on the CPU (skipped without a GPU).

Run on a lent GPU machine with ``python -m pytest -m cuda``. Each test compares against a
closed form or against the same computation on the CPU, so a device-specific bug (a tensor
created on the wrong device, a host/device mix-up in compaction, a dtype promoted differently
by CUDA autocast) fails here.
"""

from __future__ import annotations

import os

import pytest
import torch

import deqkit as dk
from helpers import (
    linear_fixed_point,
    linear_problem,
    solver_id,
    tight_linear_solvers,
    tight_solvers,
)

# DEQKIT_TEST_DEVICE=cpu dry-runs this module's logic on the CPU
CUDA = torch.device(os.environ.get("DEQKIT_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(),
                       reason="needs CUDA"),
]


@pytest.mark.parametrize("solver", tight_solvers(), ids=solver_id)
def test_every_solver_reaches_the_closed_form_on_cuda(solver):
    W, U, b, x = (t.to(CUDA) for t in linear_problem(B=5, d=7, n=3, norm=0.8))
    z_star = linear_fixed_point(W.cpu(), U.cpu(), b.cpu(), x.cpu())
    sol = dk.fixed_point(lambda z, x: z @ W.T + x @ U.T + b, torch.zeros(5, 7, dtype=W.dtype,
                         device=CUDA), solver=solver, args=(x,), max_steps=400, throw=True)
    assert sol.value.device == CUDA or sol.value.device.type == CUDA.type
    assert sol.stats["nstep"].device.type == CUDA.type
    torch.testing.assert_close(sol.value.cpu(), z_star, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("lin", tight_linear_solvers(), ids=solver_id)
def test_implicit_gradient_on_cuda_equals_cpu(lin):
    def grads(device):
        W, U, b, x = (t.to(device).requires_grad_() for t in linear_problem(B=4, d=6, n=3))
        sol = dk.fixed_point(lambda z: z @ W.T + x @ U.T + b,
                             torch.zeros(4, 6, dtype=W.dtype, device=device),
                             solver=dk.Anderson(rtol=1e-12, atol=0), max_steps=200,
                             adjoint=dk.ImplicitAdjoint(lin, on_failure="raise"))
        return torch.autograd.grad(sol.value.sin().sum(), (W, U, b, x))

    for g_gpu, g_cpu in zip(grads(CUDA), grads(torch.device("cpu"))):
        torch.testing.assert_close(g_gpu.cpu(), g_cpu, rtol=1e-8, atol=1e-10)


def test_per_sample_compaction_on_cuda_equals_cpu():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16).double()
    x = torch.randn(32, 16, dtype=torch.float64) * torch.logspace(-3, 1, 32, dtype=torch.float64
                                                                  )[:, None]

    def solve(device):
        cell = lin.to(device)
        s = dk.fixed_point(lambda z, x: torch.tanh(0.5 * cell(z) + x),
                           torch.zeros(32, 16, dtype=torch.float64, device=device),
                           args=(x.to(device),), solver=dk.Anderson(rtol=1e-10, atol=0),
                           max_steps=100, compact=True, compact_ratio=0.9)
        return s.value.cpu(), s.stats["nstep"].cpu()

    (v_gpu, n_gpu), (v_cpu, n_cpu) = solve(CUDA), solve(torch.device("cpu"))
    assert int(n_gpu.min()) < int(n_gpu.max())  # samples did stop at different steps
    assert int((n_gpu - n_cpu).abs().max()) <= 1  # rounding may move a stop by one step
    torch.testing.assert_close(v_gpu, v_cpu, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_training_with_grad_scaler_learns(dtype):
    """A ConvDEQ under CUDA autocast (fp16 with GradScaler, bf16 without) fits a small
    synthetic task: losses finite, solver state float32, loss drops by more than half."""
    torch.manual_seed(0)
    rtol = 1e-2 if dtype == torch.bfloat16 else 2e-3  # above the dtype's eps
    model = dk.zoo.ConvDEQ((1, 8, 8), 4, channels=16, groups=4,
                           solver=dk.Anderson(rtol=rtol, atol=0)).to(CUDA)
    x = torch.randn(64, 1, 8, 8, device=CUDA)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler(CUDA.type, enabled=dtype == torch.float16)
    losses = []
    for _ in range(60):
        with torch.autocast(CUDA.type, dtype=dtype):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss.detach()))
    assert all(v == v and v < float("inf") for v in losses)
    assert model.deq.last_solution.stats["rel_residual"].dtype == torch.float32
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.filterwarnings("ignore:TensorFloat32 tensor cores")
def test_compiled_cell_on_cuda_no_recompile_per_iteration():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64).to(CUDA)
    cell = torch.compile(lambda z, x: torch.tanh(0.6 * lin(z) + x))
    x = torch.randn(128, 64, device=CUDA)

    def run(steps):
        s = dk.fixed_point(cell, torch.zeros_like(x), args=(x,), max_steps=steps, throw=False,
                           solver=dk.Anderson(rtol=1e-6, atol=0), compact=False)
        s.value.square().sum().backward()
        return s

    run(3)
    graphs = counters["stats"]["unique_graphs"]
    sol = run(40)
    assert counters["stats"]["unique_graphs"] == graphs
    assert sol.result is dk.RESULTS.successful and int(sol.stats["nstep"].max()) > 3
    torch._dynamo.reset()


def test_stability_report_and_spectral_norm_on_cuda():
    torch.manual_seed(0)
    model = dk.zoo.DEQMLP((10,), 3, width=32).to(CUDA)
    x = torch.randn(16, 10, device=CUDA)
    rep = dk.stability_report(model.deq, model.inject(x))
    assert rep.result == "successful" and rep.rho_max < 0.95 and not rep.warnings


def test_cli_training_on_cuda(tmp_path):
    pytest.importorskip("sklearn")
    from deqkit.app.config import TrainConfig
    from deqkit.app.train import eval_checkpoint, train

    cfg = TrainConfig(model="conv_deq", data="digits", subset=512, epochs=2, batch_size=64,
                      progress=False, plots=True, device=str(CUDA), precision="fp16",
                      out=str(tmp_path / "run"))
    summary = train(cfg, log=lambda *_: None)
    assert summary["complete"] and summary["test_acc"] > 0.5
    res = eval_checkpoint(str(tmp_path / "run" / "last.pt"), device=str(CUDA),
                          log=lambda *_: None)
    assert res["acc"] == pytest.approx(summary["test_acc"], abs=0.02)
