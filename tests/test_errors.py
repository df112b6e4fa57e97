"""Bad input gets a clear error naming the argument, the value and the fix."""

from __future__ import annotations

import pytest
import torch

import deqkit as dk

Z = torch.zeros(2, 3)


def f(z):
    return 0.5 * z


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"solver": 3}, TypeError, "`solver` must be a deqkit solver"),
        ({"solver": "nope"}, ValueError, "Unknown solver 'nope'"),
        ({"adjoint": "implicit"}, TypeError, "`adjoint` must be a deqkit adjoint"),
        ({"max_steps": -1}, ValueError, "`max_steps` must be an int >= 0, got -1"),
        ({"max_steps": 2.5}, ValueError, "`max_steps`"),
        ({"args": [Z]}, TypeError, "`args` must be a tuple"),
        ({"args": (torch.zeros(5, 3),)}, ValueError, r"args\[0\]. has shape \(5, 3\)"),
        ({"compact_ratio": 0}, ValueError, "compact_ratio"),
        ({"divergence_ratio": 0.5}, ValueError, "divergence_ratio"),
    ],
)
def test_fixed_point_argument_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        dk.fixed_point(f, Z, **kwargs)


def test_state_errors():
    with pytest.raises(ValueError, match="leading batch dimension"):
        dk.fixed_point(f, torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating point"):
        dk.fixed_point(f, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN or inf"):
        dk.fixed_point(f, torch.full((2, 3), float("nan")))
    with pytest.raises(ValueError, match="share the batch size"):
        dk.fixed_point(lambda z: z, (torch.zeros(2, 3), torch.zeros(3, 3)))
    with pytest.raises(ValueError, match="keep the shape of z0"):
        dk.fixed_point(lambda z: z[:, :2], Z)
    with pytest.raises(ValueError, match="same structure as `z0`"):
        dk.fixed_point(lambda z: (z, z), Z)
    with pytest.raises(TypeError, match="`f` must be callable"):
        dk.fixed_point(None, Z)


@pytest.mark.parametrize(
    ("ctor", "match"),
    [
        (lambda: dk.Anderson(m=0), "`m` must be an int >= 1, got 0"),
        (lambda: dk.Anderson(beta=1.5), "`beta` must be in"),
        (lambda: dk.Anderson(rtol=-1), "`rtol` must be a finite float >= 0"),
        (lambda: dk.Anderson(regularisation=-1.0), "regularisation"),
        (lambda: dk.Picard(damping=0), "`damping` must be in"),
        (lambda: dk.Picard(rtol=0, atol=0), "both 0"),
        (lambda: dk.Broyden(memory=0), "`memory`"),
        (lambda: dk.Broyden(line_search=1), "`line_search` must be a bool"),
        (lambda: dk.NewtonKrylov(linear_solver="gmres"), "`linear_solver` must be"),
        (lambda: dk.ImplicitAdjoint(dk.Anderson()), "`linear_solver` must be"),
        (lambda: dk.ImplicitAdjoint(on_failure="explode"), "`on_failure` must be one of"),
        (lambda: dk.ImplicitAdjoint(fallback="jfb"), "`fallback` must be None or 'phantom'"),
        (lambda: dk.PhantomAdjoint(steps=0), "`steps` must be an int >= 1"),
        (lambda: dk.PhantomAdjoint(damping=2), "`damping` must be in"),
    ],
)
def test_config_errors(ctor, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ctor()


def test_unrolled_rejects_non_differentiable_solver():
    with pytest.raises(ValueError, match="cannot be differentiated by unrolling"):
        dk.fixed_point(f, Z, dk.Broyden(), adjoint=dk.UnrolledAdjoint())


def test_solver_error_is_runtime_error_with_remedy():
    with pytest.raises(RuntimeError, match="Increase `max_steps`") as info:
        dk.fixed_point(lambda z: 0.999 * z + 1, Z, dk.Picard(), max_steps=3)
    assert info.value.result is dk.RESULTS.max_steps_reached
