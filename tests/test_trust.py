"""A success flag that never lies, gradients that are right or refused, inputs that are
refused clearly (issue 13). Each test here failed before the fix it guards."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import deqkit as dk
from helpers import F64, contractive_matrix

SUCCESS = dk.RESULTS.successful.code
ALL_SOLVERS = [
    dk.Picard(),
    dk.Anderson(),
    dk.Anderson(m=2),
    dk.Broyden(),
    dk.Broyden(line_search=True),
    dk.NewtonKrylov(),
]


def _ids(s):
    return repr(s)[:40]


# ----------------------------------------------------------------------- overflow (item 1)


def _overflow_problem():
    x = torch.zeros(4, 3)
    x[1] = 100.0  # exp(100) overflows float32
    return (lambda z, x: 0.5 * torch.tanh(z) + torch.exp(x)), x


def test_overflowing_sample_is_not_successful_and_raises():
    f, x = _overflow_problem()
    with pytest.raises(dk.SolverError, match="nonfinite"):
        dk.fixed_point(f, torch.zeros(4, 3), args=(x,), throw=True)
    sol = dk.fixed_point(f, torch.zeros(4, 3), args=(x,), throw=False)
    st = sol.stats["status"].tolist()
    assert st == [SUCCESS, dk.RESULTS.nonfinite.code, SUCCESS, SUCCESS]
    assert bool(torch.isfinite(sol.value).all())  # the last finite iterate (z0 here)
    assert torch.equal(sol.value[1], torch.zeros(3))
    assert not bool(sol.stats["rel_residual"].isnan().any())


@pytest.mark.parametrize("adjoint", [dk.JacobianFreeAdjoint(), dk.PhantomAdjoint(),
                                     dk.OneStepAdjoint(), dk.ImplicitAdjoint()], ids=_ids)
def test_nonfinite_sample_returns_last_finite_iterate_under_every_adjoint(adjoint):
    # item 6: the docs promise the last finite iterate; with gradients on, JFB, phantom and
    # one-step returned NaN for such a sample.
    f, x = _overflow_problem()
    w = torch.ones(3, requires_grad=True)
    sol = dk.fixed_point(lambda z, x: w * f(z, x), torch.zeros(4, 3), args=(x,),
                         adjoint=adjoint, throw=False)
    assert sol.stats["status"][1] == dk.RESULTS.nonfinite.code
    assert bool(torch.isfinite(sol.value).all())
    assert torch.equal(sol.value[1].detach(), torch.zeros(3))


def test_fp16_autocast_overflow_is_nonfinite_and_not_cached():
    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)
            self.inj = torch.nn.Linear(3, 3)

        def forward(self, z, x):
            return 0.4 * torch.tanh(self.lin(z)) + self.inj(x)

    torch.manual_seed(0)
    layer = dk.nn.DEQ(Cell(), solver=dk.Anderson(rtol=1e-3, atol=0), max_steps=40)
    x = torch.randn(4, 3)
    x[2] = 0.5
    x[2, 0] = 1e6  # beyond float16's 65504
    cache = dk.nn.FixedPointCache(8)
    ids = torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.float16), layer.warm_start(cache, ids), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(x)
    st = layer.last_solution.stats["status"].tolist()
    assert st[2] == dk.RESULTS.nonfinite.code and st.count(SUCCESS) == 3
    assert any(issubclass(w.category, dk.nn.DEQWarning) for w in caught)
    assert cache.state_dict()["seen"].tolist()[:4] == [True, True, False, True]


# ------------------------------------------------------------------------ runaway (item 2)

RUNAWAY = {
    "z+1": lambda z, x: z + 1,
    "z+|x|+1": lambda z, x: z + x.abs() + 1,
    "relu(z)+|x|+1": lambda z, x: torch.relu(z) + x.abs() + 1,
}


@pytest.mark.parametrize("solver", ALL_SOLVERS, ids=_ids)
@pytest.mark.parametrize("name", sorted(RUNAWAY))
@pytest.mark.parametrize("random_start", [False, True])
def test_maps_without_fixed_point_are_never_successful(solver, name, random_start):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 16, generator=g)
    z0 = torch.randn(8, 16, generator=g) if random_start else torch.zeros(8, 16)
    sol = dk.fixed_point(RUNAWAY[name], z0, solver, args=(x,), throw=False, max_steps=50)
    assert not bool(sol.stats["converged"].any()), sol.summary()
    assert sol.result is not dk.RESULTS.successful


@pytest.mark.parametrize("solver", [dk.Anderson(), dk.Anderson(m=2), dk.Broyden()], ids=_ids)
def test_runaway_iterates_are_reported_diverged(solver):
    # These solvers extrapolate |z| to 1e5-1e9 within a few steps (the examples).
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 16, generator=g)
    sol = dk.fixed_point(RUNAWAY["z+|x|+1"], torch.zeros(8, 16), solver, args=(x,),
                         throw=False)
    assert sol.result is dk.RESULTS.diverged, sol.summary()
    assert "diverging" in dk.RESULTS.diverged.message


def test_root_find_and_minimise_without_a_root_are_not_successful():
    sol = dk.root_find(lambda z: torch.tanh(z) + 2.0, torch.zeros(3, 2), throw=False)
    assert not bool(sol.stats["converged"].any())
    sol = dk.root_find(lambda z: torch.tanh(z) + 2.0, torch.zeros(3, 2), solver=dk.Broyden(),
                       throw=False)
    assert not bool(sol.stats["converged"].any())
    sol = dk.minimise(lambda z: (2 * z + F.softplus(z)).sum(1), torch.zeros(3, 2),
                      solver=dk.Broyden(), throw=False)
    assert sol.result is dk.RESULTS.diverged, sol.summary()


@pytest.mark.parametrize("solver", [dk.Broyden(rtol=1e-8, atol=1e-8), dk.NewtonKrylov(),
                                    dk.Anderson(rtol=1e-8, atol=1e-8)], ids=_ids)
def test_bad_root_from_another_suite(solver):
    # optimistix's "bad root": the first component of F never vanishes.
    def F_(z):
        return torch.stack([torch.ones_like(z[:, 0]), torch.tanh(z[:, 1] - 0.5),
                            torch.tanh(2 * z[:, 2])], 1)

    sol = dk.root_find(F_, torch.tensor([[0.5, -0.3, 0.7]]), solver=solver, throw=False,
                       max_steps=100)
    assert sol.result in (dk.RESULTS.max_steps_reached, dk.RESULTS.diverged), sol.summary()


@pytest.mark.parametrize("solver", [dk.Picard(rtol=1e-9, atol=0), dk.Anderson(rtol=1e-9, atol=0),
                                    dk.Broyden(rtol=1e-9, atol=0)], ids=_ids)
def test_large_legitimate_growth_still_converges(solver):
    # z* = 100 b from z0 = 0: the iterate grows 100x while its residual shrinks far more.
    b = torch.randn(3, 4, dtype=F64)
    sol = dk.fixed_point(lambda z, b: 0.99 * z + b, torch.zeros(3, 4, dtype=F64), solver,
                         args=(b,), max_steps=3000)
    torch.testing.assert_close(sol.value, 100 * b, rtol=1e-6, atol=0)


def test_rel_residual_is_the_tested_quantity():
    sol = dk.fixed_point(lambda z: 0.5 * torch.tanh(z) + 1, torch.zeros(5, 3, dtype=F64),
                         dk.Picard(rtol=1e-8, atol=0), max_steps=100)
    z = sol.value
    r = torch.linalg.vector_norm(torch.tanh(z) * 0.5 + 1 - z, dim=1)
    torch.testing.assert_close(sol.stats["abs_residual"], r)
    assert bool((sol.stats["rel_residual"] <= 1e-8).all())


def test_fallback_retry_keeps_the_stopping_scale():
    # Anderson runs off; Broyden then restarts from the lowest-residual iterate: the retry must
    # keep the first attempt's scale, so it cannot be "successful" either.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 16, generator=g)
    chain = dk.FallbackChain(dk.Anderson(), dk.Broyden())
    sol = dk.fixed_point(RUNAWAY["z+|x|+1"], torch.zeros(8, 16), chain, args=(x,), throw=False)
    assert not bool(sol.stats["converged"].any())


def test_fixed_steps_claims_no_convergence():
    # exactly max_steps updates, no tolerance test: never "successful"/"converged", and throw
    # raises only for a real failure
    x = torch.ones(3, 2, dtype=F64)
    sol = dk.fixed_point(lambda z, x: 0.5 * z + x, torch.zeros_like(x), dk.FixedSteps(),
                         args=(x,), max_steps=3)
    assert sol.result is dk.RESULTS.max_steps_reached and not bool(sol.stats["converged"].any())
    torch.testing.assert_close(sol.value, 1.75 * x)  # the last iterate
    f, xo = _overflow_problem()
    with pytest.raises(dk.SolverError, match="nonfinite"):
        dk.fixed_point(f, torch.zeros(4, 3), dk.FixedSteps(), args=(xo,), max_steps=3)
    # float32 Picard lands exactly on its fixed point, then rounding moves the residual off 0:
    # neither that nor divergence_ratio=None stops a fixed-step solve before its steps
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    for ratio in (None, 1e4):
        sol = dk.fixed_point(lambda z, x: 0.3 * torch.tanh(z) + x, torch.zeros(8, 4),
                             dk.FixedSteps(), args=(x,), max_steps=64, divergence_ratio=ratio)
        assert sol.stats["nstep"].tolist() == [64] * 8 and sol.result.name == "max_steps_reached"


# ------------------------------------------------------------------ second order (item 3)

FIRST_ORDER = [dk.SHINEAdjoint(), dk.JacobianFreeAdjoint(), dk.PhantomAdjoint(),
               dk.OneStepAdjoint()]


def _tanh_cell(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = contractive_matrix(3, 0.5, gen=g)
    x = torch.randn(2, 3, dtype=F64, generator=g, requires_grad=True)
    return (lambda z, x: torch.tanh(z @ W.T + x)), x


@pytest.mark.parametrize("adjoint", FIRST_ORDER, ids=_ids)
def test_second_order_through_first_order_adjoints_raises(adjoint):
    f, x = _tanh_cell()
    sol = dk.fixed_point(f, torch.zeros(2, 3, dtype=F64), dk.Anderson(rtol=1e-12, atol=0),
                         adjoint, args=(x,))
    # the recipe: grad with create_graph, then differentiate that gradient again
    with pytest.raises(dk.HigherOrderError, match="UnrolledAdjoint"):
        (g,) = torch.autograd.grad(sol.value.square().sum(), x, create_graph=True)
        torch.autograd.grad(g.sum(), x)
    sol = dk.fixed_point(f, torch.zeros(2, 3, dtype=F64), dk.Anderson(rtol=1e-12, atol=0),
                         adjoint, args=(x,))
    with pytest.raises(dk.HigherOrderError):
        sol.value.sum().backward(create_graph=True)


@pytest.mark.parametrize("solver, steps", [(dk.Picard(rtol=1e-30, atol=0), 25),
                                           (dk.Anderson(rtol=1e-30, atol=0, m=3), 6)], ids=_ids)
def test_second_order_through_unrolled_matches_finite_differences(solver, steps):
    # (Anderson: a few steps, before its residuals, and so its Gram matrix, vanish exactly)
    f, x = _tanh_cell()

    def z_star(x):
        return dk.fixed_point(f, torch.zeros(2, 3, dtype=F64), solver, dk.UnrolledAdjoint(),
                              args=(x,), max_steps=steps, throw=False).value

    assert torch.autograd.gradgradcheck(z_star, (x,))


def test_first_order_gradients_still_work_with_create_graph_off():
    f, x = _tanh_cell()
    for adjoint in [*FIRST_ORDER, dk.ImplicitAdjoint()]:
        sol = dk.fixed_point(f, torch.zeros(2, 3, dtype=F64), dk.Anderson(rtol=1e-12, atol=0),
                             adjoint, args=(x,))
        (g,) = torch.autograd.grad(sol.value.sum(), x)
        assert bool(torch.isfinite(g).all())


# --------------------------------------------------------------------- bad rows (item 4)


def test_one_nonfinite_gradient_row_does_not_poison_the_batch():
    g = torch.Generator().manual_seed(1)
    W = contractive_matrix(5, 0.8, gen=g)
    x = torch.randn(4, 5, dtype=F64, generator=g, requires_grad=True)

    def grads(weight):
        x.grad = None
        sol = dk.fixed_point(lambda z, x: torch.tanh(z @ W.T + x),
                             torch.zeros(4, 5, dtype=F64), dk.Anderson(rtol=1e-13, atol=0),
                             dk.ImplicitAdjoint(dk.GMRES(rtol=1e-13, atol=0)), args=(x,))
        (sol.value * weight).sum().backward()
        return x.grad.clone(), sol

    ones = torch.ones(4, 5, dtype=F64)
    ref, _ = grads(ones)
    bad = ones.clone()
    bad[1, 0] = float("inf")
    got, sol = grads(bad)
    keep = [0, 2, 3]
    torch.testing.assert_close(got[keep], ref[keep], rtol=1e-10, atol=1e-12)
    assert not bool(torch.isfinite(got[1]).all())  # passed through: a scaler sees it
    assert sol.backward["nonfinite_grad"].tolist() == [False, True, False, False]
    assert sol.backward["converged"].tolist() == [True, False, True, True]
    # and the healthy rows really are the implicit gradient, not the Jacobian-free one
    z = sol.value.detach()
    for b in keep:
        s = 1 - torch.tanh(z[b] @ W.T + x[b].detach()) ** 2
        J = s[:, None] * W
        u = torch.linalg.solve((torch.eye(5, dtype=F64) - J).T, torch.ones(5, dtype=F64))
        torch.testing.assert_close(got[b], s * u, rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------- batch contract (item 5)


def test_one_dimensional_z0_is_refused():
    with pytest.raises(ValueError, match=r"reshape\(-1, 1\)"):
        dk.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(3))


def test_batch_coupled_f_is_refused_when_rows_leave_the_batch():
    x = torch.linspace(0.01, 2, 6).unsqueeze(1).repeat(1, 4)  # rows converge at different steps
    f = lambda z, x: 0.5 * torch.tanh(z - z.mean(0)) + x  # noqa: E731
    with pytest.raises(ValueError, match="couples the samples"):
        dk.fixed_point(f, torch.zeros(6, 4), dk.Picard(rtol=1e-5), args=(x,))


def test_batch_coupled_closure_is_refused_without_compaction():
    x = torch.linspace(0.01, 2, 6).unsqueeze(1).repeat(1, 4)
    with pytest.raises(ValueError, match="couples the samples"):
        dk.fixed_point(lambda z: 0.5 * torch.tanh(z - z.mean(0)) + x, torch.zeros(6, 4),
                       dk.Picard(rtol=1e-5))


def test_separable_cell_is_probed_once_and_results_are_unchanged():
    calls = [0]

    class Cell(torch.nn.Module):
        def forward(self, z, x):
            calls[0] += 1
            return 0.5 * torch.tanh(z) + x

    cell = Cell()
    x = torch.linspace(0.01, 2, 6).unsqueeze(1).repeat(1, 4)
    first = dk.fixed_point(cell, torch.zeros(6, 4), dk.Picard(rtol=1e-6), args=(x,))
    assert int(first.stats["probe_nfev"]) == 2
    assert calls[0] == int(first.stats["nfev"]) + 2
    calls[0] = 0
    second = dk.fixed_point(cell, torch.zeros(6, 4), dk.Picard(rtol=1e-6), args=(x,))
    assert int(second.stats["probe_nfev"]) == 0 and calls[0] == int(second.stats["nfev"])
    assert torch.equal(first.value, second.value)


def test_probe_tolerates_a_stochastic_cell():
    # plain dropout draws new masks at every call: the probe compares like for like (the same
    # random state for both of its evaluations) and restores the random state afterwards
    drop = torch.nn.Dropout(0.2)
    x = torch.linspace(0.01, 2, 6).unsqueeze(1).repeat(1, 4)
    torch.manual_seed(5)
    sol = dk.fixed_point(lambda z, x: 0.5 * torch.tanh(drop(z)) + x, torch.zeros(6, 4),
                         dk.Picard(rtol=1e-3), args=(x,), throw=False)
    assert int(sol.stats["probe_nfev"]) == 2


def test_deq_with_batchnorm_solves_the_batch_as_one_problem():
    class BNCell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)
            self.bn = torch.nn.BatchNorm1d(8)

        def forward(self, z, x):
            return 0.5 * torch.tanh(self.bn(self.lin(z))) + x

    torch.manual_seed(0)
    layer = dk.nn.DEQ(BNCell(), solver=dk.Anderson(rtol=1e-6, atol=0), max_steps=60)
    x = torch.randn(6, 8) * torch.linspace(0.01, 2, 6).unsqueeze(1)
    z = layer(x)
    st = layer.last_solution.stats
    assert layer.last_solution.result is dk.RESULTS.successful
    assert st["status"].shape == (6,) and int(st["nfev_samples"]) == 6 * int(st["nfev"])
    with torch.no_grad():  # the returned batch is a fixed point of the coupled map
        fz = layer.cell(z, x)
    assert float((fz - z.detach()).norm()) <= 1e-6 * float(fz.norm()) * 1.01
    z.square().sum().backward()  # the implicit gradient of the coupled system
    assert layer.cell.lin.weight.grad is not None


# --------------------------------------------------------------------------- errors


def test_empty_batch_is_refused():
    with pytest.raises(ValueError, match="batch size 0"):
        dk.fixed_point(lambda z: z, torch.zeros(0, 3))


def test_f_returning_another_batch_size_is_refused():
    with pytest.raises(ValueError, match="batch 4 first"):
        dk.fixed_point(lambda z: z[:2] * 0.5, torch.zeros(4, 3))


def test_f_changing_shape_after_the_first_call_is_refused():
    calls = [0]

    def f(z):
        calls[0] += 1
        return 0.5 * z + 1 if calls[0] < 3 else torch.zeros(4, 2)

    with pytest.raises(ValueError, match="must keep the shape"):
        dk.fixed_point(f, torch.zeros(4, 3), dk.Picard(rtol=1e-9))


def test_nested_per_sample_args_are_sliced_with_the_batch():
    x = torch.linspace(0.01, 2, 6).unsqueeze(1).repeat(1, 4)
    s = torch.rand(6, 4)
    flat = dk.fixed_point(lambda z, x, s: 0.5 * torch.tanh(z) * s + x, torch.zeros(6, 4),
                          dk.Picard(rtol=1e-6), args=(x, s))

    def nested(z, inp, opts):
        return 0.5 * torch.tanh(z) * inp["s"][0] + inp["x"]

    sol = dk.fixed_point(nested, torch.zeros(6, 4), dk.Picard(rtol=1e-6),
                         args=({"x": x, "s": [s]}, "mode"))
    assert sol.stats["nfev_samples"] < 6 * sol.stats["nfev"]  # rows did leave the batch
    torch.testing.assert_close(sol.value, flat.value)


def test_nested_shared_tensor_in_args_is_refused_with_its_path():
    with pytest.raises(ValueError, match=r"args\[0\]\['W'\]"):
        dk.fixed_point(lambda z, d: z @ d["W"], torch.zeros(4, 3), args=({"W": torch.eye(3)},))


def test_per_sample_tensor_captured_in_closure_gets_an_explanation():
    x = torch.linspace(0.01, 2, 6).unsqueeze(1).repeat(1, 4)
    scale = torch.ones(6, 4)
    with pytest.raises(ValueError, match="shrank from 6") as err:
        dk.fixed_point(lambda z, x: 0.5 * torch.tanh(z) * scale + x, torch.zeros(6, 4),
                       dk.Picard(rtol=1e-6), args=(x,))
    assert "args=(x,)" in str(err.value)


def test_deq_state_width_differs_from_input_without_z0():
    cell = torch.nn.Linear(3, 5)
    layer = dk.nn.DEQ(lambda z, x: torch.tanh(cell(x)), max_steps=5)
    with pytest.raises(ValueError, match="init_state") as err:
        layer(torch.randn(2, 3))
    assert "z0=" in str(err.value)


def test_f_output_wider_than_z0_is_refused():
    with pytest.raises(ValueError, match=r"z0\.to\(torch\.float64\)"):
        dk.fixed_point(lambda z: 0.5 * z.double() + 1, torch.zeros(2, 3))


@pytest.mark.parametrize("make", [
    lambda: dk.Anderson(regularisation=float("inf")),
    lambda: dk.Picard(rtol=float("inf")),
    lambda: dk.Anderson(atol=float("nan")),
    lambda: dk.GMRES(rtol=float("inf")),
])
def test_non_finite_solver_settings_are_refused(make):
    with pytest.raises(ValueError, match="finite"):
        make()


# ------------------------------------------------------------------- the property test

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


class _Overshoot(dk.AbstractFixedPointSolver):
    """A user solver that over-extrapolates: z + 3 (f(z) - z). Runs off on most maps."""

    rtol, atol = 1e-5, 1e-7

    def step(self, fn, z, fz, r, state):
        return z + 3.0 * r, None, state


PROPERTY_SOLVERS = [
    dk.Picard(), dk.Picard(damping=0.5), dk.Anderson(), dk.Anderson(m=2, beta=0.7),
    dk.Broyden(), dk.Broyden(line_search=True, memory=3),
    dk.NewtonKrylov(linear_solver=dk.GMRES(rtol=1e-3, atol=0, max_steps=8, restart=8)),
    dk.FallbackChain(dk.Anderson(), dk.Broyden()), _Overshoot(),
]
CELLS = {
    "tanh": lambda W, z, x: torch.tanh(z @ W.T + x),
    "relu": lambda W, z, x: torch.relu(z @ W.T) + x,  # unbounded when W is expansive
    "linear": lambda W, z, x: z @ W.T + x,
    "overflow": lambda W, z, x: 0.5 * torch.tanh(z @ W.T) + torch.exp(x),
    "runaway": lambda W, z, x: z + x.abs() + 1,
    "saturating root": lambda W, z, x: z - (torch.tanh(z @ W.T) + 2.0),
}


def _scale_of(z0, fz0, z, fz, eps):
    """The documented scale s_k of the stopping test, recomputed from scratch."""
    s0 = torch.maximum(z0.norm(dim=1), fz0.norm(dim=1))
    r0 = (fz0 - z0).norm(dim=1)
    r = (fz - z).norm(dim=1)
    bound = torch.fmax(s0, s0 * r0 / torch.fmax(r, eps * fz.norm(dim=1)))
    return torch.minimum(fz.norm(dim=1), bound)


@hypothesis.settings(max_examples=150, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(
    solver=st.sampled_from(PROPERTY_SOLVERS), cell=st.sampled_from(sorted(CELLS)),
    dtype=st.sampled_from([torch.float32, torch.float64]), norm=st.floats(0.2, 2.5),
    big=st.floats(0.0, 120.0), compact=st.booleans(), batch=st.integers(1, 6),
    width=st.integers(1, 7), seed=st.integers(0, 2**16),
)
def test_a_reported_success_is_true(solver, cell, dtype, norm, big, compact, batch, width,
                                    seed):
    g = torch.Generator().manual_seed(seed)
    W = contractive_matrix(width, norm, dtype=dtype, gen=g)
    x = torch.randn(batch, width, dtype=dtype, generator=g)
    x[0] = x[0] * big  # one hostile sample: huge input (overflows exp in float32)
    z0 = torch.randn(batch, width, dtype=dtype, generator=g) if seed % 2 else \
        torch.zeros(batch, width, dtype=dtype)
    f = CELLS[cell]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sol = dk.fixed_point(lambda z, x: f(W, z, x), z0, solver, args=(x,), compact=compact,
                             throw=False, max_steps=40)
    ok = sol.stats["converged"]
    assert torch.equal(ok, sol.stats["status"] == SUCCESS)
    assert (sol.result is dk.RESULTS.successful) == bool(ok.all())
    if not bool(ok.any()):
        return
    z = sol.value.detach()
    assert bool(torch.isfinite(z[ok]).all())
    with torch.no_grad():  # independently: the full batch, the documented rule
        fz = f(W, z, x)
        scale = _scale_of(z0, f(W, z0, x), z, fz, torch.finfo(dtype).eps)
    r = (fz - z).norm(dim=1)
    tols = [solver.solvers[i] for i in sol.stats["solver_index"].tolist()] \
        if isinstance(solver, dk.FallbackChain) else [solver] * batch
    for b in ok.nonzero().flatten().tolist():
        s = tols[b]
        slack = 16 * torch.finfo(dtype).eps * float(fz[b].norm() + z[b].norm())
        assert torch.isfinite(r[b]) and float(r[b]) <= s.atol + s.rtol * float(scale[b]) + slack, (
            b, float(r[b]), float(scale[b]), sol.summary())
