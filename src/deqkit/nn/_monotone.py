r"""Monotone operator equilibrium networks (monDEQ).

The layer :math:`z = \mathrm{ReLU}(W z + U x + b)` has a unique equilibrium for every input
whenever :math:`I - W` is strongly monotone, i.e. :math:`\tfrac12\big((I-W) + (I-W)^\top\big)
\succeq m I` for some :math:`m > 0` — however large :math:`\|W\|` is. The equilibrium is the zero
of the monotone inclusion :math:`0 \in (I - W) z - (U x + b) + \partial I_{\mathbb R_+^n}(z)`,
found by an operator splitting method.

Reference: Winston & Kolter, "Monotone operator equilibrium networks", NeurIPS 2020.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_float, check_int, check_tolerances
from ..adjoint._base import AbstractAdjoint
from ..solvers._base import AbstractFixedPointSolver
from ..solvers.picard import Picard
from ._deq import DEQ


class MonotoneLinear(nn.Module):
    r"""A square linear map :math:`W` with :math:`I - W` strongly monotone by construction.

    .. math::
        W = (1 - m) I - A^\top A + B - B^\top,
        \qquad I - W = m I + A^\top A - (B - B^\top),

    so the symmetric part of :math:`I - W` is :math:`m I + A^\top A \succeq m I` (the skew part
    :math:`B - B^\top` does not contribute to it). :math:`\|W\|` itself is unconstrained.

    Args:
        width: the dimension :math:`n` of the state (``A`` and ``B`` are ``n x n``).
        m: the monotonicity parameter :math:`m > 0`. Default: 0.05.

    Reference: Winston & Kolter (2020), "Monotone operator equilibrium networks", NeurIPS (the
        parametrisation W = (1 - m) I - A^T A + B - B^T, section 3).

    Example:
        >>> import torch
        >>> lin = MonotoneLinear(3, m=0.1).double()
        >>> S = torch.eye(3, dtype=torch.float64) - lin.weight()
        >>> bool(torch.linalg.eigvalsh(0.5 * (S + S.T)).min() >= 0.1 - 1e-12)
        True
    """

    def __init__(self, width: int, m: float = 0.05) -> None:
        super().__init__()
        self.width = check_int("MonotoneLinear", "width", width)
        self.m = check_float("MonotoneLinear", "m", m, gt=0)
        scale = 1.0 / math.sqrt(width)
        self.A = nn.Parameter(scale * torch.randn(width, width))
        self.B = nn.Parameter(scale * torch.randn(width, width))

    def weight(self) -> Tensor:
        r"""The dense matrix :math:`W = (1 - m) I - A^\top A + B - B^\top`."""
        eye = torch.eye(self.width, dtype=self.A.dtype, device=self.A.device)
        return (1.0 - self.m) * eye - self.A.T @ self.A + self.B - self.B.T

    def forward(self, z: Tensor) -> Tensor:
        r""":math:`z W^\top` for a batch ``z`` of shape ``(..., width)``."""
        return z @ self.weight().T

    def factorise(self, alpha: float, weight: Tensor | None = None) -> Callable[[Tensor], Tensor]:
        r"""LU-factorise :math:`I + \alpha (I - W)` once and return its (batched) inverse.

        The returned callable maps ``v`` of shape ``(B, width)`` to
        :math:`(I + \alpha(I - W))^{-1} v` row by row; it is differentiable in the parameters
        when called with grad enabled. Call this once per forward pass (the factors belong to
        the current parameters).

        Args:
            alpha: the step size :math:`\alpha > 0`.
            weight: a precomputed :meth:`weight` (optional, to share its graph).
        """
        alpha = check_float("MonotoneLinear.factorise", "alpha", alpha, gt=0)
        W = self.weight() if weight is None else weight
        eye = torch.eye(self.width, dtype=W.dtype, device=W.device)
        LU, piv = torch.linalg.lu_factor((1.0 + alpha) * eye - alpha * W)

        def solve(v: Tensor) -> Tensor:
            return torch.linalg.lu_solve(LU, piv, v.mT).mT

        return solve

    def resolvent(self, v: Tensor, alpha: float) -> Tensor:
        r""":math:`(I + \alpha (I - W))^{-1} v` per row (factorises afresh; for repeated use
        keep the callable returned by :meth:`factorise`)."""
        return self.factorise(alpha)(v)

    def extra_repr(self) -> str:
        return f"width={self.width}, m={self.m}"


@dataclasses.dataclass(frozen=True)
class ForwardBackward:
    r"""Forward-backward (projected gradient) splitting for :math:`z = \mathrm{ReLU}(Wz + Ux + b)`.

    .. math::
        z_{k+1} = \mathrm{ReLU}\big(z_k - \alpha\,((I - W) z_k - (U x + b))\big).

    The map is a contraction for :math:`0 < \alpha < 2m / L^2` with :math:`L = \|I - W\|_2`;
    its fixed points are exactly the equilibria (for any :math:`\alpha > 0`). With
    ``alpha="auto"`` the step is :math:`\alpha = m / L^2`, :math:`L` computed from the current
    weights at every forward call (an exact spectral norm, detached).

    Args:
        alpha: step size :math:`\alpha > 0` or ``"auto"``. Default: 1.0 (converges only when
            :math:`1 \le 2m/L^2`; prefer ``"auto"`` or :class:`PeacemanRachford` otherwise).
        rtol: relative tolerance of the default solver. Default: 1e-6.
        atol: absolute tolerance of the default solver. Default: 1e-8.

    Reference: Winston & Kolter (2020), "Monotone operator equilibrium networks", NeurIPS
        (forward-backward splitting, section 4); Ryu & Boyd (2016), "A primer on monotone
        operator methods".

    Example:
        >>> import torch, deqkit as dk
        >>> from deqkit.nn import ForwardBackward, MonotoneDEQ
        >>> _ = torch.manual_seed(0)
        >>> layer = MonotoneDEQ(3, 5, m=0.5, splitting=ForwardBackward(alpha="auto"),
        ...                     solver=dk.Anderson())  # Anderson-accelerated splitting
        >>> z = layer(torch.randn(2, 3))
        >>> z.shape, bool((z >= 0).all()), layer.last_solution.result
        (torch.Size([2, 5]), True, <RESULTS.successful: 0>)
    """

    alpha: float | str = 1.0
    rtol: float = 1e-6
    atol: float = 1e-8

    def __post_init__(self) -> None:
        if self.alpha != "auto":
            check_float("ForwardBackward", "alpha", self.alpha, gt=0,
                        example="'auto' (from the monotonicity bound) or 0.5")
        check_tolerances("ForwardBackward", self.rtol, self.atol, both_zero=True)


@dataclasses.dataclass(frozen=True)
class PeacemanRachford:
    r"""Peaceman-Rachford splitting for :math:`z = \mathrm{ReLU}(Wz + Ux + b)`, iterated on u.

    .. math::
        \begin{aligned}
        z_k &= \mathrm{ReLU}(u_k), \qquad u_{1/2} = 2 z_k - u_k,\\
        z_{1/2} &= (I + \alpha (I - W))^{-1} \big(u_{1/2} + \alpha (U x + b)\big),\\
        u_{k+1} &= 2 z_{1/2} - u_{1/2}.
        \end{aligned}

    This is :math:`u_{k+1} = C_F C_G u_k`, the composition of the reflected resolvents
    (Cayley operators) of :math:`F(z) = (I-W)z - (Ux+b)` and of the normal cone of
    :math:`\mathbb R_+^n`; :math:`C_F` is a strict contraction when :math:`I - W` is strongly
    monotone, so the iteration converges for **every** :math:`\alpha > 0`, and
    :math:`u^\star` is a fixed point iff :math:`z^\star = \mathrm{ReLU}(u^\star)` is the
    equilibrium. One dense LU factorisation per forward call serves all iterations.

    Args:
        alpha: step size :math:`\alpha > 0`. Default: 1.0.
        rtol: relative tolerance of the default solver (on u). Default: 1e-6.
        atol: absolute tolerance of the default solver (on u). Default: 1e-8.

    Reference: Winston & Kolter (2020), "Monotone operator equilibrium networks", NeurIPS
        (Peaceman-Rachford splitting, section 4); Peaceman & Rachford (1955).

    Example:
        >>> import torch
        >>> from deqkit.nn import ForwardBackward, MonotoneDEQ, PeacemanRachford
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(2, 3)
        >>> pr = MonotoneDEQ(3, 5, m=0.5, splitting=PeacemanRachford(alpha=1.0))
        >>> fb = MonotoneDEQ(3, 5, m=0.5, splitting=ForwardBackward(alpha="auto"))
        >>> fb.load_state_dict(pr.state_dict())
        <All keys matched successfully>
        >>> torch.allclose(pr(x), fb(x), atol=1e-4)  # the same equilibrium
        True
    """

    alpha: float = 1.0
    rtol: float = 1e-6
    atol: float = 1e-8

    def __post_init__(self) -> None:
        check_float("PeacemanRachford", "alpha", self.alpha, gt=0)
        check_tolerances("PeacemanRachford", self.rtol, self.atol, both_zero=True)


class _SplittingStep(nn.Module):
    r"""The cell of a :class:`MonotoneDEQ`: one step :math:`T_\theta(z, c)` of its splitting.

    ``T`` (built once per forward call from the current weights, see
    :meth:`MonotoneDEQ.splitting_map`) is passed as an input next to the injection ``c``, so the
    cell holds no parameters of its own (the layer's ``state_dict`` keys are ``U.*`` and
    ``linear.*``) and the per-call LU factorisation is shared by all iterations.
    """

    def forward(self, z: Tensor, c: Tensor, T: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        return T(z, c)


class MonotoneDEQ(DEQ):
    r"""Monotone operator equilibrium layer: :math:`z^\star = \mathrm{ReLU}(W z^\star + U x + b)`.

    :math:`W` is a :class:`MonotoneLinear` (so :math:`I - W \succeq m I` and the equilibrium
    exists and is unique for every :math:`x`, with no bound on :math:`\|W\|`), and
    :math:`U x + b` an ``nn.Linear``. The ``splitting`` (:class:`ForwardBackward` or
    :class:`PeacemanRachford`) defines a fixed-point map :math:`T_\theta` — on :math:`z` for
    forward-backward, on :math:`u` with :math:`z = \mathrm{ReLU}(u)` for Peaceman-Rachford —
    which is solved as a :class:`~deqkit.nn.DEQ` ``(z, c) -> T(z, c)``; ``solver`` accelerates
    it (plain ``Picard`` runs the splitting itself; ``Anderson`` extrapolates it), so stopping,
    statistics, per-sample batch compaction, adjoints, ``eval_max_steps``, warm starts
    (:meth:`~deqkit.nn.DEQ.warm_start`) and :meth:`~deqkit.nn.DEQ.overrides` come from
    :class:`~deqkit.nn.DEQ`.

    Gradients: the fixed point of :math:`T_\theta` is the equilibrium (through
    :math:`\mathrm{ReLU}(u^\star)` for PR) for *every* :math:`\theta`, so wherever
    :math:`z^\star(\theta)` is differentiable (no pre-activation exactly at 0) the implicit
    gradient of :math:`T_\theta`'s fixed point, :math:`(I - \partial_z T)^{-1}\partial_\theta T`,
    is the exact gradient of the equilibrium, :math:`(I - DW)^{-1} D\,\partial_\theta(Wz+Ux+b)`
    with :math:`D = \mathrm{diag}(\mathbb 1[Wz^\star + Ux + b > 0])`. :math:`I - \partial T` is
    invertible because :math:`T` is a contraction (FB with :math:`\alpha < 2m/L^2`; PR always).

    Args:
        in_features: input dimension.
        width: state dimension :math:`n`.
        m: monotonicity parameter :math:`m > 0`. Default: 0.05.
        splitting: :class:`ForwardBackward` or :class:`PeacemanRachford`.
            Default: ``PeacemanRachford()``.
        solver: fixed-point solver. Default: ``Picard`` with the splitting's ``rtol``/``atol``
            (the plain splitting); a given solver uses its own tolerances.
        adjoint: gradient through the fixed point. Default: ``ImplicitAdjoint()``.
        max_steps: iteration budget in training mode. Default: 100.
        throw: raise :class:`~deqkit.SolverError` when a solve fails. Default: False (read
            ``last_solution``; non-finite or diverged solves warn with ``DEQWarning``).
        eval_max_steps: iteration budget in eval mode. Default: ``max_steps``.
        **kwargs: further keyword arguments of :class:`~deqkit.nn.DEQ` (``compact``,
            ``trace``, ``patience``, ...).

    Attributes:
        last_solution: the :class:`~deqkit.Solution` of the latest forward (its ``value`` is
            :math:`z` for FB and :math:`u` for PR).

    Reference: Winston & Kolter, "Monotone operator equilibrium networks", NeurIPS 2020.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> layer = MonotoneDEQ(3, 5, m=0.5)
        >>> z = layer(torch.randn(2, 3))
        >>> z.shape, bool((z >= 0).all()), layer.last_solution.result
        (torch.Size([2, 5]), True, <RESULTS.successful: 0>)
    """

    def __init__(
        self,
        in_features: int,
        width: int,
        m: float = 0.05,
        splitting: ForwardBackward | PeacemanRachford | None = None,
        solver: AbstractFixedPointSolver | str | None = None,
        adjoint: AbstractAdjoint | None = None,
        max_steps: int = 100,
        throw: bool = False,
        eval_max_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        check_int("MonotoneDEQ", "in_features", in_features)
        check_int("MonotoneDEQ", "width", width)
        if splitting is None:
            splitting = PeacemanRachford()
        if not isinstance(splitting, (ForwardBackward, PeacemanRachford)):
            raise TypeError(
                "MonotoneDEQ: `splitting` must be dk.nn.ForwardBackward(...) or "
                f"dk.nn.PeacemanRachford(...), got {type(splitting).__name__}."
            )
        if solver is None:
            solver = Picard(rtol=splitting.rtol, atol=splitting.atol)
        super().__init__(_SplittingStep(), solver=solver, adjoint=adjoint, max_steps=max_steps,
                         eval_max_steps=eval_max_steps, throw=throw, **kwargs)
        self.U = nn.Linear(in_features, width)
        self.linear = MonotoneLinear(width, m)
        self.splitting = splitting

    @property
    def m(self) -> float:
        return self.linear.m

    def step_size(self, weight: Tensor | None = None) -> float:
        r"""The splitting's :math:`\alpha` (resolving ``"auto"`` to :math:`m/\|I-W\|_2^2`)."""
        alpha = self.splitting.alpha
        if alpha == "auto":
            with torch.no_grad():
                W = self.linear.weight() if weight is None else weight.detach()
                eye = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
                L = float(torch.linalg.matrix_norm(eye - W, 2))
            return self.m / (L * L)
        return float(alpha)

    def splitting_map(self) -> Callable[[Tensor, Tensor], Tensor]:
        r"""The fixed-point map :math:`T_\theta(z, c)` of the splitting at the current weights
        (``c = U x + b``): forward-backward
        :math:`\mathrm{ReLU}(z - \alpha((I - W) z - c))` on :math:`z`, or Peaceman-Rachford
        :math:`C_F C_G u` on :math:`u` (one LU factorisation, shared by all its calls)."""
        W = self.linear.weight()
        alpha = self.step_size(W)
        if isinstance(self.splitting, ForwardBackward):
            eye = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
            G = eye - alpha * (eye - W)  # z - alpha((I - W) z - inj) = z G^T + alpha inj

            def forward_backward(z: Tensor, c: Tensor) -> Tensor:
                return torch.relu(z @ G.T + alpha * c)

            return forward_backward
        solve = self.linear.factorise(alpha, W)

        def peaceman_rachford(u: Tensor, c: Tensor) -> Tensor:
            u_half = 2.0 * torch.relu(u) - u
            z_half = solve(u_half + alpha * c)
            return 2.0 * z_half - u_half

        return peaceman_rachford

    def forward(self, x: Tensor, z0: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Equilibrium ``z*`` of shape ``(B, width)`` for ``x`` of shape ``(B, in_features)``.

        ``z0`` (optional) is the initial iterate (``z`` for FB, ``u`` for PR); default zeros
        (or the stored equilibrium within :meth:`~deqkit.nn.DEQ.warm_start`).
        """
        inj = self.U(x)
        if inj.dim() != 2:
            raise ValueError(
                f"MonotoneDEQ: `x` must have shape (B, in_features), got {tuple(x.shape)}."
            )
        if z0 is not None and z0.shape != inj.shape:
            raise ValueError(
                f"MonotoneDEQ: `z0` must have shape {tuple(inj.shape)}, got {tuple(z0.shape)}."
            )
        value = super().forward(inj, self.splitting_map(), z0=z0)
        if isinstance(self.splitting, ForwardBackward):
            return value
        return torch.relu(value)

    def extra_repr(self) -> str:
        return f"splitting={self.splitting}, {super().extra_repr()}"
