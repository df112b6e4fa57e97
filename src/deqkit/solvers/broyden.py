"""Limited-memory Broyden's method on g(z) = f(z) - z."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from .._checks import check_bool, check_int, check_tolerances
from ._base import AbstractFixedPointSolver, FlatFn
from ._linesearch import backtrack


@dataclasses.dataclass
class _BroydenState:
    U: Tensor  # (W, m, D)
    V: Tensor  # (W, m, D)   inverse Jacobian estimate Hinv = -I + sum_i u_i v_i^T
    z_prev: Tensor  # (W, D)
    g_prev: Tensor  # (W, D)
    n: int = dataclasses.field(default=0, metadata={"batch": False})  # stored pairs
    k: int = dataclasses.field(default=0, metadata={"batch": False})  # steps taken


def _hv(U: Tensor, V: Tensor, x: Tensor) -> Tensor:
    """Hinv x = -x + U^T (V x) per sample."""
    if U.shape[1] == 0:
        return -x
    c = torch.linalg.vecdot(V, x.unsqueeze(1))  # (W, n)
    return -x + torch.bmm(c.unsqueeze(1), U).squeeze(1)


def _vh(U: Tensor, V: Tensor, x: Tensor) -> Tensor:
    """x^T Hinv = -x + V^T (U x) per sample."""
    if U.shape[1] == 0:
        return -x
    c = torch.linalg.vecdot(U, x.unsqueeze(1))
    return -x + torch.bmm(c.unsqueeze(1), V).squeeze(1)


@dataclasses.dataclass(frozen=True)
class Broyden(AbstractFixedPointSolver):
    r"""Limited-memory ("good") Broyden's method on :math:`g(z) = f(z) - z = 0`.

    Keeps an estimate :math:`H_k \approx J_g^{-1}` as :math:`-I + \sum_i u_i v_i^\top` with
    at most ``memory`` rank-one terms per sample, updated by Sherman–Morrison so that the
    secant condition :math:`H_{k+1} y_k = s_k` holds
    (:math:`s_k = z_{k+1} - z_k`, :math:`y_k = g_{k+1} - g_k`):

    .. math:: H_{k+1} = H_k + \frac{(s_k - H_k y_k)\, s_k^\top H_k}{s_k^\top H_k y_k},
              \qquad z_{k+1} = z_k - t_k H_k g_k.

    When the memory is full the estimate restarts from :math:`-I` with the newest pair.
    Overwriting the oldest pair instead (TorchDEQ's limited-memory variant) breaks the nested
    Sherman–Morrison structure; on a linear problem with spectral radius 0.98 it diverged in
    our tests where restarting converges. Storage is :math:`2 m D` floats per sample.

    Args:
        rtol: relative tolerance. Default: 1e-5.
        atol: absolute tolerance. Default: 1e-7.
        memory: number of rank-one pairs kept. Default: 20.
        line_search: backtracking (Armijo) line search on :math:`\|g\|^2`, with up to
            ``max_halvings`` extra evaluations of f per step. Default: False.
        max_halvings: maximum halvings of the step in the line search. Default: 4.

    Reference: Broyden (1965), "A class of methods for solving nonlinear simultaneous
    equations"; used for DEQs by Bai, Kolter, Koltun (2019).

    Example:
        >>> import torch, deqkit as dk
        >>> b = torch.ones(2, 3, dtype=torch.float64)
        >>> sol = dk.fixed_point(lambda z: 0.5 * torch.tanh(z) + b, torch.zeros_like(b),
        ...                      solver=dk.Broyden(rtol=1e-10, atol=0))
        >>> bool((sol.stats["rel_residual"] < 1e-10).all())
        True
    """

    rtol: float = 1e-5
    atol: float = 1e-7
    memory: int = 20
    line_search: bool = False
    max_halvings: int = 4
    supports_unrolled = False

    def __post_init__(self) -> None:
        check_tolerances("Broyden", self.rtol, self.atol)
        check_int("Broyden", "memory", self.memory)
        check_int("Broyden", "max_halvings", self.max_halvings, 0)
        check_bool("Broyden", "line_search", self.line_search)

    def init(self, fn: FlatFn, z: Tensor, fz: Tensor, r: Tensor, max_steps: int) -> _BroydenState:
        m = max(1, min(self.memory, max_steps))
        w, d = z.shape
        return _BroydenState(
            U=z.new_zeros(w, m, d), V=z.new_zeros(w, m, d), z_prev=z, g_prev=r, n=0, k=0
        )

    def step(
        self, fn: FlatFn, z: Tensor, fz: Tensor, r: Tensor, state: _BroydenState
    ) -> tuple[Tensor, Tensor | None, Any]:
        m = state.U.shape[1]
        U, V, n = state.U, state.V, state.n
        if state.k > 0:
            if n == m:  # memory full: restart from H = -I, then add the newest pair to it
                n = 0
            s = z - state.z_prev
            y = r - state.g_prev
            Un, Vn = U[:, :n], V[:, :n]
            hy = _hv(Un, Vn, y)
            sh = _vh(Un, Vn, s)
            denom = (sh * y).sum(dim=1, keepdim=True)
            tiny = torch.finfo(z.dtype).eps
            ok = denom.abs() > tiny * (sh.norm(dim=1, keepdim=True) * y.norm(dim=1, keepdim=True))
            ok = ok & torch.isfinite(denom)
            safe = torch.where(ok, denom, torch.ones_like(denom))
            u = torch.where(ok, (s - hy) / safe, torch.zeros_like(s))
            v = torch.where(ok, sh, torch.zeros_like(sh))
            U[:, n].copy_(u)
            V[:, n].copy_(v)
            n += 1
        direction = -_hv(U[:, :n], V[:, :n], r)
        direction = torch.where(torch.isfinite(direction), direction, r)
        if self.line_search:
            z_next, fz_next = backtrack(fn, z, r, direction, self.max_halvings)
        else:
            z_next, fz_next = z + direction, None
        new_state = dataclasses.replace(state, U=U, V=V, z_prev=z, g_prev=r, n=n, k=state.k + 1)
        return z_next, fz_next, new_state

    def inverse_estimate(self, state: _BroydenState | None,
                         rows: Tensor) -> tuple[Tensor, Tensor] | None:
        r"""The low-rank inverse as factors of :math:`M \approx (I - J)^{-1}`.

        Broyden's :math:`H = -I + \sum_i u_i v_i^\top` estimates :math:`J_g^{-1} =
        (J - I)^{-1}`, so :math:`M = -H = I + U' V'^\top` with :math:`U' = -[u_i]`,
        :math:`V' = [v_i]` (``(len(rows), D, n)``, ``n`` the stored pairs since the last
        restart). The good Broyden update satisfies the newest secant equation
        :math:`H y_k = s_k` exactly; older ones only approximately (they are not inherited).
        """
        if state is None or state.n == 0:
            return None
        n = state.n
        U = state.U[:, :n].index_select(0, rows).transpose(1, 2).neg()
        V = state.V[:, :n].index_select(0, rows).transpose(1, 2)
        return U.contiguous(), V.contiguous()
