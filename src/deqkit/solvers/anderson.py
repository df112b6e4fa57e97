"""Anderson acceleration (type II), batched with a per-sample least-squares solve."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from ._base import (
    AbstractFixedPointSolver,
    FlatFn,
    check_positive_int,
    check_tolerances,
    check_unit_interval,
)


@dataclasses.dataclass
class _AndersonState:
    F: Tensor  # (W, m, D) past f(z_i)
    G: Tensor  # (W, m, D) past residuals g_i = f(z_i) - z_i
    H: Tensor  # (W, m, m) Gram matrix G G^T (solver dtype; the small solve runs in float64)
    k: int = dataclasses.field(default=0, metadata={"batch": False})
    # one-hot rows selecting slot s among n, cached by (n, s): the fallback weights
    onehot: dict = dataclasses.field(default_factory=dict, metadata={"batch": False})
    # differentiable (unrolled) solves keep the history as lists of the iterates' own tensors
    # instead of writing copies into F and G, so autograd saves no per-step buffer copies
    history: dict = dataclasses.field(default_factory=dict, metadata={"batch": False})


@dataclasses.dataclass(frozen=True)
class Anderson(AbstractFixedPointSolver):
    r"""Anderson acceleration (Anderson 1965; Walker & Ni 2011), type II.

    Keeps the last :math:`n \le m` pairs :math:`(f(z_i), g_i = f(z_i) - z_i)` and, per sample,
    finds mixing weights :math:`\alpha` minimising the combined residual:

    .. math::
        \alpha = \arg\min_{\mathbf 1^\top\alpha = 1} \Big\|\sum_i \alpha_i g_i\Big\|^2
        = \frac{(H + \mu I)^{-1}\mathbf 1}{\mathbf 1^\top (H + \mu I)^{-1}\mathbf 1},
        \qquad H_{ij} = g_i^\top g_j,

    then :math:`z_{k+1} = \beta \sum_i \alpha_i f(z_i) + (1-\beta) \sum_i \alpha_i z_i`.

    Departures from common DEQ implementations (TorchDEQ, the original DEQ code):

    1. The Gram matrix is updated by one new row per step (:math:`O(mD)` per sample), not
       rebuilt, and the :math:`n\times n` system is solved in float64.
    2. The regulariser is relative, :math:`\mu = \text{regularisation}\cdot
       \operatorname{tr}(H)/n`, so it does not slow convergence at tight tolerances the way an
       absolute :math:`10^{-4}` does.
    3. A sample whose system is singular or non-finite falls back to a plain step for that
       step (no crash mid-training).

    Args:
        rtol: relative tolerance. Default: 1e-5.
        atol: absolute tolerance. Default: 1e-7.
        m: memory (number of past iterates mixed). Default: 5.
        beta: mixing (damping) parameter :math:`\beta \in (0, 1]`. Default: 1.0.
        regularisation: relative Tikhonov regulariser of the Gram system. Default: 1e-8.

    Example:
        >>> import torch, deqkit as dk
        >>> W = 0.5 * torch.eye(3, dtype=torch.float64)
        >>> b = torch.ones(2, 3, dtype=torch.float64)
        >>> sol = dk.fixed_point(lambda z: z @ W.T + b, torch.zeros_like(b),
        ...                      solver=dk.Anderson(m=3, rtol=1e-12, atol=0))
        >>> torch.allclose(sol.value, 2 * b)
        True
    """

    rtol: float = 1e-5
    atol: float = 1e-7
    m: int = 5
    beta: float = 1.0
    regularisation: float = 1e-8

    def __post_init__(self) -> None:
        check_tolerances("Anderson", self.rtol, self.atol)
        check_positive_int("Anderson", "m", self.m)
        check_unit_interval("Anderson", "beta", self.beta)
        if not isinstance(self.regularisation, (int, float)) or not self.regularisation >= 0:
            raise ValueError(
                f"Anderson: `regularisation` must be a float >= 0, got {self.regularisation!r}."
            )

    def init(self, fn: FlatFn, z: Tensor, fz: Tensor, r: Tensor, max_steps: int) -> _AndersonState:
        m = max(1, min(self.m, max_steps))
        w, d = z.shape
        F = z.new_empty(w, m, d)
        G = z.new_empty(w, m, d)
        H = z.new_zeros(w, m, m)
        return _AndersonState(F=F, G=G, H=H, k=0)

    def step(
        self, fn: FlatFn, z: Tensor, fz: Tensor, r: Tensor, state: _AndersonState
    ) -> tuple[Tensor, Tensor | None, Any]:
        # This runs once per solver step, so it is written for few tensor ops: in-place slot
        # writes and a mutable state unless autograd records the solve (UnrolledAdjoint).
        m = state.F.shape[1]
        k = state.k
        slot = k % m
        n = k + 1 if k < m else m
        differentiable = torch.is_grad_enabled() and (fz.requires_grad or r.requires_grad)
        if differentiable:
            Fl = state.history.setdefault("F", [None] * m)
            Gl = state.history.setdefault("G", [None] * m)
            Fl[slot], Gl[slot] = fz, r
            row = torch.stack([torch.linalg.vecdot(g, r) for g in Gl[:n]], dim=1)
            H = state.H.clone()
        else:
            F, G = state.F, state.G
            F[:, slot].copy_(fz)
            G[:, slot].copy_(r)
            Gn = G[:, :n]
            row = torch.matmul(r.unsqueeze(1), Gn.transpose(1, 2)).squeeze(1)  # g_k . g_i
            H = state.H
        H[:, slot, :n] = row
        H[:, :n, slot] = row
        if differentiable:
            state = dataclasses.replace(state, H=H, k=k + 1)
        else:
            state.k = k + 1
        if n == 1:
            if self.beta == 1.0:
                return fz, None, state
            return torch.lerp(z, fz, self.beta), None, state
        A = H[:, :n, :n].to(torch.float64, copy=True)
        diag = A.diagonal(dim1=1, dim2=2)
        # Relative Tikhonov term: regularisation * mean(diag H), plus a floor for H = 0.
        diag.add_(diag.sum(dim=1, keepdim=True) * (self.regularisation / n) + 1e-300)
        y = torch.linalg.solve_ex(A, A.new_ones(A.shape[0], n, 1))[0].squeeze(-1)
        s = y.sum(dim=1, keepdim=True)
        # Singular / non-finite system (s is then inf or NaN): plain step for that sample,
        # i.e. weight 1 on the newest slot.
        key = (n, slot)
        plain = state.onehot.get(key)
        if plain is None or plain.device != y.device:
            plain = torch.zeros(1, n, dtype=y.dtype, device=y.device)
            plain[0, slot] = 1.0
            state.onehot[key] = plain
        alpha = torch.where(torch.isfinite(s), y / s, plain).to(z.dtype)
        if differentiable:
            z_next = sum(alpha[:, i : i + 1] * Fl[i] for i in range(n))
            if self.beta != 1.0:
                z_next = z_next - (1.0 - self.beta) * sum(
                    alpha[:, i : i + 1] * Gl[i] for i in range(n)
                )
            return z_next, None, state
        z_next = torch.bmm(alpha.unsqueeze(1), F[:, :n]).squeeze(1)
        if self.beta != 1.0:
            z_next = z_next - (1.0 - self.beta) * torch.bmm(alpha.unsqueeze(1), Gn).squeeze(1)
        return z_next, None, state
