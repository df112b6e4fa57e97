"""``minimise``: differentiable batched optimisation layers ``z* = argmin_z E(z)``, through
the optimality condition ``grad_z E(z*) = 0`` and :func:`deqkit.root_find`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._flatten import State
from ._root_find import root_find
from ._solution import Solution
from .adjoint._base import AbstractAdjoint
from .solvers._base import AbstractFixedPointSolver
from .solvers.fallback import FallbackChain


def minimise(
    E: Callable[..., Tensor],
    z0: State,
    solver: AbstractFixedPointSolver | FallbackChain | str | None = None,
    adjoint: AbstractAdjoint | None = None,
    max_steps: int = 50,
    *,
    args: tuple[Any, ...] = (),
    throw: bool = True,
    **fixed_point_kwargs: Any,
) -> Solution:
    r"""Optimisation layer :math:`z^\star = \arg\min_z E(z, \theta)` for a batch of independent
    problems, differentiated through the optimality condition.

    The minimiser is found as a root of :math:`F(z) = -\nabla_z E(z)` with
    :func:`~deqkit.root_find`, i.e. as a fixed point of the unit-step gradient-descent map
    :math:`f(z) = z - \nabla_z E(z)`; the gradient :math:`\nabla_z E` is ``torch.func.grad`` of
    the summed energy (the samples are independent, so the gradient of the sum is the
    per-sample gradient). The sign makes every solver sensible: Newton is unaffected by it, and
    Broyden's initial Jacobian guess :math:`J_F \approx -I` then matches :math:`J_F = -H`
    (with :math:`+\nabla E` its first step would be gradient *ascent*). With the defaults this is
    Newton's method with Hessian-vector products (forward-over-reverse ``torch.func.jvp`` of
    ``torch.func.grad``) and an inner GMRES, and the backward pass is the
    implicit-function-theorem gradient of the stationarity condition
    :math:`\nabla_z E(z^\star, \theta) = 0`:

    .. math::
        \frac{\mathrm d z^\star}{\mathrm d\theta}
        = -H(z^\star)^{-1} \frac{\partial^2 E}{\partial z\,\partial\theta},
        \qquad H = \nabla_z^2 E,

    computed by solving :math:`H u = \bar z` (:math:`I - J_f = H`) with GMRES and
    Hessian-vector products (double backward through one evaluation of :math:`\nabla_z E` at
    :math:`z^\star`), then ordinary autograd into the parameters and inputs E closes over (and
    tensors in ``args``). Only E's value is needed; no Hessian is formed.

    Assumptions: E is twice differentiable in z (and differentiable in the parameters), and
    the Hessian at :math:`z^\star` is invertible. When E is strongly convex in z the minimiser
    is unique, the Hessian is positive definite and Newton with the line search converges from
    any start. For a merely convex E the minimiser may not be unique (and the Hessian may be
    singular, making the gradient ill-posed); for a non-convex E the solve returns *a
    stationary point* (Newton does not tell minima from saddles or maxima; the line search
    decreases :math:`\|\nabla E\|^2`, not E), which depends on ``z0``.

    Stopping: sample b stops when
    :math:`\|\nabla E(z_b)\| \le \text{atol} + \text{rtol}\,\|z_b - \nabla E(z_b)\|`
    (tolerances on the solver, see :func:`~deqkit.root_find`); near the minimiser the right-hand
    side is :math:`\approx \text{atol} + \text{rtol}\,\|z^\star\|`.

    Args:
        E: the energy, called as ``E(z, *args)`` with ``z`` shaped like ``z0`` (a tensor or a
            tuple of tensors, leading batch dimension B); must return per-sample energies of
            shape ``(B,)`` (``ValueError`` otherwise; ``B`` is the working batch, which can
            shrink when ``args`` lets the driver drop converged samples). Samples must be
            independent. Every op must support ``torch.func`` transforms (and forward-mode AD
            over them for the default Newton solver; ``dk.Broyden()`` avoids forward mode).
        z0: initial guess; a tensor or tuple of tensors with leading batch dimension.
        solver: default ``dk.NewtonKrylov()`` (Newton with Hessian-vector products, quadratic
            local convergence). ``dk.Broyden()`` (quasi-Newton, no forward-mode AD) starts
            from the Hessian guess I, so it suits Hessians scaled near I (on a ridge problem with
            Hessian eigenvalues up to ~300 it diverged; rescale E or use Newton).
            ``dk.Picard()`` is gradient descent with unit step and ``dk.Anderson()`` its
            acceleration: they converge only when :math:`z - \nabla E(z)` is contractive
            (Hessian eigenvalues in (0, 2)); rescale E otherwise.
        adjoint: default ``dk.ImplicitAdjoint(dk.GMRES())``.
        max_steps: maximum number of solver updates. Default: 50.
        args: per-sample tensors passed to E after ``z`` (leading batch dimension B).
        throw: raise :class:`~deqkit.SolverError` when some sample fails. Default: True.
        **fixed_point_kwargs: passed to :func:`~deqkit.fixed_point`.

    Returns:
        A :class:`~deqkit.Solution`; ``stats["abs_residual"]`` is :math:`\|\nabla E(z^\star)\|`
        and ``sol.backward`` holds the statistics of the Hessian solve.

    Raises:
        SolverError: with ``throw=True`` when some sample did not converge.
        ValueError: when E does not return shape ``(B,)``, and on invalid arguments.

    References: Amos & Kolter (2017), "OptNet: Differentiable Optimization as a Layer in Neural
        Networks"; Blondel et al. (2022), "Efficient and Modular Implicit Differentiation"
        (differentiating the optimality condition grad E(z*) = 0 with Hessian-vector products).

    Example (ridge regression per sample, :math:`z^\star = (A^\top A + \lambda I)^{-1} A^\top y`):

        >>> import torch, deqkit as dk
        >>> A = torch.randn(5, 3, dtype=torch.float64)
        >>> y = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        >>> E = lambda z: ((z @ A.T - y) ** 2).sum(1) + 0.1 * (z ** 2).sum(1)
        >>> sol = dk.minimise(E, torch.zeros(4, 3, dtype=torch.float64),
        ...                   solver=dk.NewtonKrylov(rtol=1e-12, atol=0))
        >>> ref = torch.linalg.solve(A.T @ A + 0.1 * torch.eye(3, dtype=torch.float64),
        ...                          (y @ A).T).T
        >>> torch.allclose(sol.value, ref)
        True
        >>> sol.value.sum().backward()  # implicit gradient w.r.t. y
        >>> y.grad.shape
        torch.Size([4, 5])
    """
    if not callable(E):
        raise TypeError(f"`E` must be callable, got {type(E).__name__}.")

    def total_energy(z: State, *a: Any) -> Tensor:
        e = E(z, *a)
        batch = (z[0] if isinstance(z, (tuple, list)) else z).shape[0]
        if not isinstance(e, Tensor) or tuple(e.shape) != (batch,):
            got = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
            raise ValueError(
                f"`E` must return per-sample energies of shape (B,) = ({batch},) (one scalar "
                f"per sample, e.g. `.sum(dim=1)` over the features), got {got}."
            )
        return e.sum()

    grad_e = torch.func.grad(total_energy, argnums=0)

    def F(z: State, *a: Any) -> State:  # -grad E: f(z) = z + F(z) is a gradient-descent step
        g = grad_e(z, *a)
        if isinstance(g, tuple):
            return tuple(-gi for gi in g)
        return -g

    F.__wrapped__ = E  # type: ignore[attr-defined]  # the batch-independence check's key
    return root_find(
        F, z0, solver, adjoint, max_steps, args=args, throw=throw, **fixed_point_kwargs
    )
