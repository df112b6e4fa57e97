"""Model zoo: shapes, gradients, convergence at init, implicit-vs-unrolled gradients."""

from __future__ import annotations

import pytest
import torch

import deqkit as dk
from deqkit.adjoint import OneStepAdjoint
from deqkit.zoo import (
    DEQMLP,
    MDEQ,
    MODELS,
    ConvDEQ,
    DEQTransformerLM,
    MonotoneClassifier,
    TransformerCell,
    build_model,
    hyperparameters,
    unrolled,
)

F64 = torch.float64
VOCAB, SEQ = 7, 5

# name -> (in_shape, num_classes, tiny hyperparameters)
TINY = {
    "deq_mlp": ((6,), 3, dict(width=8)),
    "conv_deq": ((2, 5, 5), 3, dict(channels=4, groups=2)),
    "mdeq": ((1, 8, 8), 3, dict(channels=(4, 4), groups=1)),
    "deq_transformer": ((SEQ,), VOCAB, dict(d_model=8, n_heads=2, d_ff=16)),
    "monotone": ((6,), 3, dict(width=8)),
    "resnet_mlp": ((6,), 3, dict(width=8, depth=2)),
    "resnet_conv": ((2, 5, 5), 3, dict(channels=4, depth=2, groups=2)),
    "unrolled_mlp": ((6,), 3, dict(width=8, depth=3)),
    "unrolled_conv": ((2, 5, 5), 3, dict(channels=4, groups=2, depth=3)),
    "node": ((6,), 3, dict(width=8)),
    "transformer": ((SEQ,), VOCAB, dict(d_model=8, n_heads=2, d_ff=16, depth=2)),
}
DEQ_NAMES = ["deq_mlp", "conv_deq", "mdeq", "deq_transformer", "monotone"]
LM_NAMES = {"deq_transformer", "transformer"}


def _build(name, **overrides):
    if name == "node":
        pytest.importorskip("torchdiffeq")
    in_shape, num_classes, kw = TINY[name]
    return build_model(name, in_shape, num_classes, **{**kw, **overrides})


def _inputs(name, B=3, dtype=torch.float32):
    in_shape, _, _ = TINY[name]
    if name in LM_NAMES:
        return torch.randint(0, VOCAB, (B, *in_shape))
    return torch.randn(B, *in_shape, dtype=dtype)


def _expected_shape(name, B=3):
    in_shape, num_classes, _ = TINY[name]
    return (B, in_shape[0], num_classes) if name in LM_NAMES else (B, num_classes)


def test_registry_names():
    assert sorted(MODELS) == sorted(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_shape_and_gradients(name):
    model = _build(name)
    x = _inputs(name)
    out = model(x)
    assert out.shape == _expected_shape(name)
    assert out.dtype == torch.float32
    loss = out.square().mean() + out.sum()
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
    # at least the cell's weights really receive gradient
    assert sum(float(p.grad.abs().sum()) for p in model.parameters()) > 0


@pytest.mark.parametrize("name", DEQ_NAMES)
def test_deq_converges_at_init(name):
    model = _build(name).eval()
    with torch.no_grad():
        model(_inputs(name, B=4))
    sol = model.deq.last_solution
    assert sol.result is dk.RESULTS.successful, sol.summary()
    steps = model.deq.eval_max_steps
    assert int(sol.stats["nstep"].max()) <= steps


@pytest.mark.parametrize("name", DEQ_NAMES)
def test_deq_training_mode_solve_is_close(name):
    # the (smaller) training budget may stop a sample early, but near its equilibrium
    model = _build(name).train()
    model(_inputs(name, B=4)).sum().backward()
    sol = model.deq.last_solution
    assert sol.result in (dk.RESULTS.successful, dk.RESULTS.max_steps_reached)
    assert float(sol.stats["rel_residual"].max()) < 1e-2, sol.summary()


def _set_solve(model, solver, adjoint, steps):
    model.deq.solver = solver
    model.deq.adjoint = adjoint
    model.deq.max_steps = model.deq.eval_max_steps = steps


def _flat_grad(model, x, w):
    model.zero_grad()
    (model(x) * w).sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("name", DEQ_NAMES)
def test_implicit_gradient_matches_unrolled(name):
    overrides = {"m": 0.5} if name == "monotone" else {}
    model = _build(name, **overrides).double().eval()  # eval: frozen spectral-norm vectors
    x = _inputs(name, B=2, dtype=F64)
    w = torch.randn(_expected_shape(name, B=2), dtype=F64)
    _set_solve(
        model,
        dk.Anderson(rtol=1e-11, atol=0),
        dk.ImplicitAdjoint(dk.GMRES(rtol=1e-12, atol=0, max_steps=400, restart=100),
                           on_failure="raise"),
        300,
    )
    g_imp = _flat_grad(model, x, w)
    assert model.deq.last_solution.result is dk.RESULTS.successful
    assert all(model.deq.last_solution.backward["converged"])
    # reference: backprop through the iterations of a tightly converged Anderson solve
    _set_solve(model, dk.Anderson(rtol=1e-11, atol=0), dk.UnrolledAdjoint(), 300)
    g_unr = _flat_grad(model, x, w)
    assert model.deq.last_solution.result is dk.RESULTS.successful
    cos = torch.nn.functional.cosine_similarity(g_imp, g_unr, dim=0)
    rel = (g_imp - g_unr).norm() / g_unr.norm()
    assert cos > 0.999 and rel < 1e-4, (float(cos), float(rel))


@pytest.mark.parametrize("name", ["unrolled_mlp", "unrolled_conv"])
def test_unrolled_runs_exactly_depth_steps(name):
    model = _build(name)
    model(_inputs(name))
    assert isinstance(model.deq.adjoint, dk.UnrolledAdjoint)
    assert (model.deq.last_solution.stats["nstep"] == TINY[name][2]["depth"]).all()


def test_unrolled_factory_matches_classes():
    model = unrolled(DEQMLP, 4, (6,), 3, width=8)
    model(torch.randn(2, 6))
    assert (model.deq.last_solution.stats["nstep"] == 4).all()
    with pytest.raises(TypeError, match="solver"):
        unrolled(DEQMLP, 4, (6,), 3, solver=dk.Anderson())


@pytest.mark.parametrize(("cls", "base", "args", "kw"), [
    ("UnrolledMLP", DEQMLP, ((6,), 3), dict(width=8)),
    ("UnrolledConv", ConvDEQ, ((2, 5, 5), 3), dict(channels=4, groups=2)),
])
def test_unrolled_classes_are_the_factory(cls, base, args, kw):
    # one construction: the class and unrolled(base, ...) give the same model and numbers
    torch.manual_seed(0)
    a = getattr(dk.zoo, cls)(*args, depth=3, **kw)
    torch.manual_seed(0)
    b = unrolled(base, 3, *args, **kw)
    assert isinstance(a, base) and type(b) is base
    x = torch.randn(2, *args[0])
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert (a.deq.max_steps, a.deq.eval_max_steps) == (3, 3)
    assert repr(a.deq.solver) == repr(b.deq.solver) == repr(dk.FixedSteps(dk.Picard()))


def test_monotone_classifier_budgets_live_on_its_layer():
    model = MonotoneClassifier((6,), 3, width=8, max_steps=2, eval_max_steps=5,
                               solver=dk.FixedSteps(dk.Picard()))
    assert (model.deq.max_steps, model.deq.eval_max_steps) == (2, 5)
    x = torch.randn(3, 6)
    model(x)
    assert int(model.deq.last_solution.stats["nstep"].max()) == 2
    model.eval()
    with torch.no_grad():
        model(x)
        assert int(model.deq.last_solution.stats["nstep"].max()) == 5
        with model.deq.overrides(eval_max_steps=4):
            model(x)
        assert int(model.deq.last_solution.stats["nstep"].max()) == 4
    model.max_steps = 7  # the classifier's budgets are its layer's
    assert (model.max_steps, model.deq.max_steps, model.eval_max_steps) == (7, 7, 5)
    with pytest.raises(ValueError, match="MonotoneClassifier: `eval_max_steps`"):
        MonotoneClassifier((6,), 3, eval_max_steps=-1)


def test_mdeq_state_is_tuple_of_two_resolutions():
    model = MDEQ((1, 6, 6), 3, channels=(4, 8), groups=2)
    model(torch.randn(2, 1, 6, 6))
    z = model.deq.last_solution.value
    assert isinstance(z, tuple) and len(z) == 2
    assert z[0].shape == (2, 4, 6, 6) and z[1].shape == (2, 8, 3, 3)
    signal = MDEQ((2, 9), 3, channels=(4, 4), groups=2)  # 1-D signals, odd length
    assert signal(torch.randn(2, 2, 9)).shape == (2, 3)
    assert [t.shape[2:] for t in signal.deq.last_solution.value] == [(9,), (5,)]


def test_conv_deq_on_signals_and_flatten_head():
    model = ConvDEQ((1, 12), 4, channels=4, groups=2, head="flatten")
    assert isinstance(model.stem[0], torch.nn.Conv1d)
    assert model(torch.randn(3, 1, 12)).shape == (3, 4)


def test_conv_deq_kernel_dilation_dropout_options():
    # defaults keep the original architecture (3-tap convs, no dropout modules)
    base = ConvDEQ((1, 12), 4, channels=4, groups=2)
    assert base.deq.cell.conv1.kernel_size == (3,) and base.deq.cell.drop is None
    assert base.head_drop is None and base.stem[0].kernel_size == (3,)
    model = ConvDEQ((1, 12), 4, channels=4, groups=2, kernel_size=5, dilation=2,
                    stem_kernel=7, dropout=0.2, head_dropout=0.3)
    cell = model.deq.cell
    assert cell.conv1.kernel_size == (5,) and cell.conv1.dilation == (2,)
    assert cell.conv2.kernel_size == (5,) and model.stem[0].kernel_size == (7,)
    assert isinstance(cell.drop, dk.nn.VariationalDropout2d) and cell.drop.p == 0.2
    x = torch.randn(3, 1, 12)
    out = model(x)
    assert out.shape == (3, 4)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    mask = cell.drop.mask.clone()
    model(x)  # a new solve draws a new mask
    assert not torch.equal(mask, cell.drop.mask)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))  # eval: deterministic
    image = ConvDEQ((1, 6, 6), 3, channels=4, groups=2, kernel_size=5, dilation=2, dropout=0.1)
    assert image(torch.randn(2, 1, 6, 6)).shape == (2, 3)
    for shape, kernel in (((1, 13), 5), ((1, 12), 3), ((2, 7, 6), 3)):
        strided = ConvDEQ(shape, 3, channels=4, groups=2, stem_kernel=kernel, stem_stride=2)
        assert strided(torch.randn(2, *shape)).shape == (2, 3)
        assert strided.deq.last_solution.value.shape[2:] == tuple((n + 1) // 2 for n in shape[1:])
    for bad in (dict(kernel_size=4), dict(dilation=0), dict(stem_kernel=2), dict(dropout=1.0),
                dict(head_dropout=-0.1), dict(stem_stride=0)):
        with pytest.raises(ValueError):
            ConvDEQ((1, 12), 4, channels=4, groups=2, **bad)


def test_deq_models_use_groupnorm_not_batchnorm():
    for name in DEQ_NAMES:
        model = _build(name)
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                       for m in model.modules())


def test_transformer_cell_is_causal():
    model = DEQTransformerLM(VOCAB, d_model=8, n_heads=2, d_ff=16, block_size=6).double().eval()
    _set_solve(model, dk.Anderson(rtol=1e-13, atol=0), dk.ImplicitAdjoint(), 300)
    idx = torch.randint(0, VOCAB, (2, 6))
    idx2 = idx.clone()
    idx2[:, 4:] = (idx2[:, 4:] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(idx), model(idx2)
        # the cell itself, exactly
        u, u2 = model.embed(idx), model.embed(idx2)
        z = torch.randn_like(u)
        c, c2 = model.deq.cell(z, u), model.deq.cell(z, u2)
    assert torch.equal(c[:, :4], c2[:, :4]) and not torch.allclose(c[:, 4:], c2[:, 4:])
    torch.testing.assert_close(a[:, :4], b[:, :4], atol=1e-9, rtol=0)
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_transformer_dropout_trains():
    model = DEQTransformerLM(VOCAB, d_model=8, n_heads=2, d_ff=16, block_size=6, dropout=0.1)
    model(torch.randint(0, VOCAB, (2, 6))).sum().backward()
    assert model.deq.last_solution.result is dk.RESULTS.successful


def test_transformer_default_recipe():
    model = DEQTransformerLM(VOCAB, d_model=8, n_heads=2, d_ff=16, block_size=6)
    assert isinstance(model.deq.adjoint, OneStepAdjoint)
    assert isinstance(model.deq.solver, dk.Picard) and model.deq.max_steps == 1
    with pytest.raises(ValueError, match="residual_weight"):
        OneStepAdjoint(residual_weight=-1.0)


@pytest.mark.parametrize("weight", [0.0, 0.7])
def test_transformer_one_step_adjoint_matches_manual_step(weight):
    # value = f(z_hat, u) and the gradient of loss + weight * mean relative residual^2 through
    # that one application, z_hat (the solver's iterate) held constant
    torch.manual_seed(0)
    cell = TransformerCell(8, 2, 16).double()
    for lin in (cell.attn.qkv, cell.attn.proj, cell.mlp[0], cell.mlp[2]):
        torch.nn.init.normal_(lin.weight, 0.0, 0.5)  # not the near-constant map of the init
    u = torch.randn(2, 5, 8, dtype=F64, requires_grad=True)
    w = torch.randn(2, 5, 8, dtype=F64)
    params = [u, *cell.parameters()]

    sol = dk.fixed_point(cell, torch.zeros_like(u), solver=dk.Picard(rtol=1e-4, atol=1e-6),
                         adjoint=OneStepAdjoint(residual_weight=weight), max_steps=1,
                         args=(u,), throw=False)
    assert sol.result is dk.RESULTS.max_steps_reached  # a short solve: z_hat != z*
    got = torch.autograd.grad((sol.value * w).sum(), params)

    z_hat = cell(torch.zeros_like(u), u).detach()  # one Picard step from zero
    ref = cell(z_hat, u)
    torch.testing.assert_close(sol.value, ref, rtol=1e-12, atol=1e-12)
    rel2 = ((ref - z_hat).flatten(1).square().sum(1)
            / ref.detach().flatten(1).square().sum(1))
    assert float(rel2.detach().mean()) > 1e-2  # the penalty is not negligible
    want = torch.autograd.grad((ref * w).sum() + weight * rel2.mean(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_transformer_one_step_adjoint_not_applied_without_grad():
    model = DEQTransformerLM(VOCAB, d_model=8, n_heads=2, d_ff=16, block_size=6).eval()
    idx = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        a = model(idx)
    assert model.deq.last_solution.result is dk.RESULTS.successful
    b = model(idx)  # with grad: the adjoint adds one application at the converged solution
    torch.testing.assert_close(a, b.detach(), rtol=1e-3, atol=1e-3)


def test_node_counts_evaluations():
    pytest.importorskip("torchdiffeq")
    model = _build("node")
    out = model(_inputs("node"))
    nfe = model.nfe
    assert nfe >= 6  # dopri5: at least one step
    out.sum().backward()
    assert model.nfe == nfe and model.nfe_backward > 0
    plain = _build("node", adjoint=False)
    plain(_inputs("node")).sum().backward()
    assert all(p.grad is not None for p in plain.parameters())


def test_registry_errors():
    with pytest.raises(ValueError, match="deq_mlp"):
        build_model("nope", (4,), 2)
    with pytest.raises(TypeError, match="widht"):
        build_model("deq_mlp", (4,), 2, widht=3)
    with pytest.raises(TypeError, match="solver"):
        build_model("unrolled_mlp", (4,), 2, solver=dk.Picard())
    # DEQ-layer options pass through; unrolled models accept their parent's hyperparameters
    assert build_model("deq_mlp", (4,), 2, width=4, throw=True).deq.throw
    assert build_model("unrolled_mlp", (4,), 2, width=4, depth=2).depth == 2
    assert "width" in hyperparameters(MODELS["unrolled_mlp"])
    lm = build_model("transformer", (SEQ,), VOCAB, d_model=8, n_heads=2, d_ff=16, depth=1)
    assert lm.block_size == SEQ and lm.vocab_size == VOCAB


def test_bad_arguments():
    with pytest.raises(ValueError, match="in_shape"):
        DEQMLP((0,), 3)
    with pytest.raises(ValueError, match="groups"):
        ConvDEQ((1, 8, 8), 3, channels=6, groups=4)
    with pytest.raises(ValueError, match=r"rank|signals"):
        ConvDEQ((8,), 3)
    with pytest.raises(ValueError, match=r"expected input"):
        DEQMLP((4,), 3, width=4)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="block_size"):
        DEQTransformerLM(VOCAB, d_model=8, n_heads=2, d_ff=16, block_size=3)(
            torch.randint(0, VOCAB, (1, 4))
        )
