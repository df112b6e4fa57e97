"""Tests for HyperAnderson and train_hyper_solver (deqkit.hyperdeq)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deqkit as dk
from deqkit.hyperdeq import HyperAnderson, pretrain_initialiser, train_hyper_solver
from deqkit.hyperdeq.loss import UnrolledLoss
from deqkit.hyperdeq.networks import floor_distance, precondition, precondition_into

F64 = torch.float64


def tanh_map(d=6, scale=0.8, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=g, dtype=F64)
    W = scale * W / torch.linalg.matrix_norm(W, 2)
    return lambda z, x: torch.tanh(z @ W.T + x)


class Cell(nn.Module):
    def __init__(self, d=6, scale=0.7):
        super().__init__()
        self.lin = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.lin.weight.mul_(scale / torch.linalg.matrix_norm(self.lin.weight, 2))

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


class ConvCell(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        nn.init.normal_(self.conv.weight, 0, 0.05)

    def forward(self, z, u):
        return torch.tanh(self.conv(z) + u)


@pytest.mark.parametrize("safeguard", [1.0, None])
def test_converges_tight_on_contraction(safeguard):
    f = tanh_map()
    x = torch.randn(5, 6, dtype=F64)
    solver = HyperAnderson((6,), rtol=1e-11, atol=0, safeguard=safeguard).double()
    sol = dk.fixed_point(f, torch.zeros_like(x), solver=solver, args=(x,), max_steps=60)
    assert sol.result is dk.RESULTS.successful
    assert torch.allclose(sol.value, f(sol.value, x), atol=1e-9)
    ref = dk.fixed_point(f, torch.zeros_like(x), solver=dk.Picard(rtol=1e-11, atol=0),
                         args=(x,), max_steps=300)
    assert torch.allclose(sol.value, ref.value, atol=1e-9)


def test_safeguard_rescues_bad_network():
    """A sabotaged update network (huge random weights) still converges thanks to the safeguard."""
    f = tanh_map(scale=0.9)
    x = torch.randn(4, 6, dtype=F64)
    solver = HyperAnderson((6,), rtol=1e-9, atol=0).double()
    with torch.no_grad():
        for p in solver.update_net.parameters():
            p.normal_(0, 30.0)
    sol = dk.fixed_point(f, torch.zeros_like(x), solver=solver, args=(x,), max_steps=300,
                         divergence_ratio=None)
    assert sol.result is dk.RESULTS.successful


def test_untrained_matches_anderson_damped():
    f = tanh_map()
    x = torch.randn(3, 6, dtype=F64)
    hyp = HyperAnderson((6,), rtol=1e-10, atol=0, beta_init=0.9, safeguard=None).double()
    a = dk.fixed_point(f, torch.zeros_like(x), solver=hyp, args=(x,), trace=True)
    b = dk.fixed_point(f, torch.zeros_like(x), solver=dk.Anderson(rtol=1e-10, atol=0, beta=0.9),
                       args=(x,), trace=True)
    assert torch.equal(a.stats["nstep"], b.stats["nstep"])
    assert torch.allclose(a.value, b.value, atol=1e-9)


def test_no_update_network_is_anderson_without_parameters():
    """hidden=None: no update network (fewer parameters), exactly the least-squares weights
    with damping beta_init, so the same steps as dk.Anderson; it still trains (the
    initialiser) and converges tightly."""
    f = tanh_map()
    x = torch.randn(3, 6, dtype=F64)
    hyp = HyperAnderson((6,), rtol=1e-10, atol=0, beta_init=0.7, hidden=None,
                        safeguard=None).double()
    full = HyperAnderson((6,), rtol=1e-10, atol=0, beta_init=0.7)
    assert hyp.update_net is None and hyp.compress is None
    n_upd = sum(p.numel() for p in [*full.update_net.parameters(), *full.compress.parameters()])
    assert sum(p.numel() for p in hyp.parameters()) == (
        sum(p.numel() for p in full.parameters()) - n_upd
    )
    a = dk.fixed_point(f, torch.zeros_like(x), solver=hyp, args=(x,))
    b = dk.fixed_point(f, torch.zeros_like(x), solver=dk.Anderson(rtol=1e-10, atol=0, beta=0.7),
                       args=(x,))
    assert a.result is dk.RESULTS.successful
    assert torch.equal(a.stats["nstep"], b.stats["nstep"])
    assert torch.allclose(a.value, b.value, atol=1e-9)
    cell = Cell()
    solver = HyperAnderson((6,), rtol=1e-5, hidden=None)
    out = train_hyper_solver(cell, [torch.randn(8, 6)], solver, steps=2, k=3)
    assert out["parameters"] == sum(p.numel() for p in solver.init_map.parameters())


def test_compaction_per_sample_stopping():
    f = tanh_map()
    # Very different scales: samples stop at different steps and drop out of the batch.
    x = torch.randn(8, 6, dtype=F64) * torch.logspace(-3, 0.5, 8, dtype=F64).unsqueeze(1)
    solver = HyperAnderson((6,), rtol=1e-8, atol=1e-12).double()
    sol = dk.fixed_point(f, torch.zeros_like(x), solver=solver, args=(x,), compact=True,
                         compact_ratio=1.0)
    full = dk.fixed_point(f, torch.zeros_like(x), solver=solver, args=(x,), compact=False)
    assert sol.result is dk.RESULTS.successful
    assert len(set(sol.stats["nstep"].tolist())) > 1
    assert int(sol.stats["nfev_samples"]) < int(full.stats["nfev_samples"])
    assert torch.equal(sol.stats["nstep"], full.stats["nstep"])
    assert torch.allclose(sol.value, full.value, atol=1e-12)


def test_unrolled_adjoint_and_deq_attach():
    torch.manual_seed(0)
    cell = ConvCell()
    u = torch.randn(3, 4, 5, 5, requires_grad=True)
    solver = HyperAnderson((4, 5, 5), rtol=1e-6, atol=0, init_groups=None)
    sol = dk.fixed_point(cell, torch.zeros(3, 4, 5, 5), solver=solver, args=(u,),
                         adjoint=dk.UnrolledAdjoint(), max_steps=40)
    sol.value.sum().backward()
    assert u.grad is not None and torch.isfinite(u.grad).all()
    assert any(p.grad is not None for p in solver.update_net.parameters())

    layer = dk.nn.DEQ(cell, solver=dk.Anderson(rtol=1e-6))
    old_solver = layer.solver
    n_params = len(list(layer.parameters()))
    with torch.no_grad(), solver.attach(layer):
        assert layer.solver is solver
        z = layer(u)
        assert layer.last_solution.result is dk.RESULTS.successful
        assert torch.equal(layer.init_state(u), solver.initial_state(u))
        assert len(list(layer.parameters())) == n_params  # not registered
    assert layer.solver is old_solver and "init_state" not in layer.__dict__
    assert z.shape == u.shape


def test_attach_handle_remove_nesting_and_exceptions():
    """attach() goes through DEQ.overrides: in force until remove() (idempotent) or the end
    of a with block, also when the block raises; nested overrides restore in order; the
    solver never becomes a submodule."""
    cell = Cell()
    layer = dk.nn.DEQ(cell, solver=dk.Anderson(rtol=1e-6))
    old = layer.solver
    keys = set(layer.state_dict())
    solver = HyperAnderson((6,), rtol=1e-6)
    handle = solver.attach(layer)
    assert layer.solver is solver and layer.init_state == solver.initial_state
    assert set(layer.state_dict()) == keys and "solver" not in dict(layer.named_modules())
    with torch.no_grad():
        layer(torch.randn(3, 6))
    assert layer.last_solution.result is dk.RESULTS.successful
    handle.remove()
    handle.remove()
    assert layer.solver is old and "init_state" not in layer.__dict__
    with pytest.raises(RuntimeError, match="boom"), solver.attach(layer):
        with layer.overrides(max_steps=3):
            assert layer.solver is solver and layer.max_steps == 3
        assert layer.max_steps == 30
        raise RuntimeError("boom")
    assert layer.solver is old and "init_state" not in layer.__dict__


def test_training_reduces_loss_and_leaves_deq_untouched():
    torch.manual_seed(0)
    cell = Cell(d=6, scale=0.9)
    layer = dk.nn.DEQ(cell)
    layer.train()
    before = copy.deepcopy(cell.state_dict())
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 6, generator=g) for _ in range(2)]
    solver = HyperAnderson((6,), rtol=1e-5)

    def unrolled_loss() -> float:
        out = train_hyper_solver(layer, data[:1], copy.deepcopy(solver), steps=1, k=6, lr=1e-12)
        return out["loss"][0]

    first = unrolled_loss()
    out = train_hyper_solver(layer, data, solver, steps=30, k=6, lr=1e-2)
    after = unrolled_loss()
    assert after < 0.7 * first
    assert out["parameters"] == sum(p.numel() for p in solver.parameters())
    assert out["time_s"] > 0 and len(out["loss"]) == 30
    assert all(p.grad is None for p in cell.parameters())
    assert all(torch.equal(v, cell.state_dict()[k]) for k, v in before.items())
    assert layer.training  # mode restored


def test_unrolled_loss_in_the_engine_matches_a_hand_unrolled_solve():
    """The training loss runs k steps in the core engine; it equals the loss of the same k
    steps unrolled by hand (value and gradients, also through the initialiser)."""
    torch.manual_seed(0)
    cell = ConvCell(4)
    u = torch.randn(3, 4, 5, 5)
    solver = HyperAnderson((4, 5, 5), rtol=1e-6, precondition=0.5, init_groups=2)
    z_star = dk.fixed_point(cell, torch.zeros_like(u), args=(u,), max_steps=100).value.detach()
    spec = UnrolledLoss("relative", (), init_weight=0.5, target_weight=0.3)
    z0 = solver.initial_state(u)
    engine = spec(cell, solver, z0, (u,), 4, z_star)

    def fn(zf):
        return cell(zf.view(z0.shape), u).reshape(3, -1)

    zs = z_star.reshape(3, -1)
    dist = lambda z: ((z - zs).norm(dim=1) / zs.norm(dim=1)).mean()  # noqa: E731
    z = z0.reshape(3, -1)
    hand, fz, state = 0.5 * dist(z), fn(z), None
    for i in range(5):
        hand = hand + ((fz - z).norm(dim=1) / fz.norm(dim=1)).mean()
        if i > 0:
            hand = hand + 0.3 * dist(z)
        if i == 4:
            break
        state = state or solver.init(fn, z, fz, fz - z, 4)
        z, _, state = solver.step(fn, z, fz, fz - z, state)
        fz = fn(z)
    params = list(solver.parameters())
    g_engine = torch.autograd.grad(engine, params, allow_unused=True, retain_graph=True)
    g_hand = torch.autograd.grad(hand, params, allow_unused=True)
    assert torch.allclose(engine, hand, rtol=1e-6)
    assert any(g is not None and g.abs().sum() > 0 for g in g_engine[:2])  # initialiser
    for a, b in zip(g_engine, g_hand):
        assert (a is None) == (b is None)
        assert a is None or torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_training_log_loss_and_target_weight_run():
    cell = Cell()
    solver = HyperAnderson((6,), rtol=1e-5, init_hidden=None)
    out = train_hyper_solver(cell, [(torch.randn(4, 6),)], solver, steps=2, k=3, loss="log",
                             target_weight=0.5)
    assert len(out["loss"]) == 2 and all(torch.isfinite(torch.tensor(out["loss"])))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"state_shape": ()}, "state_shape"),
        ({"state_shape": (4, 0)}, "state_shape"),
        ({"state_shape": (4,), "rtol": 0, "atol": 0}, "both 0"),
        ({"state_shape": (4,), "m": 0}, "`m`"),
        ({"state_shape": (4,), "beta_init": 1.0}, "beta_init"),
        ({"state_shape": (4,), "safeguard": 0.5}, "safeguard"),
        ({"state_shape": (4,), "regularisation": -1.0}, "regularisation"),
        ({"state_shape": (4,), "init_groups": 3}, "init_groups"),
        ({"state_shape": (4,), "hidden": 0}, "hidden"),
        ({"state_shape": (4,), "init_layers": -1}, "init_layers"),
        ({"state_shape": (4,), "init_layers": 1, "init_hidden": None}, "init_hidden"),
    ],
)
def test_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HyperAnderson(**kwargs)


def test_runtime_validation():
    solver = HyperAnderson((4, 3, 3))
    with pytest.raises(ValueError, match="injection"):
        solver.initial_state(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="state"):
        dk.fixed_point(lambda z: z * 0.5, torch.ones(2, 7), solver=solver)
    with pytest.raises(TypeError, match="DEQ"):
        solver.attach(nn.Linear(2, 2))
    cell = Cell()
    with pytest.raises(TypeError, match="HyperAnderson"):
        train_hyper_solver(cell, [torch.randn(2, 6)], dk.Anderson())
    hyp = HyperAnderson((6,))
    for kw, match in (({"steps": 0}, "steps"), ({"k": 0}, "`k`"), ({"lr": 0.0}, "lr"),
                      ({"loss": "l2"}, "loss"), ({"init_weight": -1.0}, "init_weight")):
        with pytest.raises(ValueError, match=match):
            train_hyper_solver(cell, [torch.randn(2, 6)], hyp, **kw)
    with pytest.raises(ValueError, match="empty"):
        train_hyper_solver(cell, [], hyp, steps=1)
    with pytest.raises(TypeError, match="input tensor"):
        train_hyper_solver(cell, ["x"], hyp, steps=1)


def test_conv_initialiser_pretraining_fits_equilibria():
    """A deeper initialiser (init_layers), fitted alone to z*, gets close and cuts the solve."""
    torch.manual_seed(0)
    cell = ConvCell(4).eval()
    for p in cell.parameters():
        p.requires_grad_(False)
    data = [torch.randn(8, 4, 5, 5) for _ in range(3)]
    solver = HyperAnderson((4, 5, 5), rtol=1e-6, atol=0, init_layers=2, init_hidden=8)
    assert sum(1 for mod in solver.init_map if isinstance(mod, nn.Conv2d)) == 3
    u = torch.cat(data)  # fitted on these
    ref = dk.fixed_point(cell, torch.zeros_like(u), solver=dk.Anderson(rtol=1e-5, atol=0),
                         args=(u,), max_steps=100).value

    def rel_err():
        with torch.no_grad():
            z0 = solver.initial_state(u)
        return float(((z0 - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).mean())

    e0 = rel_err()
    pre = pretrain_initialiser(cell, data, solver, steps=150, lr=1e-2)
    assert len(pre["loss"]) == 150 and pre["loss"][-1] < pre["loss"][0]
    assert pre["parameters"] == sum(p.numel() for p in solver.init_map.parameters())
    assert rel_err() < 0.6 * e0
    assert all(p.grad is None for p in cell.parameters())
    out = train_hyper_solver(cell, data, solver, steps=2, k=3, init_pretrain_steps=5)
    assert len(out["pretrain"]["loss"]) == 5 and len(out["loss"]) == 2
    with pytest.raises(ValueError, match="init_pretrain_steps"):
        train_hyper_solver(cell, data, solver, steps=1, init_pretrain_steps=-1)
    with pytest.raises(ValueError, match="empty"):
        pretrain_initialiser(cell, [], solver, steps=1)
    with pytest.raises(ValueError, match="cell_steps"):
        pretrain_initialiser(cell, data, solver, steps=1, cell_steps=-1)


def test_separable_initialiser_is_small_and_fits():
    """init_separable: depthwise 3x3 + 1x1 per layer (a fraction of the full 3x3's
    parameters), and pretraining still fits the equilibria."""
    torch.manual_seed(0)
    cell = ConvCell(4).eval()
    data = [torch.randn(8, 4, 5, 5) for _ in range(2)]
    kw = {"init_layers": 2, "init_hidden": 8, "init_groups": 2}
    sep = HyperAnderson((4, 5, 5), rtol=1e-6, atol=0, init_separable=True, **kw)
    full = HyperAnderson((4, 5, 5), rtol=1e-6, atol=0, **kw)
    convs = [mod for mod in sep.init_map if isinstance(mod, nn.Conv2d)]
    assert [c.groups for c in convs] == [4, 1, 8, 1, 1]
    assert [c.kernel_size for c in convs] == [(3, 3), (1, 1), (3, 3), (1, 1), (1, 1)]
    n_sep = sum(p.numel() for p in sep.init_map.parameters())
    n_full = sum(p.numel() for p in full.init_map.parameters())
    # depthwise 4*9+4, 4->8 (40), GN 16; depthwise 8*9+8, 8->8 (72), GN 16; 8->4 (36), GN 8
    assert n_sep == 40 + 40 + 16 + 80 + 72 + 16 + 36 + 8 < n_full / 2
    u = torch.cat(data)
    with torch.no_grad():
        ref = dk.fixed_point(cell, torch.zeros_like(u), solver=dk.Anderson(rtol=1e-5, atol=0),
                             args=(u,), max_steps=100).value

    def rel_err():
        with torch.no_grad():
            z1 = cell(sep.initial_state(u), u)
        return float(((z1 - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).mean())

    e0 = rel_err()
    pretrain_initialiser(cell, data, sep, steps=80, lr=1e-2, cell_steps=1)
    assert rel_err() < 0.6 * e0
    vec = HyperAnderson((6,), init_layers=1, init_hidden=4, init_separable=True)
    assert [mod.kernel_size for mod in vec.init_map if isinstance(mod, nn.Conv1d)] == [(1,), (1,)]


def test_pretraining_through_the_cell_fits_the_first_step():
    """cell_steps=1 fits f(z0) (the solve's first plain step) to z*; the cell gets no grad."""
    torch.manual_seed(1)
    cell = ConvCell(4).train()
    data = [torch.randn(8, 4, 5, 5) for _ in range(2)]
    solver = HyperAnderson((4, 5, 5), rtol=1e-6, atol=0, init_layers=1, init_hidden=8)
    pre = pretrain_initialiser(cell, data, solver, steps=80, lr=1e-2, cell_steps=1)
    assert pre["loss"][-1] < 0.6 * pre["loss"][0]
    assert all(p.grad is None for p in cell.parameters())
    assert cell.training  # mode restored


# ---------------------------------------------------------------- learned preconditioner


def relu_gn_cell(seed=0, channels=8, groups=2):
    """The ConvDEQ residual block (ReLU then GroupNorm): the preconditioner's target."""
    torch.manual_seed(seed)
    return dk.zoo.ResidualCell(channels, groups, 2).eval()


def test_active_mask_is_the_relu_pattern():
    """Entries off the channel's floor are exactly the units whose ReLU is on, for either sign
    of the GroupNorm weight (floor at the channel's minimum or maximum)."""
    torch.manual_seed(0)
    a = torch.randn(5, 4, 6, 6, dtype=F64)
    weight = torch.tensor([1.5, -0.7, 0.3, -2.0], dtype=F64)
    bias = torch.randn(4, dtype=F64)
    fz = torch.nn.functional.group_norm(torch.relu(a), 2, weight, bias)
    solver = HyperAnderson((4, 6, 6), precondition=0.5).double()
    act = solver.active(fz.flatten(1))
    assert act.shape == (5, 4, 36)
    assert torch.equal(act.bool(), (a > 0).flatten(2))
    assert not HyperAnderson((6,), precondition=0.5).active(torch.randn(3, 6)).any()  # vectors


def test_zero_gain_preconditioner_is_plain_anderson():
    cell = relu_gn_cell()
    u = torch.randn(4, 8, 6, 6)
    hyp = HyperAnderson((8, 6, 6), rtol=1e-5, atol=0, precondition=0.0, beta_init=1.0,
                        beta_max=2.0, safeguard=None)
    with torch.no_grad():
        a = dk.fixed_point(cell, torch.zeros_like(u), solver=hyp, args=(u,), max_steps=60)
        b = dk.fixed_point(cell, torch.zeros_like(u), solver=dk.Anderson(rtol=1e-5, atol=0),
                           args=(u,), max_steps=60)
    assert torch.equal(a.stats["nstep"], b.stats["nstep"])
    assert torch.allclose(a.value, b.value, atol=1e-5)


def test_preconditioner_cuts_f_evals_on_relu_groupnorm_cell():
    """Untrained, gain 1/(1 - 0.6) on the active units: fewer f evaluations than Anderson to
    the same residual, and the same fixed point."""
    cell = relu_gn_cell()
    u = torch.randn(6, 8, 6, 6)
    hyp = HyperAnderson((8, 6, 6), rtol=1e-6, atol=0, precondition=0.6, beta_init=1.0,
                        beta_max=2.0, safeguard=2.0)
    with torch.no_grad():
        a = dk.fixed_point(cell, torch.zeros_like(u), solver=hyp, args=(u,), max_steps=100)
        b = dk.fixed_point(cell, torch.zeros_like(u), solver=dk.Anderson(rtol=1e-6, atol=0),
                           args=(u,), max_steps=100)
    assert a.result is dk.RESULTS.successful
    nfev_a = float((a.stats["nstep"] + 1).double().mean())
    nfev_b = float((b.stats["nstep"] + 1).double().mean())
    assert nfev_a <= 0.9 * nfev_b
    assert torch.allclose(a.value, b.value, atol=1e-4)


def test_groupnorm_projection_spares_the_floor_distance_direction():
    """precondition_groups: per group, the residual along the distance-from-floor h passes
    unscaled, the active part orthogonal to it gets the gain 1/(1 - kappa), the inactive
    part is unchanged; without groups every active entry gets the gain."""
    torch.manual_seed(0)
    a = torch.randn(3, 4, 5, 5, dtype=F64)
    weight = torch.tensor([1.5, -0.7, 0.3, -2.0], dtype=F64)
    fz = torch.nn.functional.group_norm(torch.relu(a), 2, weight, torch.randn(4, dtype=F64))
    fz = fz.flatten(1)
    kappa = 0.6
    proj = HyperAnderson((4, 5, 5), precondition=kappa, precondition_groups=2).double()
    plain = HyperAnderson((4, 5, 5), precondition=kappa).double()
    act, h = floor_distance(fz, 4, 25)
    assert torch.equal(act.bool(), (a > 0).flatten(2))
    y = torch.relu(a).flatten(2)  # h = |gamma_c| y / sigma_group (GroupNorm eps 1e-5)
    sigma = y.reshape(3, 2, -1).var(2, unbiased=False).add(1e-5).sqrt()
    assert torch.allclose(
        h, y * weight.abs().view(1, 4, 1) / sigma.repeat_interleave(2, 1).unsqueeze(2),
        atol=1e-9,
    )
    r = torch.randn_like(fz)
    absr = r.norm(dim=1)
    hg = h.reshape(3, 2, -1)
    x = (act * r.view(3, 4, 25)).reshape(3, 2, -1)
    coef = (x * hg).sum(2, keepdim=True) / (hg * hg).sum(2, keepdim=True)
    ortho = (x - coef * hg).reshape(3, -1)
    along = (coef * hg).reshape(3, -1)
    rest = r - ortho - along  # inactive part

    def scaled(solver, res, norms):
        return precondition(solver.pre_gain, solver.pre_net, fz, res, norms, 3,
                            solver.precondition_groups)

    with torch.no_grad():
        out = scaled(proj, r, absr)
        out_plain = scaled(plain, r, absr)
    gain = 1 / (1 - kappa)
    assert torch.allclose(out, rest + along + gain * ortho, atol=1e-9)
    assert torch.allclose(out_plain, rest + gain * (along + ortho), atol=1e-9)
    with torch.no_grad():  # the h direction itself is a fixed point of the scaling
        hr = h.reshape(3, -1)
        assert torch.allclose(scaled(proj, hr, hr.norm(dim=1)), hr, atol=1e-9)


def test_groupnorm_projection_cuts_f_evals_on_relu_groupnorm_cell():
    """On the ConvDEQ block (ReLU then GroupNorm) the projection needs fewer f evaluations
    than the plain gain, and reaches the same fixed point."""
    cell = relu_gn_cell()
    u = torch.randn(6, 8, 6, 6)
    out = {}
    for groups in (None, 2):
        hyp = HyperAnderson((8, 6, 6), rtol=1e-6, atol=0, precondition=0.6, beta_init=1.0,
                            beta_max=2.0, safeguard=2.0, hidden=None,
                            precondition_groups=groups)
        with torch.no_grad():
            out[groups] = dk.fixed_point(cell, torch.zeros_like(u), solver=hyp, args=(u,),
                                         max_steps=100)
        assert out[groups].result is dk.RESULTS.successful
    nfev = {g: float((o.stats["nstep"] + 1).double().mean()) for g, o in out.items()}
    assert nfev[2] <= 0.9 * nfev[None]
    assert torch.allclose(out[2].value, out[None].value, atol=1e-4)


def test_solve_does_not_depend_on_the_step_budget():
    """The networks' step feature is budget-free: a trained solver behaves the same under
    ``max_steps=k`` unrolled training and a larger inference budget."""
    cell = relu_gn_cell()
    u = torch.randn(3, 8, 6, 6)
    hyp = HyperAnderson((8, 6, 6), rtol=1e-5, atol=0, precondition=0.5, safeguard=None)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in [*hyp.update_net.parameters(), *hyp.pre_net.parameters()]:
            p.normal_(0, 0.1)
        sols = [dk.fixed_point(cell, torch.zeros_like(u), solver=hyp, args=(u,), max_steps=n)
                for n in (40, 200)]
    assert sols[0].result is dk.RESULTS.successful
    assert torch.equal(sols[0].stats["nstep"], sols[1].stats["nstep"])
    assert torch.equal(sols[0].value, sols[1].value)


def test_tolerance_loss_trains_the_preconditioner():
    cell = relu_gn_cell()
    for p in cell.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    data = [torch.randn(8, 8, 6, 6, generator=g) for _ in range(2)]
    solver = HyperAnderson((8, 6, 6), rtol=1e-5, precondition=0.2, beta_init=1.0,
                           beta_max=2.0, safeguard=2.0)
    gain0 = solver.pre_gain.detach().clone()

    def loss_now() -> float:
        out = train_hyper_solver(cell, data[:1], copy.deepcopy(solver), steps=1, k=10,
                                 lr=1e-12, loss="tolerance", init_weight=0.0,
                                 tolerances=(1e-3, 1e-4))
        return out["loss"][0]

    first = loss_now()
    out = train_hyper_solver(cell, data, solver, steps=25, k=10, lr=2e-2, loss="tolerance",
                             init_weight=0.0, tolerances=(1e-3, 1e-4))
    assert len(out["loss"]) == 25
    assert loss_now() < 0.9 * first
    assert not torch.equal(solver.pre_gain.detach(), gain0)
    hyp = HyperAnderson((6,))
    for tols in ((), (0.0,), ("a",)):
        with pytest.raises(ValueError, match="tolerances"):
            train_hyper_solver(Cell(), [torch.randn(2, 6)], hyp, loss="tolerance",
                               tolerances=tols)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"precondition": 1.0}, "precondition"),
        ({"precondition": -0.1}, "precondition"),
        ({"precondition": True}, "precondition"),
        ({"precondition_hidden": 0}, "precondition_hidden"),
        ({"precondition": 0.5, "precondition_groups": 3}, "precondition_groups"),
        ({"precondition": 0.5, "precondition_groups": 0}, "precondition_groups"),
        ({"beta_max": 0.0}, "beta_max"),
        ({"beta_init": 1.5, "beta_max": 1.0}, "beta_init"),
    ],
)
def test_preconditioner_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HyperAnderson((4, 3, 3), **kwargs)


# ----------------------------------------------------------- fast inference path (issue 18)


def _solve_both_paths(cell, u, make, max_steps=100, start=None):
    """The same solve with ``fast_inference`` off (the differentiable step under no_grad) and
    on (the inference path)."""
    out = {}
    for fast in (False, True):
        torch.manual_seed(0)
        hyp = make()
        hyp.fast_inference = fast
        z0 = torch.zeros_like(u) if start is None else start
        with torch.no_grad():
            out[fast] = dk.fixed_point(cell, z0, solver=hyp, args=(u,), max_steps=max_steps,
                                       throw=False)
    return out


def _recomputed_rel(cell, u, z):
    with torch.no_grad():
        fz = cell(z, u)
    return (fz - z).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1)


@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_precondition_into_matches_precondition(groups, dtype):
    """The inference preconditioner (float masks, preallocated scratch, written into a strided
    history slot) equals the differentiable one, with a trained-looking (random) network."""
    torch.manual_seed(0)
    a = torch.randn(5, 4, 6, 6, dtype=dtype)
    weight = torch.tensor([1.5, -0.7, 0.3, -2.0], dtype=dtype)
    fz = torch.nn.functional.group_norm(torch.relu(a), 2, weight,
                                        torch.randn(4, dtype=dtype)).flatten(1)
    solver = HyperAnderson((4, 6, 6), precondition=0.6, precondition_groups=groups,
                           precondition_hidden=4).to(dtype)
    with torch.no_grad():
        for p in solver.pre_net.parameters():
            p.normal_(0, 0.3)
        r = 1e-3 * torch.randn_like(fz)
        absr = r.norm(dim=1)
        ref = precondition(solver.pre_gain, solver.pre_net, fz, r, absr, 3, groups)
        hist = torch.full((5, 3, fz.shape[1]), float("nan"), dtype=dtype)
        work = torch.full((4, 7, fz.shape[1]), float("nan"), dtype=dtype)  # wider than W
        out = precondition_into(solver.pre_gain, solver.pre_net, fz, r, absr, 3, groups,
                                hist[:, 1], work)
    tol = 1e-12 if dtype == F64 else 1e-6
    assert out.data_ptr() == hist[:, 1].data_ptr()
    assert torch.allclose(out, ref, rtol=tol, atol=tol * float(r.abs().max()))
    assert torch.isnan(hist[:, 0]).all() and torch.isnan(hist[:, 2]).all()  # other slots


@pytest.mark.parametrize("groups", [None, 2])
def test_fast_inference_path_matches_the_step_path(groups):
    """fast_inference (default) takes the same steps as the differentiable step run under
    no_grad: same per-sample step counts, same solution to float rounding, and the reported
    residuals hold when recomputed (float64, several samples stopping at different steps)."""
    cell = relu_gn_cell().double()
    u = torch.randn(6, 8, 6, 6, dtype=F64) * torch.logspace(-1, 0.5, 6, dtype=F64).view(-1, 1,
                                                                                         1, 1)

    def make():
        return HyperAnderson((8, 6, 6), rtol=1e-8, atol=0, m=4, precondition=0.6,
                             precondition_groups=groups, beta_init=1.0, beta_max=2.0,
                             safeguard=2.0, hidden=None).double()

    out = _solve_both_paths(cell, u, make)
    old, new = out[False], out[True]
    assert new.result is dk.RESULTS.successful and old.result is dk.RESULTS.successful
    assert torch.equal(new.stats["nstep"], old.stats["nstep"])
    assert torch.allclose(new.value, old.value, rtol=0, atol=1e-10)
    rel = _recomputed_rel(cell, u, new.value)
    assert bool((rel <= 1e-8 * (1 + 1e-6)).all())
    assert torch.allclose(new.stats["rel_residual"].to(F64), rel, rtol=1e-6, atol=0)


def test_fast_inference_path_with_update_network_and_safeguard():
    """With an update network (random weights, so the safeguard rejects steps) the inference
    path still matches the step path, sample by sample (status, steps, value)."""
    cell = relu_gn_cell().double()
    u = torch.randn(5, 8, 6, 6, dtype=F64)

    def make():
        hyp = HyperAnderson((8, 6, 6), rtol=1e-7, atol=0, m=3, precondition=0.5,
                            precondition_groups=2, safeguard=1.0).double()
        with torch.no_grad():
            for p in hyp.update_net.parameters():
                p.normal_(0, 0.5)
            for p in hyp.pre_net.parameters():
                p.normal_(0, 0.1)
        return hyp

    out = _solve_both_paths(cell, u, make, max_steps=200)
    old, new = out[False], out[True]
    assert torch.equal(new.stats["status"], old.stats["status"])
    ok = new.stats["status"] == 0
    assert bool(ok.any())  # (the random network may stop some samples as diverged)
    assert torch.equal(new.stats["nstep"], old.stats["nstep"])
    assert torch.allclose(new.value, old.value, rtol=0, atol=1e-9)
    assert bool((_recomputed_rel(cell, u, new.value)[ok] <= 1e-7 * (1 + 1e-6)).all())


def test_fast_inference_vector_state_and_float32_conv_state():
    """The inference path on a vector state (no preconditioner, m=1 edge case) and on a
    float32 conv state from the initialiser (the benchmark's configuration)."""
    f = tanh_map()
    x = torch.randn(4, 6, dtype=F64)
    for m in (1, 3):
        out = _solve_both_paths(
            f, x, lambda m=m: HyperAnderson((6,), rtol=1e-10, atol=0, m=m, hidden=None,
                                            beta_init=0.8).double(), max_steps=300)
        assert out[True].result is dk.RESULTS.successful
        assert torch.equal(out[True].stats["nstep"], out[False].stats["nstep"])
        assert torch.allclose(out[True].value, out[False].value, atol=1e-12)
    cell = relu_gn_cell()
    u = torch.randn(6, 8, 6, 6)
    torch.manual_seed(0)
    hyp = HyperAnderson((8, 6, 6), rtol=1e-4, atol=0, m=4, init_hidden=None, init_groups=2,
                        precondition=0.7, precondition_groups=2, precondition_hidden=4,
                        beta_init=1.0, beta_max=2.0, safeguard=2.0, hidden=None)
    with torch.no_grad():
        z0 = hyp.initial_state(u)
    out = _solve_both_paths(cell, u, lambda: hyp, start=z0)
    assert torch.equal(out[True].stats["nstep"], out[False].stats["nstep"])
    assert torch.allclose(out[True].value, out[False].value, rtol=0, atol=1e-5)
    assert bool((_recomputed_rel(cell, u, out[True].value) <= 1e-4 * (1 + 1e-4)).all())


def test_inference_buffers_are_reused_and_not_shared_between_live_solves():
    """Consecutive solves reuse one set of history buffers (same result every time); a solve
    that starts while another one's state is alive gets its own."""
    cell = relu_gn_cell().double()
    u = torch.randn(4, 8, 6, 6, dtype=F64)
    hyp = HyperAnderson((8, 6, 6), rtol=1e-8, atol=0, precondition=0.6, precondition_groups=2,
                        hidden=None, beta_init=1.0, beta_max=2.0, safeguard=2.0).double()
    with torch.no_grad():
        sols = [dk.fixed_point(cell, torch.zeros_like(u), solver=hyp, args=(u,))
                for _ in range(3)]
        pool = hyp.__dict__["_buffer_pool"]
        assert len(pool) == 1
        ptr = next(iter(pool.values()))[0].data_ptr()
        flat = u.flatten(1)
        s1 = hyp.init(None, flat, flat, flat, 10)  # takes the pooled set
        s2 = hyp.init(None, flat, flat, flat, 10)  # the pool is empty: a fresh set
        assert s1.F.data_ptr() == ptr and s2.F.data_ptr() != ptr
        del s1, s2
        again = dk.fixed_point(cell, torch.zeros_like(u), solver=hyp, args=(u,))
    for s in [*sols[1:], again]:
        assert torch.equal(s.value, sols[0].value)
        assert torch.equal(s.stats["nstep"], sols[0].stats["nstep"])


def test_inference_buffers_across_inference_mode_and_no_grad():
    """Buffers made under torch.inference_mode are not reused by a no_grad solve (inference
    tensors cannot be written outside inference mode), and both give the same result."""
    cell = relu_gn_cell()
    u = torch.randn(3, 8, 6, 6)
    hyp = HyperAnderson((8, 6, 6), rtol=1e-5, atol=0, precondition=0.6, precondition_groups=2,
                        hidden=None, beta_init=1.0, beta_max=2.0, safeguard=2.0)
    with torch.inference_mode():
        a = dk.fixed_point(cell, torch.zeros_like(u), solver=hyp, args=(u,))
    with torch.no_grad():
        b = dk.fixed_point(cell, torch.zeros_like(u), solver=hyp, args=(u,))
    assert torch.equal(a.value, b.value) and a.result is dk.RESULTS.successful
