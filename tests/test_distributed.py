"""Data-parallel training: 2 gloo processes on this machine against one process.

* gradients (float64, tiny DEQ, batch of 8): one process on the whole batch vs 2 ranks with
  4 samples each under ``DistributedDataParallel`` (which averages the ranks' gradients), for
  the implicit adjoint (a custom ``autograd.Function``; TorchDEQ users lost such gradients
  under ``DataParallel``), the Jacobian-free adjoint and loss + Jacobian regularisation
  (double backward);
* a short ``deqkit train`` run under ``torchrun --standalone --nproc_per_node 2`` (and a
  2-process resume of a 1-process run) against the same run in one process.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import deqkit as dk
from deqkit.app.config import TrainConfig
from deqkit.app.train import distributed as dd
from deqkit.app.train import train
from deqkit.stability import jacobian_frobenius_reg

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

B, D_IN, WIDTH, CLASSES, WORLD = 8, 5, 6, 3, 2
JAC_WEIGHT = 0.7
PROBE_SEED = 1234  # rank r draws its Hutchinson probes from Generator().manual_seed(1234 + r)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- gradients


class _Cell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z) + x)


class _Net(nn.Module):
    def __init__(self, adjoint: dk.AbstractAdjoint) -> None:
        super().__init__()
        self.inject = nn.Linear(D_IN, WIDTH)
        self.deq = dk.nn.DEQ(_Cell(), solver=dk.Anderson(rtol=1e-13, atol=0.0),
                             adjoint=adjoint, max_steps=200)
        self.head = nn.Linear(WIDTH, CLASSES)
        with torch.no_grad():  # a contraction: ||W||_2 = 0.5
            w = self.deq.cell.lin.weight
            w.mul_(0.5 / torch.linalg.matrix_norm(w, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.deq(self.inject(x)))


CASES = ("implicit", "jfb", "implicit+jacreg")


def _make(case: str) -> _Net:
    torch.manual_seed(0)
    adjoint = (dk.JacobianFreeAdjoint() if case == "jfb" else
               dk.ImplicitAdjoint(dk.GMRES(rtol=1e-13, atol=0.0, max_steps=50),
                                  on_failure="raise"))
    return _Net(adjoint).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return (torch.randn(B, D_IN, generator=g, dtype=torch.float64),
            torch.randint(0, CLASSES, (B,), generator=g))


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _reference(case: str) -> dict[str, torch.Tensor]:
    """One process, the whole batch of 8, no DDP."""
    model = _make(case)
    x, y = _data()
    loss = nn.functional.cross_entropy(model(x), y)
    if case.endswith("jacreg"):
        # The Hutchinson estimate is a mean over samples of per-sample terms, each using the
        # probe of its own sample. Under DDP rank r draws the probes of its 4 samples from
        # Generator(PROBE_SEED + r); here the same probes are drawn for the same samples
        # (samples 4r..4r+3, one call per half with that generator), so the single-process
        # estimator is the full-batch estimator with exactly the ranks' probes, and the
        # comparison is exact rather than statistical.
        z_star = model.deq.last_solution.value
        inj = model.inject(x)
        h = B // WORLD
        regs = [jacobian_frobenius_reg(
                    lambda z, r=r: model.deq.cell(z, inj[r * h:(r + 1) * h]),
                    z_star[r * h:(r + 1) * h].detach(),
                    generator=torch.Generator().manual_seed(PROBE_SEED + r))
                for r in range(WORLD)]
        loss = loss + JAC_WEIGHT * torch.stack(regs).mean()
    loss.backward()
    return _grads(model)


def _grad_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    env = dd.detect("cpu")  # gloo on CPU, also where GPUs exist
    assert env.enabled and env.backend == "gloo" and env.rank == rank
    x, y = _data()
    h = B // WORLD
    x, y = x[rank * h:(rank + 1) * h], y[rank * h:(rank + 1) * h]
    result = {}
    for case in CASES:
        core = _make(case)
        model = dd.wrap_model(core, env)
        assert isinstance(model, nn.parallel.DistributedDataParallel)
        loss = nn.functional.cross_entropy(model(x), y)
        if case.endswith("jacreg"):
            gen = torch.Generator().manual_seed(PROBE_SEED + rank)
            loss = loss + JAC_WEIGHT * core.deq.jacobian_regularisation(generator=gen)
        loss.backward()
        result[case] = _grads(core)
        result[case + ":bwd"] = dict(core.deq.last_solution.backward)
    torch.save(result, os.path.join(out_dir, f"grads{rank}.pt"))
    # `deqkit train` under this process group: the global batch must split evenly
    with pytest.raises(ValueError, match="not divisible by the number of processes"):
        train(TrainConfig(**{**QUICK, "batch_size": 63, "out": os.path.join(out_dir, "bad")}))
    dd.shutdown(env)


def test_ddp_gradients_equal_single_process(tmp_path):
    mp.spawn(_grad_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"grads{r}.pt", weights_only=False) for r in range(WORLD)]
    worst: dict[str, float] = {}
    for case in CASES:
        ref = _reference(case)
        assert set(ref) == set(ranks[0][case])
        for name, g_ref in ref.items():
            # the cell's weights get their gradient only through the adjoint's backward
            assert g_ref.abs().max() > 0, (case, name)
            for r in range(WORLD):
                g = ranks[r][case][name]
                rel = float((g - g_ref).norm() / g_ref.norm())
                assert rel < 1e-6, (case, name, r, rel)
                worst[case] = max(worst.get(case, 0.0), rel)
        if case.startswith("implicit"):
            assert bool(ranks[0][case + ":bwd"]["converged"].all())
    print("worst relative gradient error per case:", worst)
    # the three cases really differ (the comparison is not vacuous)
    w = "deq.cell.lin.weight"
    g = {c: ranks[0][c][w] for c in CASES}
    assert (g["jfb"] - g["implicit"]).norm() > 1e-2 * g["implicit"].norm()
    assert (g["implicit+jacreg"] - g["implicit"]).norm() > 1e-2 * g["implicit"].norm()


# ----------------------------------------------------------------------------- units


def test_batch_size_must_divide():
    assert dd.local_batch_size(64, 2) == 32
    with pytest.raises(ValueError, match="not divisible"):
        dd.local_batch_size(63, 2)


def test_global_batch_sampler_reproduces_single_process_batches():
    n, bs, seed = 23, 6, 5
    gen = torch.Generator().manual_seed(seed + 3)
    single = [b.tolist() for b in torch.utils.data.DataLoader(range(n), batch_size=bs,
                                                              shuffle=True, generator=gen)]
    samplers = [dd.GlobalBatchSampler(n, bs, r, 2, shuffle=True, base_seed=seed)
                for r in range(2)]
    for s in samplers:
        s.set_epoch(3)
    per_rank = [list(s.batches()) for s in samplers]
    assert len(per_rank[0]) == len(single) == len(samplers[0])
    for k, batch in enumerate(single):
        (a, m0), (b, m1) = per_rank[0][k], per_rank[1][k]
        assert a + b == batch and m0 == m1 == len(batch)
    assert [len(per_rank[r][-1][0]) for r in range(2)] == [3, 2]  # 5 = 3 + 2
    dd.GlobalBatchSampler(n, bs, 0, 2, shuffle=True).check_nonempty("x")
    with pytest.raises(ValueError, match="fewer than the 2 processes"):
        dd.GlobalBatchSampler(25, 6, 0, 2, shuffle=True).check_nonempty("x")


def test_single_process_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    env = dd.detect()
    assert not env.enabled and env.is_main and env.world_size == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="MASTER_ADDR"):
            dd.detect()


# ----------------------------------------------------------------------------- deqkit train

QUICK = dict(model="deq_mlp", data="digits", subset=256, epochs=2, batch_size=64,
             progress=False, plots=False, max_steps=10, eval_max_steps=15,
             model_args={"width": 32}, lr=1e-2, device="cpu")
FLAGS = ["--device", "cpu", "--model", "deq_mlp", "--data", "digits", "--subset", "256",
         "--epochs", "2",
         "--batch-size", "64", "--max-steps", "10", "--eval-max-steps", "15", "--lr", "0.01",
         "--no-progress", "--no-plots", "--model-arg", "width=32"]


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={WORLD}", "-m", "deqkit", "train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _records(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _assert_close(single: dict, multi: dict) -> None:
    """Same keys; equal up to float32 reduction order.

    The batches, the per-sample solves (deqkit's solvers stop per sample) and the averaged
    gradients are the same, but each rank's float32 losses and cell evaluations run on half
    the batch, so sums differ in the last bits and drift a little over the steps: loss,
    accuracy and step counts agree to 1e-5 relative; residuals (float32 differences of nearly
    equal numbers) to 1e-4 relative.
    """
    assert set(single) == set(multi)
    for k, v in single.items():
        if "time" in k or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        tol = 1e-4 if ("res" in k) else 1e-5
        assert multi[k] == pytest.approx(v, rel=tol, abs=1e-9), (k, v, multi[k])


def test_torchrun_two_processes_match_one(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    one = train(TrainConfig(**QUICK, out=str(tmp_path / "one")), log=lambda *_: None)
    proc = _torchrun([*FLAGS, "--out", str(tmp_path / "two")])
    assert "2 processes, gloo" in proc.stdout
    assert proc.stdout.count("epoch   1") == 1  # only rank 0 logs
    two_dir = tmp_path / "two"
    recs1, recs2 = _records(tmp_path / "one" / "metrics.jsonl"), _records(two_dir / "metrics.jsonl")
    assert [r["epoch"] for r in recs2] == [1, 2]
    for a, b in zip(recs1, recs2):
        _assert_close(a, b)
    with open(two_dir / "summary.json") as fh:
        summary2 = json.load(fh)
    _assert_close({k: v for k, v in one.items() if k != "run_dir"},
                  {k: v for k, v in summary2.items() if k != "run_dir"})
    assert sorted(os.listdir(two_dir)) == ["best.pt", "config.json", "last.pt",
                                           "metrics.jsonl", "summary.json"]
    # a checkpoint of 2 processes is a plain (unwrapped) model: it loads in one process
    ckpt = torch.load(two_dir / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and not any(k.startswith("module.") for k in ckpt["model"])

    # resume on 2 processes a run that 1 process stopped after epoch 1
    part = TrainConfig(**QUICK, out=str(tmp_path / "part"))
    train(part, stop_after=1, log=lambda *_: None)
    _torchrun(["--resume", "--out", str(tmp_path / "part"), "--no-progress", "--no-plots"])
    recs3 = _records(tmp_path / "part" / "metrics.jsonl")
    assert [r["epoch"] for r in recs3] == [1, 2]
    for a, b in zip(recs1, recs3):
        _assert_close(a, b)


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    """NCCL cannot share a GPU between ranks: with CUDA present and LOCAL_WORLD_SIZE above the
    device count, detect() refuses before creating a process group and names both fixes;
    --device cpu takes gloo instead."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for var, val in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2",
                         MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(var, val)
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    with pytest.raises(ValueError, match="2 processes on this node but 1 CUDA device"):
        dd.detect("auto")
    with pytest.raises(ValueError, match="--device cpu"):
        dd.detect("cuda")
    assert not dist.is_initialized()


# ----------------------------------------------------------------------------- FSDP

FSDP_ADJOINTS = {"implicit": lambda: dk.ImplicitAdjoint(dk.GMRES(rtol=1e-12, atol=0)),
                 "jfb": dk.JacobianFreeAdjoint}


def _fsdp_worker(rank: int, port: int, out_dir: str) -> None:
    import warnings

    from torch.distributed.fsdp import fully_shard

    # FSDP2 warns that the DEQ's output is a view (an in-place op on it would skip FSDP's
    # pre-backward hook); the tests never modify it in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        out = {}
        for name, make in FSDP_ADJOINTS.items():
            torch.manual_seed(0)
            model = dk.zoo.DEQMLP((8,), 3, width=16, adjoint=make(),
                                  solver=dk.Anderson(rtol=1e-12, atol=0)).double()
            fully_shard(model.deq)
            fully_shard(model)
            g = torch.Generator().manual_seed(1)
            x = torch.randn(8, 8, dtype=torch.float64, generator=g)
            y = torch.randint(0, 3, (8,), generator=g)
            h = 8 // WORLD
            sl = slice(rank * h, (rank + 1) * h)
            nn.functional.cross_entropy(model(x[sl]), y[sl]).backward()
            out[name] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        torch.save(out, os.path.join(out_dir, f"fsdp{rank}.pt"))
        # Drop every FSDP object (they hold the group's gloo context and pending work) and
        # wait for the other rank before tearing the group down: a rank that destroys the
        # group while its peer is still finishing the last all-gather, or that leaves the
        # gloo threads to interpreter teardown, can abort ("terminate called without an
        # active exception"); seen once in CI.
        del model, out
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_gradients_equal_single_process(tmp_path):
    """FSDP2 (``fully_shard`` on the DEQ layer and the model, gloo on the CPU): the sharded
    parameters are all-gathered for the solve and for the implicit backward's VJPs, and the
    reduce-scattered gradients equal one process on the whole batch (float64)."""
    pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) needs torch >= 2.6")
    mp.spawn(_fsdp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"fsdp{r}.pt", weights_only=False) for r in range(WORLD)]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 8, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    for name, make in FSDP_ADJOINTS.items():
        torch.manual_seed(0)
        ref = dk.zoo.DEQMLP((8,), 3, width=16, adjoint=make(),
                            solver=dk.Anderson(rtol=1e-12, atol=0)).double()
        nn.functional.cross_entropy(ref(x), y).backward()
        for n, p in ref.named_parameters():
            assert p.grad.abs().max() > 0, (name, n)
            for r in range(WORLD):
                rel = float((ranks[r][name][n] - p.grad).norm() / p.grad.norm())
                assert rel < 1e-10, (name, n, r, rel)
