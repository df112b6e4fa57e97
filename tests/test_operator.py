"""Tests of the linear operators in :mod:`deqkit.linear` and of the shared solve template."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import deqkit as dk
from deqkit.linear import (
    GMRES,
    AbstractLinearOperator,
    AbstractLinearSolver,
    BiCGStab,
    Dense,
    FunctionOperator,
    IdentityMinus,
    JacobianOperator,
    LinearSolution,
    LinearSolverState,
    LowRankUpdate,
    MatrixOperator,
    Neumann,
)

F64 = torch.float64
B, D = 4, 6


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tanh_cell(seed: int = 0):
    """``f(z) = tanh(W z + x_b)``, ``||W||_2 = 0.9``, a different input per sample."""
    g = _gen(seed)
    W = torch.randn(D, D, generator=g, dtype=F64)
    W = W * (0.9 / torch.linalg.matrix_norm(W, ord=2))
    x = torch.randn(B, D, generator=g, dtype=F64)
    return lambda z: torch.tanh(z @ W.T + x)


def flat_map(seed: int = 1):
    """A non-tanh map of flat ``(B, D)`` vectors mixing the coordinates of each sample."""
    M = torch.randn(D, D, generator=_gen(seed), dtype=F64) / D
    return lambda z: torch.sin(z) * z.roll(1, dims=1) + (z * z) @ M + 0.5 * z


def shaped_map(z: torch.Tensor) -> torch.Tensor:
    """A map of ``(B, 2, 3)`` tensors: the operator works on their flat ``(B, 6)`` view."""
    return torch.cos(z).flip(1) * z.sum(dim=(1, 2), keepdim=True)


CELLS = {"tanh": tanh_cell, "flat": flat_map}


def dense_jacobians(f, z: torch.Tensor) -> torch.Tensor:
    """``(B, D, D)`` per-sample Jacobians: the diagonal blocks of the batch's Jacobian by
    ``torch.autograd.functional.jacobian`` (checked to be block diagonal)."""
    n, size = z.shape[0], z[0].numel()
    full = torch.autograd.functional.jacobian(f, z).reshape(n, size, n, size)
    blocks = torch.stack([full[i, :, i, :] for i in range(n)])
    off = full.clone()
    for i in range(n):
        off[i, :, i, :] = 0
    assert not off.any(), "the samples of the test map are not independent"
    return blocks


def bmv(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.bmm(A, v.unsqueeze(2)).squeeze(2)


def build(construction: str, f, z: torch.Tensor, **kwargs) -> JacobianOperator:
    if construction == "function":
        return JacobianOperator(f, z, **kwargs)
    z_req = z.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        fz = f(z_req)
    return JacobianOperator.from_evaluation(z_req, fz, **kwargs)


# --------------------------------------------------------------------------------------------
# JacobianOperator against dense Jacobians
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("construction", ["function", "evaluation"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_jacobian_products_match_dense_jacobian(construction, cell):
    f = CELLS[cell]()
    g = _gen(10)
    z, v, u = (torch.randn(B, D, generator=g, dtype=F64) for _ in range(3))
    J = dense_jacobians(f, z)
    eye = torch.eye(D, dtype=F64)
    op = build(construction, f, z)
    assert op.shape == (B, D) and (op.batch, op.width) == (B, D)
    assert op.dtype == F64 and op.device == z.device
    checks = {
        "J v": (op.mv(v), bmv(J, v)),
        "J^T u": (op.rmv(u), bmv(J.mT, u)),
        "(I - J) v": (IdentityMinus(op).mv(v), bmv(eye - J, v)),
        "(I - J^T) u": (IdentityMinus(op).transpose().mv(u), bmv(eye - J.mT, u)),
        "(I - J^T) u via J^T": (IdentityMinus(op.T).mv(u), bmv(eye - J.mT, u)),
        "((I - J^T))^T v": (IdentityMinus(op).T.rmv(v), bmv(eye - J, v)),
        "(J^T)^T v": (op.T.T.mv(v), bmv(J, v)),
        "as_matrix": (op.as_matrix(), J),
        "(I - J^T) as_matrix": (IdentityMinus(op).T.as_matrix(), eye - J.mT),
    }
    for name, (got, ref) in checks.items():
        assert not got.requires_grad, name
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("construction", ["function", "evaluation"])
def test_jacobian_of_shaped_tensors_acts_on_flat_vectors(construction):
    g = _gen(11)
    z = torch.randn(B, 2, 3, generator=g, dtype=F64)
    v, u = torch.randn(B, D, generator=g, dtype=F64), torch.randn(B, D, generator=g, dtype=F64)
    J = dense_jacobians(shaped_map, z)
    op = build(construction, shaped_map, z)
    assert op.shape == (B, D)
    torch.testing.assert_close(op.mv(v), bmv(J, v), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.rmv(u), bmv(J.mT, u), rtol=1e-12, atol=1e-12)


def test_function_construction_evaluates_once_for_rmv_and_once_per_mv():
    f = tanh_cell()
    calls = []

    def counted(z):
        calls.append(1)
        return f(z)

    z = torch.randn(B, D, generator=_gen(12), dtype=F64)
    op = JacobianOperator(counted, z)
    assert op.fz is None and op.z is z
    for _ in range(3):
        op.mv(z)  # one forward-mode product each
    assert len(calls) == 3
    for _ in range(3):
        op.rmv(z)  # one evaluation with a graph, recorded at the first rmv
    assert len(calls) == 4
    torch.testing.assert_close(op.fz, f(z))


@pytest.mark.parametrize("construction", ["function", "evaluation"])
def test_create_graph_keeps_products_differentiable(construction):
    W = (0.3 * torch.randn(D, D, generator=_gen(13), dtype=F64)).requires_grad_(True)
    z = torch.randn(B, D, generator=_gen(14), dtype=F64)
    u = torch.randn(B, D, generator=_gen(15), dtype=F64)

    def f(z):
        return torch.tanh(z @ W.T)

    op = build(construction, f, z, create_graph=True)
    jtu = op.rmv(u)
    assert jtu.requires_grad
    (grad,) = torch.autograd.grad(jtu.pow(2).sum(), W)
    # J^T u = W^T (sech^2(W z) * u), written out
    ref_fn = lambda W: ((1 - torch.tanh(z @ W.T) ** 2) * u) @ W  # noqa: E731
    (ref,) = torch.autograd.grad(ref_fn(W).pow(2).sum(), W)
    torch.testing.assert_close(grad, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("construction", ["function", "evaluation"])
@pytest.mark.parametrize("depends_on_param", [True, False])
def test_map_independent_of_z_has_zero_jacobian(construction, depends_on_param):
    p = torch.ones(B, D, dtype=F64, requires_grad=depends_on_param)
    z = torch.randn(B, D, generator=_gen(16), dtype=F64)
    op = build(construction, lambda z: 2 * p, z)
    v = torch.ones(B, D, dtype=F64)
    assert torch.equal(op.mv(v), torch.zeros_like(v))
    assert torch.equal(op.rmv(v), torch.zeros_like(v))
    assert torch.equal(IdentityMinus(op).T.mv(v), v)


def test_jacobian_operator_rejects_bad_input():
    z = torch.zeros(B, D, dtype=F64)
    with pytest.raises(ValueError, match="give `fn` or `fz`"):
        JacobianOperator(None, z)
    with pytest.raises(ValueError, match="does not require grad"):
        JacobianOperator.from_evaluation(z, torch.sin(z))
    z_req = z.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="shape of z"):
        JacobianOperator.from_evaluation(z_req, z_req[:, :2] * 2)
    with pytest.raises(TypeError, match="callable"):
        JacobianOperator("tanh", z)
    with pytest.raises(TypeError, match="floating-point"):
        JacobianOperator(torch.tanh, torch.zeros(B, D, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape of z"):
        JacobianOperator(lambda z: z[:, :2], z).rmv(z)


# --------------------------------------------------------------------------------------------
# The other operators
# --------------------------------------------------------------------------------------------


def test_matrix_operator():
    A = torch.randn(B, D, D, generator=_gen(17), dtype=F64)
    v = torch.randn(B, D, generator=_gen(18), dtype=F64)
    op = MatrixOperator(A)
    assert op.shape == (B, D) and op.as_matrix() is A
    torch.testing.assert_close(op.mv(v), bmv(A, v), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(op(v), bmv(A, v), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(op.rmv(v), bmv(A.mT, v), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(op.T.mv(v), bmv(A.mT, v), rtol=1e-14, atol=1e-14)
    eye = torch.eye(D, dtype=F64)
    torch.testing.assert_close(IdentityMinus(op).as_matrix(), eye - A, rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match=r"\(B, D, D\)"):
        MatrixOperator(A[0])
    with pytest.raises(ValueError, match="floating-point"):
        MatrixOperator(torch.zeros(1, 2, 2, dtype=torch.int64))


def test_function_operator_and_refused_transpose():
    d = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    op = FunctionOperator(lambda v: d * v, like=d)
    assert op.shape == (1, 3) and op.dtype == F64
    with pytest.raises(NotImplementedError, match="rmv"):
        op.rmv(d)
    with pytest.raises(NotImplementedError, match="rmv"):
        op.T.mv(d)
    sym = FunctionOperator(lambda v: d * v, like=d, rmatvec=lambda u: d * u)
    torch.testing.assert_close(IdentityMinus(sym).T.mv(d), d - d * d)
    with pytest.raises(ValueError, match="callable"):
        FunctionOperator("d * v", like=d)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        FunctionOperator(lambda v: v, like=d[0])
    with pytest.raises(TypeError, match="operator"):
        IdentityMinus(lambda v: v)


# --------------------------------------------------------------------------------------------
# The solve template: operators and callables, init/compute, Dense reuse
# --------------------------------------------------------------------------------------------

SOLVERS = {
    "gmres": GMRES(rtol=1e-13, atol=0.0, max_steps=300),
    "bicgstab": BiCGStab(rtol=1e-13, atol=0.0, max_steps=300),
    "neumann": Neumann(rtol=1e-13, atol=0.0, max_steps=2000),
    "dense": Dense(rtol=1e-13, atol=0.0),
}


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("construction", ["function", "evaluation"])
def test_solvers_take_the_backward_operator_and_match_the_callable(name, construction):
    """(I - J^T) u = g as an operator gives what the hand-written VJP matvec gives."""
    f = tanh_cell(seed=3)
    g = _gen(19)
    z, grad = torch.randn(B, D, generator=g, dtype=F64), torch.randn(B, D, generator=g, dtype=F64)
    op = IdentityMinus(build(construction, f, z)).T
    z_req = z.clone().requires_grad_(True)
    with torch.enable_grad():
        fz = f(z_req)

    def matvec(v):  # the implicit adjoint's matvec before the operator existed
        (vjp,) = torch.autograd.grad(fz, z_req, v, retain_graph=True)
        return v - vjp

    solver = SOLVERS[name]
    with_op, with_fn = solver.solve(op, grad), solver.solve(matvec, grad)
    assert with_op.converged.all() and with_op.nmatvec == with_fn.nmatvec
    torch.testing.assert_close(with_op.value, with_fn.value, rtol=1e-12, atol=1e-12)
    J = dense_jacobians(f, z)
    ref = torch.linalg.solve(torch.eye(D, dtype=F64) - J.mT, grad)
    torch.testing.assert_close(with_op.value, ref, rtol=1e-10, atol=1e-10)


def test_newton_operator_with_every_solver():
    f = flat_map()
    z = torch.randn(B, D, generator=_gen(20), dtype=F64)
    r = torch.randn(B, D, generator=_gen(21), dtype=F64)
    ref = torch.linalg.solve(torch.eye(D, dtype=F64) - dense_jacobians(f, z), r)
    op = IdentityMinus(JacobianOperator(f, z))
    for name in ("gmres", "bicgstab", "dense"):
        sol = SOLVERS[name].solve(op, r)
        torch.testing.assert_close(sol.value, ref, rtol=1e-10, atol=1e-10, msg=name)


def test_dense_factorises_once_for_several_right_hand_sides(monkeypatch):
    calls = []
    lu_factor_ex = torch.linalg.lu_factor_ex

    def counted_lu(A, *args, **kwargs):
        calls.append(A.shape)
        return lu_factor_ex(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "lu_factor_ex", counted_lu)
    A = torch.randn(B, D, D, generator=_gen(22), dtype=F64) + 3 * torch.eye(D, dtype=F64)
    products = []

    def matvec(v):
        products.append(1)
        return bmv(A, v)

    op = FunctionOperator(matvec, like=torch.empty(B, D, dtype=F64))
    solver = Dense(rtol=1e-13, atol=0.0)
    state = solver.init(op)
    assert isinstance(state, LinearSolverState) and state.nmatvec == D == len(products)
    rhs1, rhs2 = (torch.randn(B, D, generator=_gen(s), dtype=F64) for s in (23, 24))
    sol1, sol2 = solver.compute(state, rhs1), solver.compute(state, rhs2)
    assert calls == [(B, D, D)]  # one factorisation ...
    assert len(products) == D and sol1.nmatvec == sol2.nmatvec == 0  # ... and one assembly
    for sol, rhs in ((sol1, rhs1), (sol2, rhs2)):
        assert sol.converged.all()
        torch.testing.assert_close(sol.value, torch.linalg.solve(A, rhs), rtol=1e-12, atol=1e-12)
    # solve() is init + compute: it counts the assembly
    assert solver.solve(op, rhs1).nmatvec == D and len(calls) == 2


@pytest.mark.parametrize("name", list(SOLVERS))
def test_init_compute_equals_solve_and_checks_its_arguments(name):
    A = torch.eye(D, dtype=F64) - 0.5 * torch.randn(B, D, D, generator=_gen(25), dtype=F64) / D
    rhs = torch.randn(B, D, generator=_gen(26), dtype=F64)
    solver = SOLVERS[name]
    op = MatrixOperator(A)
    state = solver.init(op)
    sol = solver.compute(state, rhs)
    ref = solver.solve(op, rhs)
    assert sol.nmatvec + state.nmatvec == ref.nmatvec
    torch.testing.assert_close(sol.value, ref.value, rtol=0, atol=0)
    with pytest.raises(TypeError, match="FunctionOperator"):
        solver.init(lambda v: v)
    with pytest.raises(ValueError, match="shape of the operator"):
        solver.compute(state, rhs[:, :2])
    with pytest.raises(ValueError, match="rhs"):
        solver.compute(state, rhs[0])


@pytest.mark.parametrize("name", list(SOLVERS))
def test_plain_callable_and_function_operator_agree(name):
    A = torch.eye(D, dtype=F64) - 0.5 * torch.randn(B, D, D, generator=_gen(27), dtype=F64) / D
    rhs = torch.randn(B, D, generator=_gen(28), dtype=F64)
    solver = SOLVERS[name]
    by_callable = solver.solve(lambda v: bmv(A, v), rhs)
    by_operator = solver.solve(FunctionOperator(lambda v: bmv(A, v), like=rhs), rhs)
    by_matrix = solver.solve(MatrixOperator(A), rhs)
    assert by_callable.nmatvec == by_operator.nmatvec == by_matrix.nmatvec
    torch.testing.assert_close(by_callable.value, by_operator.value, rtol=0, atol=0)
    torch.testing.assert_close(by_callable.value, by_matrix.value, rtol=1e-14, atol=1e-14)


@dataclasses.dataclass(frozen=True)
class _LegacyRichardson(AbstractLinearSolver):
    """A user solver written before init/compute: it overrides ``solve`` itself."""

    rtol: float = 0.0
    atol: float = 0.0
    max_steps: int = 60

    def solve(self, matvec, rhs, x0=None):
        x = torch.zeros_like(rhs)
        for _ in range(self.max_steps):
            x = (x + (rhs - matvec(x))).detach()
        ok = torch.ones(rhs.shape[0], dtype=torch.bool)
        res = torch.linalg.vector_norm(rhs - matvec(x), dim=1).detach()
        return LinearSolution(x, ok, res, torch.full(ok.shape, self.max_steps), self.max_steps)


def test_solver_overriding_solve_still_works_with_callables_and_operators():
    x = torch.ones(2, 3, dtype=F64, requires_grad=True)
    sol = dk.fixed_point(lambda z: 0.5 * z + x, torch.zeros(2, 3, dtype=F64),
                         adjoint=dk.ImplicitAdjoint(_LegacyRichardson()))
    sol.value.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
    b = torch.ones(2, 3, dtype=F64)
    op = IdentityMinus(MatrixOperator(0.5 * torch.eye(3, dtype=F64).expand(2, 3, 3)))
    torch.testing.assert_close(_LegacyRichardson().solve(op, b).value, 2 * b)
    nk = dk.NewtonKrylov(rtol=1e-10, atol=0, linear_solver=_LegacyRichardson())
    out = dk.fixed_point(lambda z: 0.5 * torch.tanh(z) + 1, torch.zeros(2, 3, dtype=F64),
                         solver=nk, max_steps=20)
    assert out.result == dk.RESULTS.successful


def test_solver_without_run_says_what_to_implement():
    @dataclasses.dataclass(frozen=True)
    class Empty(AbstractLinearSolver):
        rtol: float = 0.0
        atol: float = 0.0
        max_steps: int = 1

    with pytest.raises(NotImplementedError, match="run"):
        Empty().solve(lambda v: v, torch.ones(1, 2, dtype=F64))


def test_operators_are_linear_operators():
    z = torch.zeros(1, 2, dtype=F64)
    ops = [
        MatrixOperator(torch.eye(2, dtype=F64)[None]),
        FunctionOperator(lambda v: v, like=z),
        JacobianOperator(torch.sin, z),
    ]
    for op in ops + [IdentityMinus(o) for o in ops] + [o.T for o in ops]:
        assert isinstance(op, AbstractLinearOperator) and op.shape == (1, 2)


def test_dense_with_an_operator_of_another_dtype():
    A = torch.eye(D, dtype=torch.float32) + 0.1 * torch.randn(B, D, D, generator=_gen(29))
    rhs = torch.randn(B, D, generator=_gen(30), dtype=F64)
    sol = Dense(rtol=1e-5).solve(MatrixOperator(A), rhs)
    assert sol.value.dtype == F64 and sol.converged.all()
    torch.testing.assert_close(sol.value, torch.linalg.solve(A.double(), rhs), rtol=1e-4,
                               atol=1e-5)


# --------------------------------------------------------------------------------------------
# LowRankUpdate: I + U V^T per sample
# --------------------------------------------------------------------------------------------


def _factors(n: int, seed: int, zero_cols: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    U, V = (torch.randn(B, D, n, generator=g, dtype=F64) for _ in range(2))
    if zero_cols:  # padding: the last columns of every sample, and more for sample 0
        U[:, :, n - zero_cols:] = 0.0
        V[:, :, n - zero_cols:] = 0.0
        V[0, :, 0] = 0.0  # a column with only one factor zero contributes nothing either
    return U, V


@pytest.mark.parametrize("n, zero_cols", [(1, 0), (3, 0), (4, 2), (D + 2, 1)])
def test_low_rank_update_matches_dense_matrix(n, zero_cols):
    U, V = _factors(n, seed=40 + n, zero_cols=zero_cols)
    M = torch.eye(D, dtype=F64) + U @ V.mT
    op = LowRankUpdate(U, V)
    g = _gen(50)
    v, u = torch.randn(B, D, generator=g, dtype=F64), torch.randn(B, D, generator=g, dtype=F64)
    assert isinstance(op, AbstractLinearOperator)
    assert op.shape == (B, D) and op.dtype == F64 and op.rank == n
    checks = {
        "M v": (op.mv(v), bmv(M, v)),
        "op(v)": (op(v), bmv(M, v)),
        "M^T u": (op.rmv(u), bmv(M.mT, u)),
        ".T mv": (op.T.mv(u), bmv(M.mT, u)),
        ".T rmv": (op.T.rmv(v), bmv(M, v)),
        ".T.T": (op.T.T.mv(v), bmv(M, v)),
        "as_matrix": (op.as_matrix(), M),
        "T as_matrix": (op.T.as_matrix(), M.mT),
        "assembled": (AbstractLinearOperator.as_matrix(op), M),
        "(I - M) v": (IdentityMinus(op).mv(v), v - bmv(M, v)),
    }
    for name, (got, ref) in checks.items():
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12, msg=name)
    assert isinstance(op.T, LowRankUpdate) and op.T.U is V and op.T.V is U


@pytest.mark.parametrize("n, zero_cols", [(0, 0), (1, 0), (2, 1), (D, 1), (D + 2, 0)])
def test_low_rank_update_norm_is_the_spectral_norm(n, zero_cols):
    U, V = _factors(n, seed=55 + n, zero_cols=zero_cols) if n else (
        torch.zeros(B, D, 0, dtype=F64), torch.zeros(B, D, 0, dtype=F64))
    op = LowRankUpdate(U, V)
    ref = torch.linalg.matrix_norm(op.as_matrix(), ord=2)
    torch.testing.assert_close(op.norm(), ref, rtol=1e-12, atol=1e-12)
    # a contraction of the identity (norm < 1) is possible when the update spans everything
    W = -0.5 * torch.eye(D, dtype=F64).expand(B, D, D)
    torch.testing.assert_close(LowRankUpdate(W, torch.eye(D, dtype=F64).expand(B, D, D))
                               .norm(), torch.full((B,), 0.5, dtype=F64))


def test_low_rank_update_padding_and_rank_zero():
    U, V = _factors(2, seed=60)
    v = torch.randn(B, D, generator=_gen(61), dtype=F64)
    zeros = torch.zeros(B, D, 3, dtype=F64)
    padded = LowRankUpdate(torch.cat([U, zeros], 2), torch.cat([V, zeros], 2))
    torch.testing.assert_close(padded.mv(v), LowRankUpdate(U, V).mv(v), rtol=0, atol=1e-15)
    empty = LowRankUpdate(torch.zeros(B, D, 0, dtype=F64), torch.zeros(B, D, 0, dtype=F64))
    out = empty.mv(v)
    assert torch.equal(out, v) and out is not v  # the identity, not a view of the input
    assert torch.equal(empty.as_matrix(), torch.eye(D, dtype=F64).expand(B, D, D))


def test_low_rank_update_is_differentiable_in_its_factors():
    U, V = (t.requires_grad_(True) for t in _factors(2, seed=62))
    v = torch.randn(B, D, generator=_gen(63), dtype=F64)
    torch.autograd.gradcheck(lambda U, V: LowRankUpdate(U, V).mv(v), (U, V))


@pytest.mark.parametrize(
    "U, V, match",
    [
        (torch.zeros(B, D, dtype=F64), torch.zeros(B, D, dtype=F64), "`U` must be"),
        (torch.zeros(B, D, 2, dtype=F64), "V", "`V` must be"),
        (torch.zeros(B, D, 2, dtype=torch.int64), torch.zeros(B, D, 2), "floating-point"),
        (torch.zeros(B, D, 2, dtype=F64), torch.zeros(B, D, 3, dtype=F64), "same shape"),
        (torch.zeros(B, D, 2, dtype=F64), torch.zeros(B, D, 2), "same shape, dtype"),
    ],
)
def test_low_rank_update_rejects_bad_factors(U, V, match):
    with pytest.raises(ValueError, match=match) as info:
        LowRankUpdate(U, V)
    assert "e.g." in str(info.value)


# --------------------------------------------------------------------------------------------
# Preconditioners in the solve template
# --------------------------------------------------------------------------------------------


def _system(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    A = torch.eye(D, dtype=F64) - 0.5 * torch.randn(B, D, D, generator=_gen(seed), dtype=F64) / D
    return A, torch.randn(B, D, generator=_gen(seed + 1), dtype=F64)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_preconditioner_is_checked_counted_and_accepted_as_callable_or_operator(name):
    A, rhs = _system(70)
    P = torch.linalg.inv(A) + 1e-3 * torch.randn(B, D, D, generator=_gen(72), dtype=F64)
    solver = SOLVERS[name]
    calls, products = [], []

    def matvec(v):
        products.append(1)
        return bmv(A, v)

    def precond(v):
        calls.append(1)
        return bmv(P, v)

    by_callable = solver.solve(matvec, rhs, preconditioner=precond)
    assert by_callable.nmatvec == len(products) and by_callable.nprecond == len(calls)
    if name != "dense":  # Dense is exact and does not apply it
        assert len(calls) > 0
    by_operator = solver.solve(MatrixOperator(A), rhs, preconditioner=MatrixOperator(P))
    assert (by_operator.nmatvec, by_operator.nprecond) == (by_callable.nmatvec, len(calls))
    torch.testing.assert_close(by_operator.value, by_callable.value, rtol=1e-13, atol=1e-13)
    assert by_callable.converged.all() and solver.supports_preconditioner
    state = solver.init(MatrixOperator(A))
    sol = solver.compute(state, rhs, preconditioner=MatrixOperator(P))
    torch.testing.assert_close(sol.value, by_operator.value, rtol=0, atol=0)
    assert solver.solve(matvec, rhs).nprecond == 0


@pytest.mark.parametrize("name", list(SOLVERS))
def test_bad_preconditioner_arguments_are_refused(name):
    A, rhs = _system(74)
    solver, op = SOLVERS[name], MatrixOperator(A)
    with pytest.raises(ValueError, match=r"preconditioner.*shape of `rhs`"):
        solver.solve(op, rhs, preconditioner=MatrixOperator(torch.eye(D + 1, dtype=F64)
                                                            .expand(B, D + 1, D + 1)))
    with pytest.raises(ValueError, match=r"preconditioner.*callable"):
        solver.solve(op, rhs, preconditioner=torch.eye(D, dtype=F64))
    if name == "dense":  # never applied
        return
    with pytest.raises(ValueError, match="`preconditioner` must return"):
        solver.solve(op, rhs, preconditioner=lambda v: v[:, :2])
    with pytest.raises(ValueError, match="`preconditioner` must return a floating-point"):
        solver.solve(op, rhs, preconditioner=lambda v: v.long())


def test_preconditioner_runs_in_callers_grad_mode_and_is_detached():
    A, rhs = _system(76)
    w = torch.ones(1, dtype=F64, requires_grad=True)
    modes = []

    def precond(v):
        modes.append(torch.is_grad_enabled())
        return v * w  # carries a graph when grad is enabled

    for grad in (False, True):
        modes.clear()
        with torch.set_grad_enabled(grad):
            sol = GMRES(rtol=1e-10, atol=0).solve(MatrixOperator(A), rhs, preconditioner=precond)
        assert modes and set(modes) == {grad}
        assert not sol.value.requires_grad and sol.converged.all()


@dataclasses.dataclass(frozen=True)
class _LegacyRun(AbstractLinearSolver):
    """A hook written before preconditioners: ``run(op, prepared, rhs, x0)``."""

    rtol: float = 0.0
    atol: float = 0.0
    max_steps: int = 60

    def run(self, op, prepared, rhs, x0):
        x = torch.zeros_like(rhs) if x0 is None else x0
        for _ in range(self.max_steps):
            x = x + (rhs - op(x))
        res = torch.linalg.vector_norm(rhs - op(x), dim=1)
        return LinearSolution(x, res <= 1e-10, res, torch.full(res.shape, self.max_steps),
                              op.count)


def test_earlier_solvers_keep_working_and_refuse_a_preconditioner():
    b = torch.ones(2, 3, dtype=F64)
    op = IdentityMinus(MatrixOperator(0.5 * torch.eye(3, dtype=F64).expand(2, 3, 3)))
    P = MatrixOperator(2 * torch.eye(3, dtype=F64).expand(2, 3, 3))
    for solver in (_LegacyRun(), _LegacyRichardson()):
        assert not solver.supports_preconditioner
        torch.testing.assert_close(solver.solve(op, b).value, 2 * b)
        torch.testing.assert_close(solver.solve(op, b, None).value, 2 * b)
        torch.testing.assert_close(solver.solve(op, b, x0=b, preconditioner=None).value, 2 * b)
        with pytest.raises(TypeError, match=r"preconditioner.*would be ignored"):
            solver.solve(op, b, preconditioner=P)
    with pytest.raises(TypeError, match="`run\\(op, prepared, rhs, x0\\)` hook"):
        _LegacyRun().compute(_LegacyRun().init(op), b, preconditioner=P)

    @dataclasses.dataclass(frozen=True)
    class Derived(_LegacyRichardson):  # inherits the earlier solve override
        pass

    assert not Derived.supports_preconditioner
    with pytest.raises(TypeError, match="solve` override"):
        Derived().solve(op, b, preconditioner=P)
    assert all(s.supports_preconditioner for s in SOLVERS.values())
