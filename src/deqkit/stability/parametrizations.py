"""Weight parametrizations that keep a DEQ cell well posed, and careful initialisation.

A DEQ cell ``f(z) = phi(W z + U x + b)`` with a 1-Lipschitz activation ``phi`` is a
contraction in ``z`` when ``||W||_2 < 1``; then the equilibrium exists, is unique, and
fixed-point iteration converges (Banach).  :func:`spectral_norm` enforces
``||W||_2 <= bound`` by rescaling (only when needed), :func:`weight_norm` decouples the
scale of each output row, :func:`cached_parametrizations` makes either cheap inside a solver
loop, and :func:`scale_to_contractive` rescales an initialised cell so that its Jacobian norm
starts below a target.

All parametrizations are registered with :mod:`torch.nn.utils.parametrize`, so the raw tensor
lives at ``module.parametrizations.<name>.original`` and ``module.<name>`` is recomputed on
every access (unless cached).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._checks import check_float, check_int
from .._recompute import active as recompute_active
from .diagnostics import jacobian_spectral_norm

__all__ = [
    "cached_parametrizations",
    "scale_to_contractive",
    "spectral_norm",
    "weight_norm",
]

# Warm-up at registration (sigma accurate from the first call): the exact top singular pair
# by SVD for matrices up to _EXACT_INIT_NUMEL elements; otherwise at least 15 power iterations,
# then more until sigma's relative change is below 1e-7, at most 100.
_EXACT_INIT_NUMEL = 1 << 22
_N_INIT_MIN, _N_INIT_MAX, _INIT_RTOL = 15, 100, 1e-7


def _check_dim(fn: str, dim: Any, name: str, weight: Tensor, ndim: int) -> None:
    """``dim`` (``None`` allowed) must be an axis of ``weight``, one of ``ndim`` axes."""
    check_int(fn, "dim", dim, -ndim, maximum=ndim - 1, none=True,
              example=f"0 (an axis of {name!r}, of shape {tuple(weight.shape)})")


def _check_module_tensor(fn: str, module: object, name: object) -> Tensor:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{fn}: `module` must be an nn.Module, got {type(module).__name__}.")
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"{fn}: `name` must be the attribute name of a tensor of `module`, got {name!r}. "
            "Pass e.g. name='weight'."
        )
    tensor = getattr(module, name, None)
    if not isinstance(tensor, Tensor):
        raise ValueError(
            f"{fn}: `module` ({type(module).__name__}) has no tensor attribute {name!r} "
            f"(got {type(tensor).__name__}). Pass the name of a parameter, e.g. name='weight'."
        )
    return tensor


class _SpectralNormBound(nn.Module):
    """Parametrization ``W -> W * min(1, bound / sigma(W))`` with power-iteration ``sigma``.

    ``_u`` and ``_v`` are the left/right singular-vector estimates of the ``(out, -1)``
    reshaped weight; they are buffers (saved in ``state_dict``) updated in place, without
    gradient, in training mode only.
    """

    def __init__(
        self, weight: Tensor, bound: float, n_power_iterations: int, eps: float, dim: int
    ) -> None:
        super().__init__()
        self.bound = float(bound)
        self.n_power_iterations = int(n_power_iterations)
        self.eps = float(eps)
        self.dim = dim
        with torch.no_grad():
            mat = self._reshape(weight)
            h, w = mat.shape
            u = F.normalize(mat.new_empty(h).normal_(0, 1), dim=0, eps=self.eps)
            v = F.normalize(mat.new_empty(w).normal_(0, 1), dim=0, eps=self.eps)
        self.register_buffer("_u", u)
        self.register_buffer("_v", v)
        # warm start: sigma is accurate from the first call, whatever the mode
        self._warm_up(self._reshape(weight.detach()))

    def _reshape(self, weight: Tensor) -> Tensor:
        if self.dim != 0:
            weight = weight.movedim(self.dim, 0)
        return weight.flatten(1)

    @torch.no_grad()
    def _power_iteration(self, mat: Tensor, n: int) -> None:
        u, v = self._u, self._v
        for _ in range(n):
            u = F.normalize(torch.mv(mat, v), dim=0, eps=self.eps)
            v = F.normalize(torch.mv(mat.t(), u), dim=0, eps=self.eps)
        self._u.copy_(u)
        self._v.copy_(v)

    @torch.no_grad()
    def _warm_up(self, mat: Tensor) -> None:
        if mat.numel() <= _EXACT_INIT_NUMEL and bool(torch.isfinite(mat).all()):
            work = mat if mat.dtype in (torch.float32, torch.float64) else mat.float()
            try:
                u, _, vh = torch.linalg.svd(work, full_matrices=False)
            except RuntimeError:  # e.g. no SVD on this device / failed convergence
                pass
            else:
                self._u.copy_(u[:, 0])
                self._v.copy_(vh[0])
                return
        self._power_iteration(mat, max(_N_INIT_MIN, self.n_power_iterations))
        sigma = float(torch.dot(self._u, torch.mv(mat, self._v)))
        for _ in range(_N_INIT_MAX - max(_N_INIT_MIN, self.n_power_iterations)):
            self._power_iteration(mat, 1)
            new_sigma = float(torch.dot(self._u, torch.mv(mat, self._v)))
            if abs(new_sigma - sigma) <= _INIT_RTOL * abs(new_sigma):
                break
            sigma = new_sigma

    def forward(self, weight: Tensor) -> Tensor:
        mat = self._reshape(weight)
        if self.training and not recompute_active():  # (not when a backward re-evaluates f)
            self._power_iteration(mat.detach(), self.n_power_iterations)
        # clones: the buffers are updated in place by later calls, the graph must not see it
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        sigma = torch.dot(u, torch.mv(mat, v))
        # bound / max(sigma, bound) == min(1, bound / sigma), exactly 1 (zero gradient) when
        # sigma <= bound, and no 0 * inf when sigma == 0.
        factor = self.bound / torch.clamp(sigma, min=self.bound)
        return weight * factor

    def extra_repr(self) -> str:
        return (
            f"bound={self.bound}, n_power_iterations={self.n_power_iterations}, "
            f"dim={self.dim}, eps={self.eps}"
        )


def spectral_norm(
    module: nn.Module,
    name: str = "weight",
    bound: float = 1.0,
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
) -> nn.Module:
    r"""Constrain ``||W||_2 <= bound`` by rescaling ``W`` only when its norm exceeds ``bound``.

    Registers a :mod:`torch.nn.utils.parametrize` parametrization

    .. math:: W \mapsto W \cdot \min\!\left(1, \frac{\text{bound}}{\sigma(W)}\right),

    where :math:`\sigma(W)` is the largest singular value of ``W`` reshaped to ``(out, -1)``,
    estimated by power iteration (Miyato et al. 2018, "Spectral Normalization for Generative
    Adversarial Networks").  Unlike :func:`torch.nn.utils.parametrizations.spectral_norm`,
    which always divides by :math:`\sigma` (forcing norm exactly 1), a weight whose norm is
    already below ``bound`` is returned unchanged -- the usual choice for contractive DEQ
    cells ("bounded" spectral normalisation).

    Power iteration: the singular-vector estimates ``u``, ``v`` are buffers of the
    parametrization module (``module.parametrizations.<name>[k]._u`` / ``._v``, saved in the
    ``state_dict``).  At registration they are initialised accurately, so that :math:`\sigma`
    is right from the first call: to the exact top singular pair (SVD) for weights of up to
    ``2**22`` elements, else by at least 15 power iterations (up to 100, until the estimate
    changes by less than 1e-7 relative).  After that, each call in training mode runs
    ``n_power_iterations`` more (warm-started, so the estimate tracks the weights as they
    train), and in eval mode ``u``, ``v`` are frozen, so every call returns the same weight.
    :math:`\sigma = u^T W v` is differentiated through ``W`` (``u``, ``v`` constant), as in
    PyTorch's implementation.  Since power iteration approaches :math:`\sigma` from below, the
    bound is met up to the accuracy of the estimate.

    Inside a DEQ solver loop wrap the forward in :func:`cached_parametrizations` so the weight
    (and the power iteration) is computed once per forward pass, not once per iteration.

    Convolutions: the kernel of shape ``(out, in, k...)`` is reshaped to ``(out, in * prod k)``
    (``dim`` moved first), as PyTorch does.  This bounds the norm of that *matrix*, **not** the
    Lipschitz constant of the convolution operator, which can be larger (up to about
    ``sqrt(prod k)`` times for stride 1; Gouk et al. 2021, Tsuzuku et al. 2018).  A conv cell
    with a bounded kernel is therefore not guaranteed contractive; check with
    ``lipschitz_upper_bound`` (with ``input_shape=``) or ``jacobian_spectral_norm`` from
    :mod:`deqkit.stability.diagnostics`.

    Args:
        module: the layer (``nn.Linear``, ``nn.Conv*d``, ``nn.ConvTranspose*d``, ...).
        name: name of the weight tensor (default ``"weight"``); must have at least 2 dims.
        bound: the norm bound, ``> 0`` (default ``1.0``; use e.g. ``0.9`` for a margin).
        n_power_iterations: power iterations per training-mode call, ``>= 1`` (default ``1``).
        eps: ``> 0``, added for numerical stability when normalising ``u``, ``v``
            (default ``1e-12``).
        dim: the output dimension moved first before flattening (default ``None``: ``1`` for
            ``ConvTranspose*d``, whose weight is ``(in, out, k...)``, else ``0``).

    Returns:
        ``module`` itself, with the parametrization registered.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: bad ``name``, ``bound``, ``n_power_iterations``, ``eps`` or ``dim``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> lin = spectral_norm(nn.Linear(4, 4), bound=0.5)
        >>> with torch.no_grad():
        ...     _ = lin.parametrizations.weight.original.mul_(10.0)
        >>> bool(torch.linalg.matrix_norm(lin.weight, ord=2) <= 0.5 + 1e-4)
        True
    """
    fn = "spectral_norm"
    weight = _check_module_tensor(fn, module, name)
    check_float(fn, "bound", bound, gt=0, example="0.9 (a contractive layer)")
    check_int(fn, "n_power_iterations", n_power_iterations, example=1)
    check_float(fn, "eps", eps, gt=0, example="1e-12")
    if weight.ndim < 2:
        raise ValueError(
            f"{fn}: tensor {name!r} must have at least 2 dimensions to have a spectral norm, "
            f"got shape {tuple(weight.shape)}. Pass the name of a weight matrix or kernel."
        )
    if dim is None:
        dim = (
            1
            if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
            else 0
        )
    _check_dim(fn, dim, name, weight, weight.ndim)
    dim = dim % weight.ndim
    parametrize.register_parametrization(
        module, name, _SpectralNormBound(weight, bound, n_power_iterations, eps, dim)
    )
    return module


def weight_norm(module: nn.Module, name: str = "weight", dim: int | None = 0) -> nn.Module:
    r"""Weight normalisation ``W = g * V / ||V||`` (Salimans & Kingma 2016).

    A thin, validated wrapper over :func:`torch.nn.utils.parametrizations.weight_norm`: the
    weight is split into a magnitude ``g`` (``original0``) and a direction ``V``
    (``original1``), both trained.  ``||V||`` is taken over every dimension except ``dim``
    (one norm per output row for ``dim=0``); ``dim=None`` uses one norm for the whole tensor.
    Used by the original DEQ models (Bai, Kolter, Koltun 2019, "Deep Equilibrium Models") to
    stabilise training; it does not by itself bound ``||W||_2``.  Combine with
    :func:`cached_parametrizations` inside solver loops.

    Args:
        module: the layer holding the tensor.
        name: name of the tensor (default ``"weight"``).
        dim: the dimension kept by the norm (default ``0``), or ``None``.

    Returns:
        ``module`` itself, with the parametrization registered.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: bad ``name`` or ``dim``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> lin = weight_norm(nn.Linear(3, 2))
        >>> tuple(lin.parametrizations.weight.original0.shape)
        (2, 1)
    """
    fn = "weight_norm"
    weight = _check_module_tensor(fn, module, name)
    _check_dim(fn, dim, name, weight, max(weight.ndim, 1))
    return torch.nn.utils.parametrizations.weight_norm(module, name=name, dim=dim)


@contextlib.contextmanager
def cached_parametrizations(module: nn.Module) -> Iterator[nn.Module]:
    """Compute every parametrized tensor of ``module`` once, now, and reuse it in the context.

    Enters :func:`torch.nn.utils.parametrize.cached` and immediately evaluates ("warms")
    every parametrized tensor of every submodule of ``module`` **in the current grad mode**.
    Inside the context each access returns that cached tensor, so the parametrization (e.g.
    the power iteration of :func:`spectral_norm`) runs exactly once, even when later
    accesses happen under ``torch.no_grad()`` -- the usual situation in a DEQ forward pass,
    where the solver calls the cell 20-50 times without grad and then once with grad.
    Because the warm-up ran with grad enabled, the cached weight keeps its autograd graph to
    the raw parameters, and a loss computed from a grad-enabled cell call inside the context
    back-propagates to them.

    Notes:
        * Enter the context with grad enabled when you need gradients; entered under
          ``no_grad`` the cached tensors have no graph.
        * The cached tensors share one graph: back-propagating two separate losses through
          them needs ``retain_graph=True`` on the first ``backward`` (or call ``backward``
          after leaving the context and re-entering for the next step).
        * Training-mode spectral normalisation advances its power iteration once per context,
          i.e. once per DEQ forward pass.
        * Nested uses are fine; the cache is cleared when the outermost context exits.

    Args:
        module: the model (its parametrized submodules are found recursively).

    Yields:
        ``module``.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> cell = spectral_norm(nn.Linear(4, 4), bound=0.9)
        >>> z = torch.zeros(2, 4)
        >>> with cached_parametrizations(cell):
        ...     with torch.no_grad():
        ...         for _ in range(20):
        ...             z = torch.tanh(cell(z) + 1.0)
        ...     out = torch.tanh(cell(z) + 1.0)  # with grad, same cached weight
        >>> out.requires_grad
        True
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"cached_parametrizations: `module` must be an nn.Module, got {type(module).__name__}."
        )
    with parametrize.cached():
        for sub in module.modules():
            if parametrize.is_parametrized(sub):
                for tensor_name in sub.parametrizations:
                    getattr(sub, tensor_name)
        yield module


def parametrization_cache(cell: object) -> contextlib.AbstractContextManager:
    """:func:`cached_parametrizations` for a cell module with parametrized submodules (spectral
    or weight norm computed once per solve); a no-op context for anything else."""
    if isinstance(cell, nn.Module) and any(
        parametrize.is_parametrized(m) for m in cell.modules()
    ):
        return cached_parametrizations(cell)
    return contextlib.nullcontext()


def scale_to_contractive(
    f: Callable[[Tensor], Tensor],
    z: Tensor,
    params: Iterable[Tensor],
    target: float = 0.9,
    n_iter: int = 50,
    *,
    max_rounds: int = 10,
    generator: torch.Generator | None = None,
) -> float:
    r"""Careful initialisation: rescale parameters until ``||J_f(z)||_2 < target``.

    Estimates :math:`s = \max_b \|J_f(z_b)\|_2` with
    :func:`deqkit.jacobian_spectral_norm`; while ``s >= target`` multiplies every
    tensor of ``params`` in place (under ``no_grad``) by the common factor
    ``c = 0.98 * target / s`` and re-estimates.  For a cell ``f = phi(W z + U x)`` with
    1-Lipschitz ``phi`` and ``params = [W]``, the Jacobian ``diag(phi') W`` scales by about
    ``c`` (exactly for linear ``phi``), so one round usually suffices; the loop (at most
    ``max_rounds`` rounds) covers nonlinear cells, whose ``phi'`` changes with ``W``.  The 2%
    margin absorbs the power-iteration estimate approaching the norm from below.

    Typical use, after constructing a DEQ and before training::

        scale_to_contractive(lambda z: cell(z, x), z0, [cell.linear_z.weight], target=0.9)

    Pass the raw tensor of a parametrized weight (``module.parametrizations.weight.original``);
    rescaling the raw weight of a :func:`spectral_norm` layer that is already at its bound has
    no effect (then this raises).

    Args:
        f: the cell as a function of ``z`` only (closing over inputs and parameters), mapping
            ``(B, ...)`` to the same shape.
        z: the point where the Jacobian is measured, e.g. the solver's initial guess or a
            first equilibrium estimate, shape ``(B, ...)``.
        params: iterable of tensors to scale (usually the ``z``-to-``z`` weight matrices).
        target: the norm to get below, ``> 0`` (default ``0.9``).
        n_iter: power iterations per estimate (default ``50``).
        max_rounds: maximum number of rescaling rounds, ``>= 1`` (default ``10``).
        generator: optional ``torch.Generator`` for the power iteration.

    Returns:
        The final estimate ``s < target`` (a float).  Nothing is changed if the first
        estimate is already below ``target``.

    Raises:
        TypeError: ``params`` contains a non-tensor.
        ValueError: bad ``target``, ``n_iter``, ``max_rounds`` or empty ``params`` (and the
            errors of ``jacobian_spectral_norm`` for bad ``f``/``z``).
        RuntimeError: the estimate did not get below ``target`` within ``max_rounds``
            (``params`` do not control the Jacobian of ``f``).

    Reference: Banach's fixed-point theorem (a map with Lipschitz constant < 1 has a unique
        fixed point reached by iteration); the small-init recipe for stable DEQs in Bai, Koltun,
        Kolter (2021), "Stabilizing Equilibrium Models by Jacobian Regularization".

    Example:
        >>> import torch
        >>> W = torch.randn(8, 8) * 2.0
        >>> s = scale_to_contractive(lambda z: torch.tanh(z @ W.T), torch.zeros(3, 8), [W])
        >>> s < 0.9
        True
    """
    fn = "scale_to_contractive"
    check_float(fn, "target", target, gt=0, example=0.9)
    check_int(fn, "n_iter", n_iter, example=50)
    check_int(fn, "max_rounds", max_rounds, example=10)
    if isinstance(params, Tensor):
        params = [params]
    params = list(params)
    if not params:
        raise ValueError(
            f"{fn}: `params` is empty. Pass the tensors to rescale, e.g. [cell.weight]."
        )
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(
                f"{fn}: `params` must contain only tensors, got {type(p).__name__}. "
                "Pass e.g. [cell.weight] (for a parametrized weight, its `.original`)."
            )
    estimate = float(jacobian_spectral_norm(f, z, n_iter=n_iter, generator=generator).max())
    rounds = 0
    while estimate >= target:
        if rounds == max_rounds:
            raise RuntimeError(
                f"{fn}: the Jacobian norm estimate is still {estimate:.4g} >= target={target} "
                f"after {max_rounds} rescaling rounds. Check that `params` are the tensors that "
                "map z to f(z) (for a spectral_norm layer pass "
                "module.parametrizations.weight.original, or lower its `bound`), or raise "
                "`max_rounds`."
            )
        factor = 0.98 * target / estimate
        with torch.no_grad():
            for p in params:
                p.mul_(factor)
        estimate = float(jacobian_spectral_norm(f, z, n_iter=n_iter, generator=generator).max())
        rounds += 1
    return estimate
