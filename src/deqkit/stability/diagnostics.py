"""Stability diagnostics of a deep equilibrium cell: Jacobian norms, spectral radius, Lipschitz.

For a DEQ ``z* = f(z*, x)`` the local behaviour of the fixed-point iteration and of the
implicit backward pass is governed by the Jacobian ``J = df/dz`` at the equilibrium:

* the spectral radius ``rho(J)`` decides whether naive iteration converges locally
  (``rho < 1``) and whether ``I - J`` is well conditioned for the implicit gradient;
* the spectral norm ``||J||_2 >= rho(J)`` is the local Lipschitz constant (``< 1`` means
  ``f`` is locally contractive in the Euclidean norm);
* :func:`lipschitz_upper_bound` bounds the *global* Lipschitz constant of a simple
  feed-forward stack from its weights.

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

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_float, check_int
from ..linear import JacobianOperator

CellFn = Callable[[Tensor], Tensor]

__all__ = [
    "jacobian_spectral_norm",
    "jacobian_spectral_radius",
    "lipschitz_upper_bound",
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


# ------------------------------------------------------------------------- Lipschitz bound
_GELU_EXACT = 0.5 * (1.0 + math.erf(1.0)) + math.exp(-1.0) / math.sqrt(math.pi)  # ~1.1289
_GELU_TANH = 1.1290  # max slope of the tanh approximation, 1.12897..., rounded up
_SILU = 1.0999  # max slope of x * sigmoid(x), 1.09984..., rounded up
_DENSE_CONV_LIMIT = 1 << 20  # conv operators with at most this many matrix entries: exact SVD
_CONV_MARGIN = 1e-3  # relative margin on Lanczos conv norms (they approach from below)


def _activation_constant(layer: nn.Module) -> float | None:
    """Lipschitz constant of a pointwise activation / shape op, or ``None`` if not one."""
    if isinstance(
        layer,
        (
            nn.ReLU,
            nn.ReLU6,
            nn.Tanh,
            nn.Identity,
            nn.Hardtanh,
            nn.Softplus,
            nn.Flatten,
            nn.Unflatten,
            nn.Softsign,
            nn.Tanhshrink,
        ),
    ):
        return 1.0  # (Tanhshrink: slope tanh(x)^2 in [0, 1); Softsign: 1 / (1 + |x|)^2)
    if isinstance(layer, nn.Sigmoid):
        return 0.25
    if isinstance(layer, nn.Hardsigmoid):
        return 1.0 / 6.0
    if isinstance(layer, nn.LeakyReLU):
        return max(1.0, abs(float(layer.negative_slope)))
    if isinstance(layer, nn.PReLU):
        return max(1.0, float(layer.weight.detach().abs().max()))
    if isinstance(layer, (nn.ELU, nn.CELU)):
        return max(1.0, float(layer.alpha))
    if isinstance(layer, nn.SELU):
        return 1.0507009873554805 * 1.6732632423543772
    if isinstance(layer, nn.GELU):
        return _GELU_TANH if layer.approximate == "tanh" else _GELU_EXACT
    if isinstance(layer, (nn.SiLU,)):
        return _SILU
    if isinstance(layer, (nn.Dropout, nn.AlphaDropout)) or getattr(
        layer, "inverted_dropout", False
    ):
        p = float(getattr(layer, "p", 0.0))
        # identity in eval mode; inverted dropout scales kept units by 1/(1-p) in training
        return 1.0 / (1.0 - p) if layer.training and p < 1 else 1.0
    return None


_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _leaves(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        out: list[nn.Module] = []
        for child in module:
            out.extend(_leaves(child))
        return out
    return [module]


def _conv_operator_norm(
    layer: nn.Module,
    in_shape: tuple[int, ...],
    n_out: int,
    n_iter: int,
    generator: torch.Generator | None,
) -> float:
    """Operator 2-norm of the linear part of ``layer`` (bias dropped) on inputs ``in_shape``."""
    weight = layer.weight.detach().double()

    def op(x: Tensor) -> Tensor:
        return layer._conv_forward(x, weight, None)  # handles padding_mode

    n_in = math.prod(in_shape)
    device = weight.device
    if n_in * n_out <= _DENSE_CONV_LIMIT:
        eye = torch.eye(n_in, dtype=torch.float64, device=device).reshape(n_in, *in_shape)
        with torch.no_grad():
            cols = op(eye).reshape(n_in, -1)  # row i = A e_i, i.e. A^T
        return float(torch.linalg.matrix_norm(cols, ord=2))
    # Lanczos on A^T A (full re-orthogonalisation); the adjoint A^T by autograd, i.e. a
    # transposed convolution.  The largest Ritz value converges much faster than plain power
    # iteration, which is very slow on the clustered spectra of convolutions.

    def normal_op(x: Tensor) -> Tensor:
        with torch.enable_grad():
            xr = x.detach().reshape(1, *in_shape).requires_grad_(True)
            y = op(xr)
            (g,) = torch.autograd.grad(y, xr, y.detach())
        return g.reshape(-1)

    steps = min(n_iter, n_in)
    basis = torch.zeros(steps + 1, n_in, dtype=torch.float64, device=device)
    q = torch.randn(n_in, dtype=torch.float64, device=device, generator=generator)
    basis[0] = q / q.norm()
    alphas: list[float] = []
    betas: list[float] = []
    top = 0.0
    for j in range(steps):
        w = normal_op(basis[j])
        alpha = float(basis[j] @ w)
        for _ in range(2):  # full re-orthogonalisation against the whole basis, twice
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        alphas.append(alpha)
        tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
        new_top = float(torch.linalg.eigvalsh(tri)[-1])
        beta = float(w.norm())
        converged = abs(new_top - top) <= 1e-12 * abs(new_top)
        top = new_top
        if converged or beta <= 1e-12 * max(abs(top), torch.finfo(torch.float64).tiny):
            break  # Ritz value converged, or invariant subspace (Ritz values exact)
        betas.append(beta)
        basis[j + 1] = w / beta
    return math.sqrt(max(top, 0.0)) * (1.0 + _CONV_MARGIN)


def lipschitz_upper_bound(
    module: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    n_iter: int = 100,
    generator: torch.Generator | None = None,
) -> float:
    r"""Upper bound of the Lipschitz constant (Euclidean norms) of a feed-forward stack.

    For ``module = L_n o ... o L_1`` the bound is the product of per-layer constants
    :math:`\prod_i \mathrm{Lip}(L_i)` (composition rule; generally loose, exact for a chain of
    linear layers without activations whose singular vectors align, e.g. one layer):

    * ``nn.Linear``: :math:`\|W\|_2`, exact (SVD); the bias does not matter.
    * ``nn.Conv1d/2d/3d``: the operator norm of the convolution *as a linear map on inputs of
      the given shape* (stride, padding, dilation, groups and ``padding_mode`` included; bias
      ignored) -- the true quantity, which differs from the norm of the reshaped kernel
      matrix bounded by :func:`deqkit.nn.spectral_norm` (it can exceed it by up to about
      ``sqrt(prod kernel_size)``).  When the dense operator matrix has at most ``2**20``
      entries it is computed exactly from it (SVD); beyond, as the square root of the
      largest eigenvalue of ``A^T A`` by Lanczos iteration (at most ``n_iter`` steps, full
      re-orthogonalisation; ``A^T`` is the transposed convolution, by autograd) and then
      multiplied by ``1 + 1e-3``, because Lanczos (like power iteration) approaches the norm
      from below: an upper bound in practice, not a certificate.  Requires ``input_shape``.
    * activations: ReLU, ReLU6, Tanh, Hardtanh, Softplus, Softsign, Identity, Flatten,
      Unflatten: 1; Sigmoid: 1/4; Hardsigmoid: 1/6; LeakyReLU / PReLU: ``max(1, |slope|)``;
      ELU / CELU: ``max(1, alpha)``; SELU: ``scale * alpha`` (~1.758); GELU: ~1.1289
      (``Phi(sqrt 2) + sqrt 2 phi(sqrt 2)``); SiLU: ~1.0998; Tanhshrink: 1.
    * ``nn.Dropout`` and deqkit's ``VariationalDropout`` (any module whose class sets
      ``inverted_dropout = True`` and holds the drop probability ``p``): 1 in eval mode,
      ``1/(1-p)`` in training mode (inverted dropout rescales kept units; call
      ``module.eval()`` for 1).

    ``nn.Sequential`` containers may be nested.

    Args:
        module: an ``nn.Sequential`` (or a single supported layer).
        input_shape: shape of **one** input sample, without the batch dimension (e.g.
            ``(3, 32, 32)`` for a ``Conv2d`` stack); needed when the stack contains
            convolutions, whose operator norm depends on the spatial size.  Shapes are
            propagated layer by layer by running a zero tensor through the stack.  Default
            ``None``.
        n_iter: maximum Lanczos steps for large convolutions (default ``100``).
        generator: optional ``torch.Generator`` for the Lanczos start vector.

    Returns:
        The bound, a Python float.

    Raises:
        TypeError: ``module`` is not an ``nn.Module`` or contains unsupported layer types
            (all of them are named).
        ValueError: a convolution without ``input_shape``, or an ``input_shape`` the stack
            cannot be run on.

    Reference: the product bound of layer Lipschitz constants, Szegedy et al. (2014),
        "Intriguing properties of neural networks"; Miyato et al. (2018), "Spectral
        Normalization for Generative Adversarial Networks".

    Example:
        >>> import torch
        >>> from torch import nn
        >>> lin = nn.Linear(3, 3)
        >>> with torch.no_grad():
        ...     _ = lin.weight.copy_(torch.diag(torch.tensor([2.0, 1.0, 0.5])))
        >>> lipschitz_upper_bound(nn.Sequential(lin, nn.Tanh(), nn.Sequential(lin, nn.Sigmoid())))
        1.0
    """
    name = "lipschitz_upper_bound"
    if not isinstance(module, nn.Module):
        raise TypeError(f"{name}: `module` must be an nn.Module, got {type(module).__name__}.")
    check_int(name, "n_iter", n_iter, example=100)
    layers = _leaves(module)
    unsupported = sorted(
        {
            type(layer).__name__
            for layer in layers
            if not isinstance(layer, (nn.Linear, *_CONV_TYPES))
            and _activation_constant(layer) is None
        }
    )
    if unsupported:
        raise TypeError(
            f"{name}: unsupported layer type(s) {', '.join(unsupported)}. Supported: Linear, "
            "Conv1d/2d/3d, (nested) Sequential, Dropout and the pointwise activations ReLU, "
            "ReLU6, LeakyReLU, PReLU, ELU, CELU, SELU, GELU, SiLU, Tanh, Sigmoid, Hardtanh, "
            "Hardsigmoid, Softplus, Softsign, Tanhshrink, Identity, Flatten, Unflatten. Bound "
            "other layers by hand and multiply."
        )
    has_conv = any(isinstance(layer, _CONV_TYPES) for layer in layers)
    shape: tuple[int, ...] | None = None
    if input_shape is not None:
        try:
            shape = tuple(int(s) for s in input_shape)
        except (TypeError, ValueError):
            shape = None
        if shape is None or any(s < 1 for s in shape):
            raise ValueError(
                f"{name}: `input_shape` must be a sequence of positive ints (one sample, no "
                f"batch dimension), got {input_shape!r}. Pass e.g. input_shape=(3, 32, 32)."
            )
    elif has_conv:
        raise ValueError(
            f"{name}: the stack contains a convolution, whose operator norm depends on the "
            "input's spatial size, but `input_shape` is None. Pass the shape of one input "
            "sample without the batch dimension, e.g. input_shape=(3, 32, 32) for Conv2d."
        )

    bound = 1.0
    probe: Tensor | None = None
    if shape is not None:
        param = next(module.parameters(), None)
        probe = torch.zeros(
            (1, *shape),
            dtype=param.dtype if param is not None else torch.get_default_dtype(),
            device=param.device if param is not None else None,
        )
    for layer in layers:
        if isinstance(layer, nn.Linear):
            const = float(torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2))
        else:
            const = _activation_constant(layer)
        next_probe = probe
        if probe is not None and isinstance(
            layer, (nn.Linear, *_CONV_TYPES, nn.Flatten, nn.Unflatten)
        ):
            try:
                with torch.no_grad():
                    next_probe = layer(probe)
            except Exception as exc:  # shape mismatch etc.
                raise ValueError(
                    f"{name}: could not run layer {layer!r} on an input of per-sample shape "
                    f"{tuple(probe.shape[1:])} (propagated from input_shape={shape}): {exc}. "
                    "Check `input_shape` (one sample, no batch dimension)."
                ) from exc
        if isinstance(layer, _CONV_TYPES):
            assert probe is not None and next_probe is not None
            const = _conv_operator_norm(
                layer, tuple(probe.shape[1:]), next_probe[0].numel(), n_iter, generator
            )
        assert const is not None
        bound *= const
        probe = next_probe
    return bound
