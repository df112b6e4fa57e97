"""``root_find``: differentiable batched roots of ``F(z) = 0``, as a thin layer over
:func:`deqkit.fixed_point`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from ._fixed_point import fixed_point
from ._flatten import State
from ._solution import Solution
from .adjoint._base import AbstractAdjoint
from .adjoint.implicit import ImplicitAdjoint
from .linear import GMRES
from .solvers._base import AbstractFixedPointSolver
from .solvers.fallback import FallbackChain
from .solvers.newton_krylov import NewtonKrylov


def _shape_of(x: Any) -> Any:
    if isinstance(x, Tensor):
        return tuple(x.shape)
    if isinstance(x, (tuple, list)):
        return tuple(_shape_of(p) for p in x)
    return type(x).__name__


def _check_residual(z: State, r: Any) -> None:
    """``F(z)`` must have exactly the structure and shapes of ``z`` (it lives in z's space)."""
    if isinstance(z, (tuple, list)):
        ok = (
            isinstance(r, (tuple, list))
            and len(r) == len(z)
            and all(isinstance(ri, Tensor) and ri.shape == zi.shape for zi, ri in zip(z, r))
        )
    else:
        ok = isinstance(r, Tensor) and r.shape == z.shape
    if not ok:
        raise ValueError(
            f"`F` must return a residual with the same structure and shape as `z` "
            f"(F maps z to the same space, so that z + F(z) is defined elementwise); "
            f"got {_shape_of(r)} for z of shape {_shape_of(z)}."
        )


def root_find(
    F: Callable[..., State],
    z0: State,
    solver: AbstractFixedPointSolver | FallbackChain | str | None = None,
    adjoint: AbstractAdjoint | None = None,
    max_steps: int = 50,
    *,
    args: tuple[Any, ...] = (),
    throw: bool = True,
    **fixed_point_kwargs: Any,
) -> Solution:
    r"""Find :math:`z^\star` with :math:`F(z^\star) = 0` for a batch of independent problems,
    differentiably.

    This is :func:`~deqkit.fixed_point` applied to :math:`f(z) = z + F(z)`, whose fixed points
    are exactly the roots of F. The solvers iterate on :math:`g(z) = f(z) - z = F(z)`, so
    :class:`~deqkit.NewtonKrylov` is Newton's method on F (each step solves
    :math:`J_F(z_k)\,\delta_k = -F(z_k)` with Jacobian-vector products of F) and
    :class:`~deqkit.Broyden` is Broyden's method on F. The implicit adjoint on f solves
    :math:`(I - J_f^\top) u = \bar z` with :math:`I - J_f = -J_F`, which is the
    implicit-function-theorem gradient of the root:

    .. math::
        \frac{\mathrm d z^\star}{\mathrm d\theta}
        = -J_F(z^\star)^{-1} \frac{\partial F(z^\star, \theta)}{\partial \theta},
        \qquad
        \frac{\partial \ell}{\partial \theta}
        = -\bar z^\top J_F(z^\star)^{-1} \frac{\partial F}{\partial \theta}.

    It is well posed when :math:`J_F(z^\star)` is invertible (a simple root). The forward solve
    builds no autograd graph; the backward costs one evaluation of F at :math:`z^\star` plus
    a linear solve with vector-Jacobian products of it.

    Stopping is per sample, inherited from ``fixed_point``: sample b stops when
    :math:`\|F(z_b)\| \le \text{atol} + \text{rtol}\, s_b` (tolerances on the solver), where
    the scale :math:`s_b` is :math:`\|z_b + F(z_b)\|` (:math:`\approx \|z^\star\|` near the
    root, not :math:`\|F\|`) capped by the sample's starting size
    :math:`\max(\|z_0\|, \|z_0 + F(z_0)\|)` times how much :math:`\|F\|` has shrunk since
    (see :func:`~deqkit.fixed_point`): an iterate running off towards infinity where
    :math:`F` does not vanish (``tanh(z) + 2``) is never counted as a root, and is reported
    ``diverged``. Use ``atol`` alone when the root may be near 0.

    Picard and Anderson iterate :math:`z \leftarrow z + F(z)` (Anderson extrapolates those
    iterates): they work only when :math:`z \mapsto z + F(z)` is contractive near the root
    (e.g. :math:`F(z) = -\alpha\,\nabla E(z)` with a small step α). Likewise a
    ``Neumann`` backward solve needs :math:`I + J_F` to be contractive; prefer GMRES.

    Args:
        F: the residual map, called as ``F(z, *args)`` with ``z`` shaped like ``z0`` (a tensor
            or a tuple of tensors, leading batch dimension B); must return the same structure
            and shapes (``ValueError`` otherwise). Samples must be independent. Gradients flow
            to everything F closes over (parameters, inputs) and to tensors in ``args``.
        z0: initial guess; a tensor or tuple of tensors with leading batch dimension.
        solver: a fixed-point solver acting on ``z + F(z)``; default ``dk.NewtonKrylov()``
            (every op in F must then support forward-mode AD). ``dk.Broyden()`` needs no
            JVPs. Strings and :class:`~deqkit.FallbackChain` are accepted as in
            ``fixed_point``.
        adjoint: how gradients flow through :math:`z^\star`; default
            ``dk.ImplicitAdjoint(dk.GMRES())`` (the implicit-function-theorem gradient above).
        max_steps: maximum number of solver updates (Newton steps for NewtonKrylov).
            Default: 50.
        args: per-sample tensors passed to F after ``z`` (leading batch dimension B); lets the
            driver drop converged samples from the working batch.
        throw: raise :class:`~deqkit.SolverError` when some sample fails. Default: True.
        **fixed_point_kwargs: passed to :func:`~deqkit.fixed_point` (``trace``, ``compact``,
            ``compact_ratio``, ``divergence_ratio``, ``patience``).

    Returns:
        A :class:`~deqkit.Solution`; ``stats["abs_residual"]`` is :math:`\|F(z^\star)\|` and
        ``stats["rel_residual"]`` is :math:`\|F\| / \|z^\star + F(z^\star)\|`.

    Raises:
        SolverError: with ``throw=True`` when some sample did not converge.
        ValueError: when F does not return the structure/shape of ``z``, and on invalid
            arguments (as ``fixed_point``).

    References: Blondel et al. (2022), "Efficient and Modular Implicit Differentiation"
        (implicit function theorem for F(z*, theta) = 0); Knoll & Keyes (2004), "Jacobian-free
        Newton-Krylov methods: a survey of approaches and applications"; C. G. Broyden (1965),
        "A class of methods for solving nonlinear simultaneous equations".

    Example (square roots by Newton's method, with the gradient
    :math:`\mathrm d\sqrt a/\mathrm d a = 1/(2\sqrt a)`):

        >>> import torch, deqkit as dk
        >>> a = torch.tensor([[2.0], [9.0]], dtype=torch.float64, requires_grad=True)
        >>> sol = dk.root_find(lambda z: z * z - a, torch.ones(2, 1, dtype=torch.float64),
        ...                    solver=dk.NewtonKrylov(rtol=1e-14, atol=0))
        >>> sol.value.squeeze(1).tolist()  # doctest: +ELLIPSIS
        [1.414213562373..., 3.0]
        >>> int(sol.stats["nstep"].max()) <= 7
        True
        >>> sol.value.sum().backward()
        >>> torch.allclose(a.grad, 0.5 / a.detach().sqrt())
        True
    """
    if not callable(F):
        raise TypeError(f"`F` must be callable, got {type(F).__name__}.")
    if solver is None:
        solver = NewtonKrylov()
    if adjoint is None:
        adjoint = ImplicitAdjoint(GMRES())
    is_tuple = isinstance(z0, (tuple, list))

    def f(z: State, *a: Any) -> State:
        r = F(z, *a)
        _check_residual(z, r)
        if is_tuple:
            return tuple(zi + ri for zi, ri in zip(z, r))
        return z + r

    f.__wrapped__ = F  # type: ignore[attr-defined]  # the batch-independence check's key
    return fixed_point(
        f, z0, solver, adjoint, max_steps, args=args, throw=throw, **fixed_point_kwargs
    )
