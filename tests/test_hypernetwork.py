"""Tests for dk.nn.HyperNetwork (deqkit.nn.hypernetwork)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from deqkit.nn import HyperNetwork

F64 = torch.float64


def mlp(d_in=2, width=5, d_out=1, dtype=F64):
    return nn.Sequential(
        nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, d_out),
    ).to(dtype)  # fmt: skip


class TwoInput(nn.Module):
    """A non-Sequential target with two inputs."""

    def __init__(self, d=3, k=4):
        super().__init__()
        self.a = nn.Linear(d, k)
        self.b = nn.Linear(d, k, bias=False)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x, y):
        return self.scale * torch.tanh(self.a(x)) * self.b(y)


def make(target, context_dim=3, **kw):
    ref = copy.deepcopy(target)
    hyper = HyperNetwork(target, context_dim, hidden=6, depth=2, **kw).to(F64)
    return hyper, ref


def install(ref: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    ref = copy.deepcopy(ref)
    with torch.no_grad():
        named = dict(ref.named_parameters()) | dict(ref.named_buffers())
        for k, v in weights.items():
            named[k].copy_(v)
    return ref


def test_forward_matches_manually_installed_weights():
    hyper, ref = make(mlp(), init_scale=0.5)
    c, x = torch.randn(3, dtype=F64), torch.randn(7, 2, dtype=F64)
    expected = install(ref, hyper.generate(c))(x)
    torch.testing.assert_close(hyper(c, x), expected, rtol=1e-12, atol=1e-12)
    # per-sample: sample b equals the target with theta(c_b) installed
    C, X = torch.randn(4, 3, dtype=F64), torch.randn(4, 6, 2, dtype=F64)
    out = hyper(C, X)
    gen = hyper.generate(C)
    assert out.shape == (4, 6, 1)
    for b in range(4):
        manual = install(ref, {k: v[b] for k, v in gen.items()})(X[b])
        torch.testing.assert_close(out[b], manual, rtol=1e-12, atol=1e-12)


def test_generated_weights_start_near_target_init():
    target = mlp(width=16)
    hyper0, ref = make(copy.deepcopy(target), init_scale=0.0)
    for k, v in hyper0.generate(torch.randn(3, dtype=F64)).items():
        torch.testing.assert_close(v, dict(ref.named_parameters())[k], rtol=0, atol=0)
    hyper, ref = make(target, init_scale=0.1)
    for k, v in hyper.generate(torch.randn(3, dtype=F64)).items():
        p = dict(ref.named_parameters())[k]
        rel = (v - p).norm() / p.norm()
        assert 0 < rel < 0.3, (k, rel)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_per_sample_vmap_equals_loop(chunk_size):
    hyper, _ = make(TwoInput(), init_scale=0.5, chunk_size=chunk_size)
    C = torch.randn(5, 3, dtype=F64)
    X, Y = torch.randn(5, 2, 3, dtype=F64), torch.randn(5, 2, 3, dtype=F64)
    out = hyper(C, X, Y)
    loop = torch.stack([hyper(C[b], X[b], Y[b]) for b in range(5)])
    torch.testing.assert_close(out, loop, rtol=1e-12, atol=1e-12)
    gen, one = hyper.generate(C), hyper.generate(C[2])
    for k in one:
        torch.testing.assert_close(gen[k][2], one[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_gradcheck_parameters_context_and_inputs(chunk_size):
    hyper, _ = make(mlp(width=3), context_dim=2, init_scale=0.5, chunk_size=chunk_size)
    C = torch.randn(2, 2, dtype=F64, requires_grad=True)
    X = torch.randn(2, 3, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(hyper, (C, X))
    names = [n for n, _ in hyper.named_parameters()]
    assert names[:4] == ["trunk.0.weight", "trunk.0.bias", "trunk.2.weight", "trunk.2.bias"]
    ps = tuple(p.detach().clone().requires_grad_() for p in hyper.parameters())
    C, X = C.detach(), X.detach()

    def f(*ps):
        return functional_call(hyper, dict(zip(names, ps)), (C, X))

    assert torch.autograd.gradcheck(f, ps)
    # every hypernetwork parameter gets a gradient
    hyper(C, X).square().sum().backward()
    for n, p in hyper.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_params_subset_keeps_other_params_trainable():
    target = mlp()
    w2 = target[2].weight
    hyper, _ = make(target, params=["2.weight", "0.bias"], init_scale=0.5)
    assert hyper.generated_names == ("0.bias", "2.weight")  # target order
    assert hyper.num_generated == 5 + 25
    own = dict(target.named_parameters())
    assert set(own) == {"0.weight", "2.bias", "4.weight", "4.bias"}
    assert "2.weight" in dict(target.named_buffers())  # initial value kept as a buffer
    assert "2.weight" not in target.state_dict()
    torch.testing.assert_close(target[2].weight, w2.detach())
    hp = dict(hyper.named_parameters())
    for n in own:
        assert hp["target." + n] is own[n]
    C, X = torch.randn(3, 3, dtype=F64), torch.randn(3, 4, 2, dtype=F64)
    hyper(C, X).sum().backward()
    for n, p in own.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    # the output uses the target's own values for the non-generated ones
    c = C[0]
    gen = hyper.generate(c)
    assert set(gen) == {"0.bias", "2.weight"}
    manual = install(target, gen)  # target holds the trained own params
    torch.testing.assert_close(hyper(c, X[0]), manual(X[0]), rtol=1e-12, atol=1e-12)


def _grads(hyper, *args):
    hyper.zero_grad()
    out = hyper(*args)
    (out * torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in hyper.named_parameters()}


@pytest.mark.parametrize(
    ("target", "params", "batched"),
    [
        (mlp(width=6), None, False),
        (mlp(width=6), None, True),
        (mlp(width=6), ["2.weight", "4.bias"], True),
        (TwoInput(), None, True),
        (TwoInput(), ["b.weight"], False),
    ],
)
def test_chunked_matches_unchunked(target, params, batched):
    hyper, _ = make(target, params=params, init_scale=0.5)
    chunked = copy.deepcopy(hyper)
    chunked.chunk_size = 4
    n_in = 2 if isinstance(target, TwoInput) else 1
    d = 3 if isinstance(target, TwoInput) else 2
    if batched:
        args = (torch.randn(3, 3, dtype=F64), *[torch.randn(3, 5, d, dtype=F64)] * n_in)
    else:
        args = (torch.randn(3, dtype=F64), *[torch.randn(5, d, dtype=F64)] * n_in)
    out0, g0 = _grads(hyper, *args)
    out1, g1 = _grads(chunked, *args)
    torch.testing.assert_close(out1, out0, rtol=1e-6, atol=1e-6)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-6, msg=n)
    gen0, gen1 = hyper.generate(args[0]), chunked.generate(args[0])
    for k in gen0:
        torch.testing.assert_close(gen1[k], gen0[k], rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # no checkpointing path
        torch.testing.assert_close(chunked(*args), out0, rtol=1e-6, atol=1e-6)


def _saved_bytes(module: nn.Module, *args) -> int:
    """Bytes of the distinct non-parameter storages saved for backward during the forward."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(*args)
    out.sum().backward()
    return sum(seen.values())


def test_chunked_checkpointed_saves_less_for_backward():
    torch.manual_seed(0)
    width = 192
    target = nn.Sequential(
        nn.Linear(32, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1),
    )  # fmt: skip
    hyper = HyperNetwork(target, 4, hidden=4)
    chunked = copy.deepcopy(hyper)
    chunked.chunk_size = 4096
    c, x = torch.randn(4), torch.randn(8, 32)
    full = _saved_bytes(hyper, c, x)
    small = _saved_bytes(chunked, c, x)
    gen_bytes = 4 * hyper.num_generated
    assert full >= gen_bytes  # unchunked keeps every generated weight
    # chunked keeps only the trunk features, the input and the Tanh outputs
    assert small < 0.1 * full, (small, full)
    assert small < 0.1 * gen_bytes


def test_validation_errors():
    with pytest.raises(ValueError, match=r"unknown parameter name\(s\) \['nope'\]"):
        HyperNetwork(mlp(), 3, params=["0.weight", "nope"])
    with pytest.raises(ValueError, match="empty"):
        HyperNetwork(mlp(), 3, params=[])
    with pytest.raises(ValueError, match="duplicate"):
        HyperNetwork(mlp(), 3, params=["0.weight", "0.weight"])
    with pytest.raises(TypeError, match="list of parameter names"):
        HyperNetwork(mlp(), 3, params="0.weight")
    with pytest.raises(ValueError, match="no parameters"):
        HyperNetwork(nn.Tanh(), 3)
    with pytest.raises(ValueError, match="context_dim"):
        HyperNetwork(mlp(), 0)
    with pytest.raises(ValueError, match="chunk_size"):
        HyperNetwork(mlp(), 3, chunk_size=0)
    hyper, _ = make(mlp())
    x = torch.randn(4, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"\(3,\).*\(B, 3\).*got \(4,\)"):
        hyper(torch.randn(4, dtype=F64), x)
    with pytest.raises(ValueError, match="context"):
        hyper(torch.randn(2, 2, 3, dtype=F64), x)
    with pytest.raises(ValueError, match="leading dimension 5"):
        hyper(torch.randn(5, 3, dtype=F64), x)
    with pytest.raises(ValueError, match="context"):
        hyper.generate(torch.randn(2, 4, dtype=F64))
    with pytest.raises(ValueError, match="chunk_size"):
        hyper.chunk_size = -1
