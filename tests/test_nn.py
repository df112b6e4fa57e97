"""The DEQ module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deqkit as dk


class Cell(nn.Module):
    def __init__(self, d=8, scale=0.5):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.inj = nn.Linear(d, d)
        self.scale = scale

    def forward(self, z, x):
        return torch.tanh(self.scale * self.lin(z) + self.inj(x))


def test_deq_module_forward_backward_matches_functional():
    torch.manual_seed(0)
    cell = Cell().double()
    x = torch.randn(5, 8, dtype=torch.float64)
    solver = dk.Anderson(rtol=1e-12, atol=0)
    layer = dk.nn.DEQ(cell, solver=solver, adjoint=dk.ImplicitAdjoint(dk.Dense()))
    z = layer(x)
    assert layer.last_solution.result is dk.RESULTS.successful
    z.square().sum().backward()
    g_mod = [p.grad.clone() for p in cell.parameters()]
    cell.zero_grad()
    sol = dk.fixed_point(cell, torch.zeros_like(x), solver, args=(x,),
                         adjoint=dk.ImplicitAdjoint(dk.Dense()))
    sol.value.square().sum().backward()
    for a, p in zip(g_mod, cell.parameters()):
        torch.testing.assert_close(a, p.grad)
    torch.testing.assert_close(z, sol.value)


def test_eval_budget_and_init_state():
    cell = Cell(scale=0.99)

    class WithInit(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = cell

        def forward(self, z, x):
            return self.cell(z, x)

        def init_state(self, x):
            return torch.full_like(x, 0.1)

    layer = dk.nn.DEQ(WithInit(), solver=dk.Picard(rtol=1e-9, atol=0), max_steps=3,
                      eval_max_steps=7)
    x = torch.randn(4, 8)
    layer(x)
    assert int(layer.last_solution.stats["nstep"].max()) <= 3
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert int(layer.last_solution.stats["nstep"].max()) == 7


def test_parametrized_weight_computed_once_per_forward():
    calls = []

    class Scale(nn.Module):
        def forward(self, w):
            calls.append(1)
            return 0.5 * w / torch.linalg.matrix_norm(w.detach(), 2)

    cell = Cell()
    torch.nn.utils.parametrize.register_parametrization(cell.lin, "weight", Scale())
    calls.clear()  # registration evaluates the parametrization once
    layer = dk.nn.DEQ(cell, solver=dk.Picard(rtol=1e-6, atol=0), max_steps=40)
    z = layer(torch.randn(3, 8))
    assert int(layer.last_solution.stats["nfev"]) > 5
    assert len(calls) == 1
    z.sum().backward()
    assert cell.lin.parametrizations.weight.original.grad is not None


def test_unknown_kwargs_rejected_and_warning_on_divergence():
    with pytest.raises(TypeError, match=r"unknown keyword argument.*tolerance"):
        dk.nn.DEQ(Cell(), tolerance=1e-3)
    with pytest.raises(ValueError, match="max_steps"):
        dk.nn.DEQ(Cell(), max_steps=-1)

    class Bad(nn.Module):
        def forward(self, z, x):
            return 3 * z + x

    layer = dk.nn.DEQ(Bad(), solver=dk.Picard(), max_steps=50)
    with pytest.warns(dk.nn.DEQWarning, match="diverged"):
        layer(torch.randn(2, 3))
    layer_throw = dk.nn.DEQ(Bad(), solver=dk.Picard(), max_steps=50, throw=True)
    with pytest.raises(dk.SolverError):
        layer_throw(torch.randn(2, 3))


def test_variational_dropout_cell_keeps_whole_batch():
    class DropCell(Cell):
        def __init__(self):
            super().__init__()
            self.drop = dk.nn.VariationalDropout(0.3)

        def forward(self, z, x):
            return self.drop(super().forward(z, x))

    cell = DropCell()
    layer = dk.nn.DEQ(cell, solver=dk.Anderson(rtol=1e-6, atol=0), max_steps=60)
    x = torch.randn(6, 8) * torch.linspace(0.01, 2, 6).unsqueeze(1)
    z = layer(x)
    st = layer.last_solution.stats
    assert int(st["nfev_samples"]) == 6 * int(st["nfev"])  # no compaction with live masks
    torch.testing.assert_close(cell(z, x), z, atol=1e-4, rtol=0)  # same mask: a fixed point
    layer.eval()
    with torch.no_grad():
        layer(x)
    st = layer.last_solution.stats
    assert int(st["nfev_samples"]) < 6 * int(st["nfev"])  # eval: identity dropout, compaction


def test_jacobian_regularisation_method_matches_exact_and_trains():
    torch.manual_seed(0)
    cell = Cell(d=5).double()
    layer = dk.nn.DEQ(cell, solver=dk.Anderson(rtol=1e-10, atol=0))
    with pytest.raises(RuntimeError, match="forward pass first"):
        layer.jacobian_regularisation()
    x = torch.randn(3, 5, dtype=torch.float64)
    z = layer(x)
    gen = torch.Generator().manual_seed(1)
    est = layer.jacobian_regularisation(n_samples=4000, generator=gen)
    zs = z.detach()
    exact = sum(
        torch.autograd.functional.jacobian(lambda v, i=i: cell(v[None], x[i:i + 1])[0], zs[i])
        .square().sum() for i in range(3)) / z.numel()
    torch.testing.assert_close(est, exact, rtol=0.1, atol=0)
    # Double backward into the parameters together with the implicit gradient.
    loss = z.square().mean() + 0.5 * layer.jacobian_regularisation()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in cell.parameters())


def test_batchnorm_cell_is_not_compacted():
    class BNCell(Cell):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(8)

        def forward(self, z, x):
            return 0.5 * torch.tanh(self.bn(self.lin(z))) + self.inj(x)

    layer = dk.nn.DEQ(BNCell(), solver=dk.Picard(rtol=1e-5, atol=0), max_steps=60)
    x = torch.randn(6, 8) * torch.linspace(0.01, 2, 6).unsqueeze(1)
    layer(x)
    st = layer.last_solution.stats
    assert int(st["nfev_samples"]) == 6 * int(st["nfev"])


class ModuleSolver(nn.Module, dk.AbstractFixedPointSolver):
    """A solver that is an ``nn.Module`` with a parameter (like HyperAnderson)."""

    rtol = 1e-5
    atol = 0.0

    def __init__(self):
        super().__init__()
        self.damping = nn.Parameter(torch.tensor(0.5))

    def step(self, fn, z, fz, r, state):
        return z + self.damping.detach() * r, None, state


def test_overrides_sets_and_restores_fields():
    layer = dk.nn.DEQ(Cell(), solver=dk.Picard(rtol=1e-9, atol=0), max_steps=30,
                      eval_max_steps=40)
    before = (layer.solver, layer.adjoint, layer.max_steps, layer.eval_max_steps, layer.throw)
    adjoint = dk.JacobianFreeAdjoint()
    with layer.overrides(solver=dk.FixedSteps(dk.Picard()), adjoint=adjoint, max_steps=2,
                         eval_max_steps=4, throw=True) as deq:
        assert deq is layer
        assert (layer.adjoint, layer.max_steps, layer.eval_max_steps, layer.throw) == (
            adjoint, 2, 4, True)
        layer(torch.randn(3, 8))  # training mode: max_steps
        assert int(layer.last_solution.stats["nstep"].max()) == 2
        layer.eval()
        with torch.no_grad():
            layer(torch.randn(3, 8))  # eval mode: eval_max_steps
        assert int(layer.last_solution.stats["nstep"].max()) == 4
    after = (layer.solver, layer.adjoint, layer.max_steps, layer.eval_max_steps, layer.throw)
    assert after == before
    with layer.overrides(eval_max_steps=1):  # only the given field changes
        assert (layer.max_steps, layer.eval_max_steps) == (30, 1)


def test_overrides_restores_on_exception_and_nests():
    layer = dk.nn.DEQ(Cell(), solver=dk.Picard(), max_steps=30)
    with pytest.raises(RuntimeError, match="boom"), layer.overrides(max_steps=3, throw=True):
        raise RuntimeError("boom")
    assert (layer.max_steps, layer.throw) == (30, False)
    with layer.overrides(max_steps=5):
        with layer.overrides(max_steps=7, eval_max_steps=9):
            assert (layer.max_steps, layer.eval_max_steps) == (7, 9)
        assert (layer.max_steps, layer.eval_max_steps) == (5, 30)
    assert layer.max_steps == 30


@pytest.mark.parametrize("kwargs", [{"max_steps": -1}, {"eval_max_steps": 2.5},
                                    {"max_steps": True}])
def test_overrides_validates_like_the_constructor(kwargs):
    with pytest.raises(ValueError) as ctor:
        dk.nn.DEQ(Cell(), **kwargs)
    layer = dk.nn.DEQ(Cell(), max_steps=30)
    with pytest.raises(ValueError) as ovr, layer.overrides(**kwargs):
        pass
    assert str(ovr.value) == str(ctor.value)
    assert layer.max_steps == layer.eval_max_steps == 30


@pytest.mark.parametrize("kwargs", [{"solver": 3}, {"adjoint": "implicit"}, {"throw": 1}])
def test_overrides_type_errors_like_the_constructor(kwargs):
    with pytest.raises(TypeError) as ctor:
        dk.nn.DEQ(Cell(), **kwargs)
    layer = dk.nn.DEQ(Cell())
    with pytest.raises(TypeError) as ovr, layer.overrides(**kwargs):
        pass
    assert str(ovr.value) == str(ctor.value)
    with pytest.raises(TypeError, match="init_state"), layer.overrides(init_state=3):
        pass


def test_overrides_module_solver_is_not_registered():
    layer = dk.nn.DEQ(Cell(), solver=dk.Picard(rtol=1e-8, atol=0), max_steps=60)
    keys, params = list(layer.state_dict()), list(layer.parameters())
    solver = ModuleSolver()
    x = torch.randn(3, 8)
    init = lambda x: torch.full_like(x, 0.3)  # noqa: E731
    with layer.overrides(solver=solver, init_state=init, max_steps=200, eval_max_steps=200):
        assert layer.solver is solver
        assert list(layer.state_dict()) == keys
        assert list(layer.parameters()) == params
        assert not any(m is solver for m in layer.modules())
        for mode in (True, False):
            layer.train(mode)
            z = layer(x)
            assert layer.last_solution.result is dk.RESULTS.successful
    assert isinstance(layer.solver, dk.Picard)
    assert "init_state" not in layer.__dict__
    torch.testing.assert_close(z, layer(x), atol=1e-3, rtol=0)  # same equilibrium


def test_jacobian_regularisation_through_attention_cells():
    """The regulariser's double backward through a transformer cell: the fused CPU/CUDA
    attention kernels have none, so the cell runs the math kernel for it."""
    from deqkit.zoo import DEQTransformerLM

    torch.manual_seed(0)
    m = DEQTransformerLM(11, d_model=16, n_heads=2, d_ff=32, block_size=8,
                         solver=dk.Anderson(), adjoint=dk.ImplicitAdjoint(), max_steps=5)
    x = torch.randint(0, 11, (2, 8))
    loss = m(x).logsumexp(-1).mean()
    reg = m.deq.jacobian_regularisation(generator=torch.Generator().manual_seed(0))
    assert reg.item() > 0
    (loss + reg).backward()
    cell_grads = [p.grad for p in m.deq.cell.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in cell_grads)
