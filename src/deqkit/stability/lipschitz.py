"""A global Lipschitz upper bound of a feed-forward stack from its weights.

Used to certify that a cell is a contraction before any solve (``L < 1``): the product of the
layers' operator norms (exact SVD for linear layers and small convolutions, a Lanczos estimate
with a safety margin for large ones) and of the activations' maximal slopes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._checks import check_int

__all__ = ["lipschitz_upper_bound"]


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
