"""Stability diagnostics of a deep equilibrium cell: Jacobian norms, spectral radius, Lipschitz.

For a DEQ ``z* = f(z*, x)`` the local behaviour of the fixed-point iteration and of the
implicit backward pass is governed by the Jacobian ``J = df/dz`` at the equilibrium:

* the spectral radius ``rho(J)`` decides whether naive iteration converges locally
  (``rho < 1``) and whether ``I - J`` is well conditioned for the implicit gradient;
* the spectral norm ``||J||_2 >= rho(J)`` is the local Lipschitz constant (``< 1`` means
  ``f`` is locally contractive in the Euclidean norm);
* ``lipschitz_upper_bound`` (in :mod:`deqkit.stability.lipschitz`) bounds the *global*
  Lipschitz constant of a simple feed-forward stack from its weights.

All functions treat ``f`` as a black box mapping a tensor of shape ``(B, ...)`` to the same
shape with samples independent (row ``b`` of the output depends only on row ``b`` of the
input), and work per sample on the flat view of size ``D = numel / B``.  They never form a
dense Jacobian: products with ``J`` and ``J^T`` come from automatic differentiation.

Implementation note: ``f`` is evaluated **once** per call and both ``J v`` and ``J^T u`` are
taken from that single graph (``J^T u`` by one vector-Jacobian product, ``J v`` by the
"double-VJP" trick: ``J v = d/dw <J^T w, v>``).  Compared with ``torch.func.jvp`` this works
with every autograd-supported op (including custom ``autograd.Function`` without a forward-mode
rule), and -- importantly -- linearises *one* evaluation of ``f``, so a cell whose forward has
side effects (the power iteration of :func:`deqkit.nn.spectral_norm` in training mode, ordinary
``nn.Dropout``) still has one well-defined Jacobian.  The price is that ``f`` must be twice
differentiable in the backward sense (true for all standard layers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._checks import check_float, check_int
from ..linear import JacobianOperator

CellFn = Callable[[Tensor], Tensor]

__all__ = [
    "jacobian_spectral_norm",
    "jacobian_spectral_radius",
]


# ----------------------------------------------------------------------------------- checks
def _check_f_z(name: str, f: object, z: object) -> None:
    if not callable(f):
        raise TypeError(
            f"{name}: `f` must be callable (a function or module mapping z to f(z)), "
            f"got {type(f).__name__}."
        )
    if not isinstance(z, Tensor):
        raise TypeError(
            f"{name}: `z` must be a torch.Tensor of shape (B, ...), got {type(z).__name__}."
        )
    if z.ndim < 1 or z.shape[0] == 0 or z.numel() == 0:
        raise ValueError(
            f"{name}: `z` must have a leading batch dimension and at least one element, "
            f"got shape {tuple(z.shape)}. Pass e.g. z of shape (B, D) with B >= 1, D >= 1."
        )
    if not z.is_floating_point():
        raise ValueError(
            f"{name}: `z` must be a floating-point tensor, got dtype {z.dtype}. "
            f"Convert it with z.float() or z.double()."
        )


def _randn(shape: Sequence[int], like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(tuple(shape), generator=generator, device=like.device, dtype=like.dtype)


# ---------------------------------------------------------------------- linearisation of f
def _linearisation(f: CellFn, z: Tensor, name: str) -> JacobianOperator:
    """The Jacobian of ``f`` at ``z`` (flat ``(B, D)`` products ``mv = J v``, ``rmv = J^T u``)
    from one evaluation of ``f``, after checking that ``f`` keeps the shape of ``z``."""
    with torch.enable_grad():
        zr = z.detach().requires_grad_(True)
        fz = f(zr)
        if not isinstance(fz, Tensor) or fz.shape != z.shape:
            got = tuple(fz.shape) if isinstance(fz, Tensor) else type(fz).__name__
            raise ValueError(
                f"{name}: `f` must return a tensor of the same shape as z "
                f"{tuple(z.shape)}, got {got}."
            )
    return JacobianOperator.from_evaluation(zr, fz)


# ------------------------------------------------------------------------------ spectral norm
def jacobian_spectral_norm(
    f: CellFn,
    z: Tensor,
    n_iter: int = 100,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Per-sample spectral norm ``||J_f(z_b)||_2`` by power iteration, without a dense Jacobian.

    Power iteration on ``J^T J`` (per sample ``b``)::

        v <- random unit vector
        repeat: u = J v;  sigma = ||u||;  w = J^T u;  v = w / ||w||

    ``sigma_k = ||J v_k||`` increases monotonically to the largest singular value
    :math:`\sigma_1`; its error decays like :math:`(\sigma_2/\sigma_1)^{2k}`.  Each iteration
    costs one Jacobian-vector product and one vector-Jacobian product of the whole batch
    (normalisation is per sample).  Iteration stops early when every sample's estimate
    changed by less than ``tol`` relative to the previous iteration.

    The estimate approaches :math:`\sigma_1` from below; it is the local Lipschitz constant of
    ``f`` at ``z`` and an upper bound of the spectral radius.

    Args:
        f: the cell, mapping a tensor of shape ``(B, ...)`` to the same shape, samples
            independent.  It is evaluated once (its Jacobian is taken at that evaluation).
        z: the point, shape ``(B, ...)``, floating point.  It is detached internally.
        n_iter: maximum number of power iterations (default ``100``).
        tol: relative-change stopping tolerance (default ``1e-6``; ``0`` runs all ``n_iter``).
        generator: optional ``torch.Generator`` (on ``z``'s device) for the random start.

    Returns:
        A detached tensor of shape ``(B,)`` and ``z``'s dtype with the estimates.

    Raises:
        TypeError: ``f`` not callable or ``z`` not a tensor.
        ValueError: bad shape/dtype of ``z``, bad ``n_iter`` or ``tol``, or ``f`` changes the
            shape.

    Reference: power iteration on J^T J with Jacobian-vector and vector-Jacobian products (Golub
        & Van Loan, "Matrix Computations", 7.3); its use for DEQ stability: Bai, Koltun, Kolter
        (2021), "Stabilizing Equilibrium Models by Jacobian Regularization".

    Example:
        >>> import torch
        >>> A = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
        >>> jacobian_spectral_norm(lambda z: z @ A.T, torch.randn(4, 2))
        tensor([3., 3., 3., 3.])
    """
    name = "jacobian_spectral_norm"
    _check_f_z(name, f, z)
    check_int(name, "n_iter", n_iter, example=100)
    check_float(name, "tol", tol, ge=0, example="1e-6")
    lin = _linearisation(f, z, name)
    batch = z.shape[0]
    v = _randn((batch, z[0].numel()), z, generator)
    v = v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)
    sigma = torch.zeros(batch, dtype=z.dtype, device=z.device)
    for _ in range(n_iter):
        u = lin.mv(v)
        new_sigma = u.norm(dim=1)
        w = lin.rmv(u)
        wn = w.norm(dim=1, keepdim=True)
        # keep v where J^T J v vanished (sigma is then 0 for this sample, or v was unlucky)
        v = torch.where(wn > 0, w / wn.clamp_min(torch.finfo(z.dtype).tiny), v)
        change = (new_sigma - sigma).abs()
        sigma = new_sigma
        if bool((change <= tol * sigma.abs()).all()):
            break
    return sigma.detach()


# ---------------------------------------------------------------------------- spectral radius
def jacobian_spectral_radius(
    f: CellFn,
    z: Tensor,
    krylov_dim: int = 30,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Per-sample spectral radius ``rho(J_f(z_b))`` by batched Arnoldi iteration.

    Builds, for every sample at once, an orthonormal basis ``Q_m`` of the Krylov space
    ``span{q, J q, ..., J^{m-1} q}`` (``m = min(krylov_dim, D)``, random ``q``) with modified
    Gram-Schmidt (plus one re-orthogonalisation pass) vectorised across the batch, giving the
    small upper-Hessenberg matrix ``H_m = Q_m^T J Q_m``.  The eigenvalues of ``H_m`` (Ritz
    values) approximate the outer eigenvalues of ``J``; the result is
    ``max_i |lambda_i(H_m)|`` per sample, computed with ``torch.linalg.eigvals``.

    * Exact (up to rounding) when ``D <= krylov_dim``: then ``H_m`` is similar to ``J``.
    * Breakdown (``J`` maps the current Krylov space into itself, so its Ritz values are exact
      eigenvalues) is detected per sample; that sample's remaining basis vectors are zero and
      contribute only zero Ritz values.
    * Why not power iteration: the Jacobian of a DEQ cell is non-symmetric, and its dominant
      eigenvalues are often a complex-conjugate pair (or several of equal modulus); power
      iteration then oscillates instead of converging.  Arnoldi captures complex pairs.
    * Each step costs one Jacobian-vector product of the whole batch (``m`` in total); the
      basis takes ``B * m * D`` numbers of memory.

    Args:
        f: the cell, mapping ``(B, ...)`` to the same shape, samples independent.  It is
            evaluated once.
        z: the point, shape ``(B, ...)``, floating point (float64 advisable for ``D`` large
            and ``krylov_dim`` large: Arnoldi loses orthogonality slowly in float32).
        krylov_dim: Krylov space dimension ``m`` (default ``30``); larger is more accurate for
            big ``D``.
        generator: optional ``torch.Generator`` (on ``z``'s device) for the start vector.

    Returns:
        A detached real tensor of shape ``(B,)`` and ``z``'s dtype.

    Raises:
        TypeError: ``f`` not callable or ``z`` not a tensor.
        ValueError: bad ``z``, bad ``krylov_dim``, or ``f`` changes the shape.

    Reference: W. E. Arnoldi (1951), "The principle of minimized iterations in the solution of
        the matrix eigenvalue problem"; the spectral radius of J at z* as the DEQ's local
        convergence rate: Bai, Koltun, Kolter (2021), "Stabilizing Equilibrium Models by
        Jacobian Regularization".

    Example:
        >>> import torch
        >>> R = torch.tensor([[0.0, -0.9], [0.9, 0.0]], dtype=torch.float64)  # eigs +-0.9i
        >>> jacobian_spectral_radius(lambda z: z @ R.T, torch.randn(3, 2, dtype=torch.float64))
        tensor([0.9000, 0.9000, 0.9000], dtype=torch.float64)
    """
    name = "jacobian_spectral_radius"
    _check_f_z(name, f, z)
    check_int(name, "krylov_dim", krylov_dim, example=30)
    lin = _linearisation(f, z, name)
    batch = z.shape[0]
    dim = z[0].numel()
    m = min(krylov_dim, dim)
    dtype, device = z.dtype, z.device
    eps = torch.finfo(dtype).eps

    basis = torch.zeros(batch, m, dim, dtype=dtype, device=device)
    hess = torch.zeros(batch, m + 1, m, dtype=dtype, device=device)
    q = _randn((batch, dim), z, generator)
    basis[:, 0] = q / q.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    for j in range(m):
        w = lin.mv(basis[:, j])
        ref = w.norm(dim=1)
        for _ in range(2):  # MGS, then one re-orthogonalisation pass ("twice is enough")
            for i in range(j + 1):
                qi = basis[:, i]
                h = (qi * w).sum(dim=1)
                w = w - h[:, None] * qi
                hess[:, i, j] += h
        hnext = w.norm(dim=1)
        hess[:, j + 1, j] = hnext
        if j + 1 < m:
            # breakdown: the Krylov space is invariant (to rounding) for this sample
            broke = hnext <= 1e3 * eps * ref
            active = active & ~broke
            hess[:, j + 1, j] = torch.where(active, hnext, torch.zeros_like(hnext))
            nxt = w / hnext.clamp_min(torch.finfo(dtype).tiny)[:, None]
            basis[:, j + 1] = torch.where(active[:, None], nxt, torch.zeros_like(nxt))
            if not bool(active.any()):
                break  # every sample's Krylov space is invariant: the Ritz values are exact
    ritz = torch.linalg.eigvals(hess[:, :m, :m])
    return ritz.abs().amax(dim=1).to(dtype).detach()

