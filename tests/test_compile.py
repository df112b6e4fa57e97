"""``torch.compile``d cells inside ``dk.fixed_point`` and the implicit backward.

Findings (torch 2.13, CPU; backend "aot_eager" here to keep the test fast: inductor's first
compile of even this tiny cell takes seconds on a shared 2-core CPU, see
``benchmarks/bench_compile.py`` for inductor timings):

* ``compact=False``: a solve compiles the cell twice, once for the no-grad forward iterations
  and once for the grad-enabled call at ``z*`` that the implicit adjoint differentiates (the
  guard is on grad mode). The backward's GMRES vector-Jacobian products reuse the autograd
  graph of that call and never re-enter the compiled function. A later solve with more steps
  compiles nothing.
* ``compact=True`` with ``dynamic=True``: the shrinking batch is one symbolic dimension; one
  extra graph appears the first time the working batch is sliced, because the sliced inputs
  no longer ``requires_grad`` (a dynamo guard), not because of the batch size. Bounded: no
  compile per iteration or per batch size.
* ``compact=True`` with ``dynamic=False``: every new working-batch size is a new graph (until
  ``torch._dynamo.config.recompile_limit``, after which dynamo falls back to eager). Use
  ``compact=False`` or ``dynamic=True`` (or the default ``dynamic=None``, which switches a
  dimension to symbolic after its first change) with compiled cells.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import deqkit as dk

BACKEND = "aot_eager"

# dynamo itself reads ``.grad`` of the (non-leaf, reshaped) state handed to the cell when it
# builds guards for the grad-enabled call at z*; harmless, but an error under -W error.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning"
)


class Cell(torch.nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(width, width)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(0.6 * self.lin(z) + x)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _inputs():
    # samples with very different input scales converge at different steps: compaction
    # shrinks the working batch several times
    torch.manual_seed(0)
    return torch.randn(12, 16) * torch.logspace(-2, 1, 12)[:, None]


def _solve_and_grad(cell, x, steps, compact):
    x = x.clone().requires_grad_()
    sol = dk.fixed_point(
        cell,
        torch.zeros_like(x),
        solver=dk.Anderson(m=4, rtol=1e-6, atol=0),
        adjoint=dk.ImplicitAdjoint(dk.GMRES(rtol=1e-5, max_steps=40)),
        max_steps=steps,
        args=(x,),
        throw=False,
        compact=compact,
        compact_ratio=0.9,
    )
    sol.value.square().sum().backward()
    params = [p.grad.clone() for p in cell.parameters()]
    for p in cell.parameters():
        p.grad = None
    return sol, x.grad, params


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def _batch_sizes(cell, x, steps):
    sizes = set()

    def spy(z, a):
        sizes.add(z.shape[0])
        return cell(z, a)

    dk.fixed_point(
        spy, torch.zeros_like(x), solver=dk.Anderson(m=4, rtol=1e-6, atol=0), max_steps=steps,
        args=(x,), throw=False, compact=True, compact_ratio=0.9,
    )
    return sizes


@pytest.mark.parametrize(
    ("dynamic", "compact"), [(False, False), (True, False), (True, True)]
)
def test_no_recompile_per_iteration_and_grads_match(dynamic, compact):
    cell, x = Cell(), _inputs()
    compiled = torch.compile(cell, backend=BACKEND, dynamic=dynamic)
    _solve_and_grad(compiled, x, 3, compact)  # too few steps for anyone to converge
    after_short = _graphs()
    assert after_short == 2  # no-grad iterations + grad-enabled call at z*
    sol, gx, gp = _solve_and_grad(compiled, x, 40, compact)
    extra = _graphs() - after_short
    if compact:
        assert len(_batch_sizes(cell, x, 40)) >= 3  # the batch did shrink several times
        assert extra <= 1  # only the requires_grad guard of the sliced inputs
    else:
        assert extra == 0
    assert sol.result is dk.RESULTS.successful
    assert int(sol.stats["nstep"].max()) > 3
    _, gx_ref, gp_ref = _solve_and_grad(cell, x, 40, compact)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-6)
    for a, b in zip(gp, gp_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # a third solve+backward compiles nothing at all
    before = _graphs()
    _solve_and_grad(compiled, x, 40, compact)
    assert _graphs() == before


def test_static_shapes_with_compaction_recompile_per_batch_size():
    """Documented outcome: dynamic=False + compaction compiles one graph per batch size."""
    cell, x = Cell(), _inputs()
    compiled = torch.compile(cell, backend=BACKEND, dynamic=False)
    _solve_and_grad(compiled, x, 40, True)
    sizes = _batch_sizes(cell, x, 40)
    assert _graphs() >= len(sizes)  # one per working-batch size (+ the grad-enabled call)


def test_compiled_cell_in_deq_layer():
    torch.manual_seed(0)
    cell = Cell()
    layer = dk.nn.DEQ(
        torch.compile(cell, backend=BACKEND, dynamic=True),
        solver=dk.Anderson(rtol=1e-6, atol=0),
        adjoint=dk.ImplicitAdjoint(dk.GMRES(rtol=1e-5)),
        max_steps=40,
    )
    ref = dk.nn.DEQ(cell, solver=layer.solver, adjoint=layer.adjoint, max_steps=40)
    x = _inputs()
    out = layer(x)
    out.square().sum().backward()
    g = cell.lin.weight.grad.clone()
    cell.lin.weight.grad = None
    out_ref = ref(x)
    out_ref.square().sum().backward()
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g, cell.lin.weight.grad, rtol=1e-4, atol=1e-6)
    graphs = _graphs()
    layer(x).sum().backward()
    assert _graphs() == graphs


def test_jacobian_regularisation_with_compiled_cell_matches_eager():
    """TorchDEQ users report Jacobian regularisation breaking torch.compile (AOTAutograd has
    no double backward). The layer evaluates the regulariser on the eager cell under the
    compiled one: same loss, same gradients, and the solve itself stays compiled."""
    x = _inputs()

    def grads(compiled):
        torch.manual_seed(1)
        cell = Cell()
        deq = dk.nn.DEQ(torch.compile(cell, backend=BACKEND) if compiled else cell,
                        solver=dk.Anderson(m=4, rtol=1e-6, atol=0), max_steps=40)
        z = deq(x)
        reg = deq.jacobian_regularisation(generator=torch.Generator().manual_seed(0))
        (z.square().mean() + reg).backward()
        return float(reg.detach()), [p.grad.clone() for p in cell.parameters()]

    reg_c, g_c = grads(True)
    assert _graphs() >= 1  # the forward solve did run compiled
    reg_e, g_e = grads(False)
    assert reg_c == pytest.approx(reg_e, rel=1e-5) and reg_e > 0
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
