r"""The identity plus a low-rank matrix, per sample: a quasi-Newton inverse as an operator."""

from __future__ import annotations

import torch
from torch import Tensor

from ._operator import AbstractLinearOperator


class LowRankUpdate(AbstractLinearOperator):
    r"""The operator :math:`M_b = I + U_b V_b^\top` for each sample ``b``, never materialised.

    ``U`` and ``V`` have shape ``(B, D, n)``: ``n`` columns per sample (a rank-``n`` update,
    at most).  The products cost two batched matrix products, :math:`O(B D n)`:

    .. math::

        M v = v + U (V^\top v), \qquad M^\top u = u + V (U^\top u),

    so ``LowRankUpdate(U, V).T`` is ``LowRankUpdate(V, U)``.  Zero columns are allowed and
    contribute nothing, so a sample may use fewer than ``n`` columns (padding with zeros, as a
    limited-memory quasi-Newton solver does while its history fills up).

    A (limited-memory) quasi-Newton solver of :math:`z = f(z)` builds its estimate of
    :math:`(I - J)^{-1}` in this form.  Handed to a linear solver it is an initial guess
    (``x0 = M r``) and a right preconditioner of the Newton system :math:`(I - J) x = r`, and
    its transpose ``M.T`` of the implicit backward system :math:`(I - J^\top) u = g` (the
    ``preconditioner`` of :meth:`~deqkit.linear.AbstractLinearSolver.solve`).

    Args:
        U: a floating-point ``(B, D, n)`` tensor.
        V: a tensor of the shape, dtype and device of ``U``.

    Raises:
        ValueError: if ``U`` or ``V`` is not a floating-point ``(B, D, n)`` tensor, or they
            differ in shape, dtype or device.

    Reference: C. G. Broyden, "A class of methods for solving nonlinear simultaneous
        equations", Math. Comp. 19, 577-593, 1965; the compact limited-memory form as in
        R. H. Byrd, J. Nocedal, R. B. Schnabel, "Representations of quasi-Newton matrices and
        their use in limited memory methods", Math. Program. 63, 129-156, 1994.

    Example:
        >>> import torch
        >>> from deqkit.linear import LowRankUpdate
        >>> U = torch.tensor([[[1.0], [0.0]]], dtype=torch.float64)  # (B, D, n) = (1, 2, 1)
        >>> V = torch.tensor([[[0.0], [2.0]]], dtype=torch.float64)
        >>> M = LowRankUpdate(U, V)  # [[1, 2], [0, 1]]
        >>> v = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
        >>> M.mv(v).tolist(), M.T.mv(v).tolist(), M.as_matrix().tolist()
        ([[3.0, 1.0]], [[1.0, 3.0]], [[[1.0, 2.0], [0.0, 1.0]]])
    """

    def __init__(self, U: Tensor, V: Tensor) -> None:
        _check_factors(U, V)
        self.U, self.V = U, V
        self._norm: Tensor | None = None  # computed once (M and M^T share it)

    shape = property(lambda self: (self.U.shape[0], self.U.shape[1]))
    dtype = property(lambda self: self.U.dtype)
    device = property(lambda self: self.U.device)

    @property
    def rank(self) -> int:
        """``n``, the number of columns of ``U`` and ``V`` (an upper bound of the rank)."""
        return self.U.shape[2]

    def norm(self) -> Tensor:
        r"""The spectral norms :math:`\|I + U_b V_b^\top\|_2`, shape ``(B,)``, exactly
        (computed once per operator, and shared with its transpose).

        With :math:`W = [U\ V] = Q T` (``Q`` orthonormal, ``T = [T_U\ T_V]``),
        :math:`M = Q (I + T_U T_V^\top) Q^\top + (I - Q Q^\top)`, so the norm is that of a
        ``2n x 2n`` matrix, or 1 on the complement of the span of ``U`` and ``V``. ``T`` comes
        from the small Gram matrix (of the columns scaled to unit norm, then scaled back)
        :math:`W^\top W = Z \Lambda Z^\top` as :math:`T = \Lambda^{1/2} Z^\top` (directions with
        :math:`\lambda` below the dtype's resolution dropped): one batched :math:`O(B D n^2)`
        product, about 3x faster on CPUs than a thin QR of the ``(B, D, 2n)`` factors at
        ``n = 20``. When ``D <= 2n`` the span may be the whole space and a thin QR gives
        ``T``. The linear solvers use it to scale their :math:`\|A^{-1}\|_2` estimate when
        this operator is the preconditioner."""
        if self._norm is None:
            self._norm = _low_rank_norm(self.U, self.V)
        return self._norm

    def mv(self, v: Tensor) -> Tensor:
        return _apply(self.U, self.V, v)

    def rmv(self, u: Tensor) -> Tensor:
        return _apply(self.V, self.U, u)

    def transpose(self) -> LowRankUpdate:
        out = LowRankUpdate(self.V, self.U)
        out._norm = self._norm  # ||M^T|| = ||M||
        return out

    def as_matrix(self) -> Tensor:
        """The ``(B, D, D)`` matrices :math:`I + U V^\\top`, without ``D`` products."""
        eye = torch.eye(self.shape[1], dtype=self.dtype, device=self.device)
        return torch.baddbmm(eye.expand(self.shape[0], -1, -1), self.U, self.V.transpose(1, 2))


def _apply(U: Tensor, V: Tensor, v: Tensor) -> Tensor:
    """``v + U (V^T v)`` row by row, as two batched products."""
    if U.shape[2] == 0:
        return v.clone()
    coef = torch.bmm(v.unsqueeze(1), V)  # (B, 1, n) = (V^T v)^T
    return torch.baddbmm(v.unsqueeze(1), coef, U.transpose(1, 2)).squeeze(1)


def _check_factors(U: object, V: object) -> None:
    for name, t in (("U", U), ("V", V)):
        if not isinstance(t, Tensor) or t.dim() != 3 or not t.is_floating_point():
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"LowRankUpdate: `{name}` must be a floating-point (B, D, n) tensor, got {got}. "
                "For one (D, n) factor F pass e.g. F.expand(B, D, n)."
            )
    assert isinstance(U, Tensor) and isinstance(V, Tensor)
    if U.shape != V.shape or U.dtype != V.dtype or U.device != V.device:
        raise ValueError(
            "LowRankUpdate: `U` and `V` must have the same shape, dtype and device, got "
            f"{U.dtype} {tuple(U.shape)} on {U.device} and {V.dtype} {tuple(V.shape)} on "
            f"{V.device}. Pad the shorter one with zero columns, e.g. torch.nn.functional.pad."
        )


def _low_rank_norm(U: Tensor, V: Tensor) -> Tensor:
    """``||I + U_b V_b^T||_2`` per sample (see :meth:`LowRankUpdate.norm`)."""
    (batch, dim, n), dtype = U.shape, U.dtype
    if n == 0:
        return torch.ones(batch, dtype=dtype, device=U.device)
    W = torch.cat([U, V], dim=2)
    if dim <= 2 * n:
        Q, T = torch.linalg.qr(W)
        k, full = Q.shape[2], True
    else:
        # unit columns first: Broyden's pairs differ in scale by many orders of magnitude,
        # which a Gram matrix of the raw factors would square
        scale = torch.linalg.vector_norm(W, dim=1, keepdim=True)  # (B, 1, 2n)
        Wn = W / scale.clamp_min(torch.finfo(dtype).tiny)
        evals, Z = torch.linalg.eigh((Wn.transpose(1, 2) @ Wn).double())
        floor = 10 * torch.finfo(dtype).eps * evals.amax(dim=1, keepdim=True)
        Tn = torch.where(evals > floor, evals, 0.0).sqrt().unsqueeze(2) * Z.transpose(1, 2)
        T = Tn * scale.double()  # W = Q Tn diag(scale)
        k, full = 2 * n, False
    small = torch.eye(k, dtype=T.dtype, device=T.device) + T[:, :, :n] @ T[:, :, n:].transpose(1, 2)
    norm = torch.linalg.matrix_norm(small, ord=2).to(dtype)
    return norm if full and dim == k else norm.clamp_min(1.0)
