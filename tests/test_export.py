"""Fixed-step export of DEQ models: torch.export, ONNX, residual reporting."""

from __future__ import annotations

import itertools

import pytest
import torch

import deqkit as dk
from deqkit import FixedStepDEQ, FixedStepModel, export_fixed_steps, residual_at

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

# the fixed-step Anderson of the former solver="anderson" (regularisation 1e-6 for float32)
ANDERSON = dk.Anderson(m=5, regularisation=1e-6)
SOLVERS = {"picard": dk.Picard(), "anderson": ANDERSON}


def _mlp(**kw):
    torch.manual_seed(0)
    return dk.zoo.DEQMLP((1, 8, 8), 10, width=16, **kw).eval()


def _conv():
    torch.manual_seed(0)
    return dk.zoo.ConvDEQ((1, 8, 8), 10, channels=8, groups=2).eval()


@pytest.fixture(scope="module")
def exported():
    """DEQMLP with 8 Anderson steps, exported with a dynamic batch dimension."""
    model = _mlp()
    fixed = export_fixed_steps(model, 8, dk.Anderson(m=4, regularisation=1e-6))
    x = torch.randn(5, 1, 8, 8)
    batch = torch.export.Dim("batch", min=2, max=1024)
    ep = torch.export.export(fixed, (x,), dynamic_shapes=(({0: batch},),))
    return model, fixed, ep


def test_exported_program_equals_eager_fixed_step(exported):
    _, fixed, ep = exported
    x = torch.randn(7, 1, 8, 8)  # another batch size: the batch dimension is dynamic
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), fixed(x), rtol=1e-6, atol=1e-6)
    # no data-dependent control flow or host sync: the graph has no item()/nonzero() calls
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any(("item" in t or "nonzero" in t or "_local_scalar" in t) for t in targets)


def test_onnx_runtime_matches_eager(exported, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    _, fixed, ep = exported
    x = torch.randn(5, 1, 8, 8)
    onx = torch.onnx.export(ep, (x,), dynamo=True, optimize=False, verbose=False)
    path = tmp_path / "deq.onnx"
    onx.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x2 = torch.randn(9, 1, 8, 8)
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x2.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), fixed(x2), rtol=0, atol=1e-5)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("make", [_mlp, _conv], ids=["mlp", "conv"])
def test_fixed_steps_within_solver_tolerance_of_deq(make, solver):
    model = make()
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        logits = model(x)
        z_deq = model.deq.last_solution.value.flatten(1)
        r_deq = model.deq.last_solution.stats["rel_residual"]
        fixed = export_fixed_steps(model, 40, SOLVERS[solver])
        logits_fixed = fixed(x)
        inj = model.inject(x.flatten(1)) if hasattr(model, "inject") else model.stem(x)
        z_fixed = fixed.layers[0](inj).flatten(1)
    r_fixed = fixed.residual(x)
    assert float(r_fixed.max()) < 1e-5
    # Both are near-fixed points of a contraction: the gap is of the order of the residuals
    # times ||z|| / (1 - L); 20 allows L up to 0.95.
    gap = torch.linalg.vector_norm(z_fixed - z_deq, dim=1)
    bound = 20 * (r_deq + r_fixed) * torch.linalg.vector_norm(z_deq, dim=1) + 1e-6
    assert bool((gap <= bound).all()), (gap, bound)
    torch.testing.assert_close(logits_fixed, logits, rtol=0, atol=2e-3)


def test_tight_deq_and_fixed_steps_agree_on_trained_model():
    model = _mlp(solver=dk.Anderson(m=5, rtol=1e-6, atol=0), eval_max_steps=100)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        ref = model(x)
        out = export_fixed_steps(model, 60, ANDERSON)(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


def test_torch_export_conv_model():
    model = _conv()
    x = torch.randn(3, 1, 8, 8)
    fixed = export_fixed_steps(model, 4, dk.Picard(), example_inputs=(x,))
    ep = torch.export.export(fixed, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), fixed(x), rtol=1e-6, atol=1e-6)
    assert fixed.example_residual == pytest.approx(float(fixed.residual(x).max()), rel=1e-6)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_residual_decreases_with_steps(solver):
    model = _mlp()
    x = torch.randn(8, 1, 8, 8)
    res = [float(residual_at(model, k, (x,), solver=SOLVERS[solver]).max())
           for k in (1, 3, 6, 12, 24)]
    assert all(b < a for a, b in itertools.pairwise(res)), res
    assert res[-1] < 1e-5


def test_picard_steps_match_manual_iteration_and_damping():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    layer = dk.nn.DEQ(lambda z, x: torch.tanh(0.5 * lin(z) + x))
    x = torch.randn(3, 4)
    with torch.no_grad():
        z = torch.zeros_like(x)
        for _ in range(5):
            z = 0.5 * z + 0.5 * torch.tanh(0.5 * lin(z) + x)
        torch.testing.assert_close(FixedStepDEQ(layer, 5, dk.Picard(damping=0.5))(x), z)
        fixed = FixedStepDEQ(layer, 5, dk.FixedSteps(dk.Picard(damping=0.5)))  # unwrapped
        torch.testing.assert_close(fixed(x), z)


def test_tuple_state_mdeq_and_original_untouched():
    torch.manual_seed(0)
    model = dk.zoo.MDEQ((1, 8, 8), 10, channels=(4, 8), groups=2).eval()
    x = torch.randn(2, 1, 8, 8)
    fixed = export_fixed_steps(model, 30, ANDERSON)
    assert isinstance(model.deq, dk.nn.DEQ) and isinstance(fixed.module.deq, FixedStepDEQ)
    assert fixed.module.head.weight is model.head.weight  # parameters are shared
    assert {id(p) for p in fixed.parameters()} == {id(p) for p in model.parameters()}
    with torch.no_grad():
        ref = model(x)
        out = fixed(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-3)
    assert not fixed.training


def test_dtype_state_float32_for_bf16_cell():
    lin = torch.nn.Linear(4, 4).to(torch.bfloat16)
    seen = []

    def cell(z, x):
        seen.append(z.dtype)
        return torch.tanh(0.5 * lin(z) + x)

    out = FixedStepDEQ(dk.nn.DEQ(cell), 3, ANDERSON)(torch.randn(2, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and set(seen) == {torch.bfloat16}


def test_errors():
    model = _mlp()
    with pytest.raises(TypeError, match=r"`solver` must be dk\.Picard\(\.\.\.\) or dk\.Anderson"):
        export_fixed_steps(model, 5, dk.Broyden())
    with pytest.raises(TypeError, match=r"\['m'\] are fields of the solver object"):
        export_fixed_steps(model, 5, ANDERSON, m=3)
    with pytest.raises(TypeError, match="unknown keyword"):
        export_fixed_steps(model, 5, ANDERSON, memory=3)
    with pytest.raises(ValueError, match="`solver` must be one of 'picard', 'anderson'"):
        export_fixed_steps(model, 5, "broyden")  # not even a deprecated name
    with pytest.raises(ValueError, match="steps"):
        export_fixed_steps(model, 0)
    with pytest.raises(ValueError, match=r"no dk\.nn\.DEQ"):
        export_fixed_steps(torch.nn.Linear(2, 2), 5)
    with pytest.raises(TypeError, match="tuple"):
        export_fixed_steps(model, 5, example_inputs=torch.randn(2, 1, 8, 8))
    with pytest.raises(TypeError):
        FixedStepModel("not a module", 5)
    with pytest.raises(TypeError, match="MonotoneDEQ computes its cell's inputs"):
        export_fixed_steps(dk.zoo.MonotoneClassifier((4,), 2, width=4), 5)


@pytest.mark.parametrize(("legacy", "obj", "text"), [
    ({"solver": "picard"}, dk.Picard(), r"solver=dk\.Picard\(\)"),
    ({"beta": 0.5}, dk.Picard(damping=0.5), r"solver=dk\.Picard\(damping=0\.5\)"),
    ({"solver": "anderson"}, ANDERSON,
     r"solver=dk\.Anderson\(m=5, beta=1\.0, regularisation=1e-06\)"),
    ({"solver": "anderson", "m": 3, "beta": 0.7},
     dk.Anderson(m=3, beta=0.7, regularisation=1e-6),
     r"solver=dk\.Anderson\(m=3, beta=0\.7, regularisation=1e-06\)"),
])
def test_string_solvers_and_options_are_deprecated_with_the_same_numbers(legacy, obj, text):
    model = _mlp()
    x = torch.randn(3, 1, 8, 8)
    with pytest.warns(DeprecationWarning, match="export_fixed_steps.*deprecated.*" + text) as w:
        old = export_fixed_steps(model, 7, **legacy)
    assert w[0].filename == __file__  # the user's line
    with pytest.warns(DeprecationWarning, match="FixedStepDEQ.*" + text):
        layer = FixedStepDEQ(model.deq, 7, **legacy)
    with pytest.warns(DeprecationWarning, match="residual_at.*" + text):
        r_old = residual_at(model, 7, (x,), **legacy)
    new = export_fixed_steps(model, 7, obj)
    assert layer.solver == obj == new.solver
    with torch.no_grad():
        torch.testing.assert_close(old(x), new(x), rtol=0, atol=0)
    torch.testing.assert_close(r_old, residual_at(model, 7, (x,), obj), rtol=0, atol=0)
