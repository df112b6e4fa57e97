"""The argument validators (deqkit._checks): what they accept, refuse and say."""

from __future__ import annotations

import math

import pytest
import torch

from deqkit._checks import (
    all_finite,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_tolerances,
)


@pytest.mark.parametrize("bad", [True, False, 2.0, "3", None, 0])
def test_check_int_refuses_bools_floats_and_small_values(bad):
    with pytest.raises(ValueError, match=rf"^Owner: `n` must be an int >= 1, got {bad!r}\.$"):
        check_int("Owner", "n", bad)


def test_check_int_range_none_and_example():
    assert check_int("O", "n", 0, 0) == 0
    assert check_int("O", "n", None, none=True) is None
    with pytest.raises(ValueError, match=r"`d` must be None or an int in \[-2, 1\], got 2\. "
                                         r"Pass e.g\. d=0\.$"):
        check_int("O", "d", 2, -2, maximum=1, none=True, example=0)


@pytest.mark.parametrize("bad", [True, "1", None, math.nan, math.inf, -math.inf])
def test_check_float_refuses_bools_strings_nan_and_inf(bad):
    with pytest.raises(ValueError, match="`x`"):
        check_float("O", "x", bad, ge=0)


def test_check_float_bounds_and_wording():
    assert check_float("O", "x", 1, gt=0, le=1) == 1.0
    assert check_float("O", "x", math.inf, gt=0, finite=False) == math.inf
    with pytest.raises(ValueError, match=r"must be a float > 0, got nan"):
        check_float("O", "x", math.nan, gt=0, finite=False)  # NaN: never
    for kwargs, rule in [
        ({"gt": 0, "le": 1}, r"in \(0, 1\]"),
        ({"ge": 0, "lt": 1}, r"in \[0, 1\)"),
        ({"ge": 0}, "a finite float >= 0"),
        ({"gt": 1, "none": True}, "None or a finite float > 1"),
    ]:
        with pytest.raises(ValueError, match=rf"^O: `x` must be {rule}, got -5\.$"):
            check_float("O", "x", -5, **kwargs)


def test_empty_owner_has_no_prefix():
    with pytest.raises(ValueError, match=r"^`max_steps` must be an int >= 0, got -1\.$"):
        check_int("", "max_steps", -1, 0)


def test_check_tolerances():
    check_tolerances("S", 0, 1e-6)
    check_tolerances("S", 0, 0, both_zero=True)
    with pytest.raises(ValueError, match="both 0"):
        check_tolerances("S", 0, 0.0)
    with pytest.raises(ValueError, match=r"`atol` must be a finite float >= 0, got inf\. Pass "
                                         r"e\.g\. atol=1e-6"):
        check_tolerances("S", 1e-3, math.inf, example="1e-6")


def test_check_choice_and_bool():
    assert check_choice("O", "mode", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match=r"`mode` must be one of 'a', 'b', got 'c'\. Pass e\.g"):
        check_choice("O", "mode", "c", ("a", "b"), example="'a'")
    assert check_bool("O", "flag", False) is False
    with pytest.raises(TypeError, match=r"`flag` must be a bool \(True or False\), got 1\."):
        check_bool("O", "flag", 1)
    with pytest.raises(ValueError, match="`flag`"):
        check_bool("O", "flag", None, error=ValueError)


def test_all_finite():
    assert all_finite(torch.ones(3))
    assert not all_finite(torch.tensor([1.0, math.nan]))
    assert all_finite(torch.full((4,), 3e38))  # the sum overflows, the entries do not
