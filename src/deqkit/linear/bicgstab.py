"""BiCGStab, batched over independent systems."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .._checks import check_int, check_tolerances
from ._base import (
    AbstractLinearSolver,
    LinearSolution,
    _initial_guess,
    _tolerance,
    batched_norm,
)
from ._operator import AbstractLinearOperator

_dot = torch.linalg.vecdot


@dataclasses.dataclass(frozen=True)
class BiCGStab(AbstractLinearSolver):
    r"""Stabilised bi-conjugate gradients for ``B`` independent systems ``A_b x_b = r_b``.

    With :math:`r_0 = b - A x_0` and a fixed shadow residual :math:`\hat r = r_0`, each
    iteration (two ``matvec``) performs

    .. math::

        \rho_k &= \langle \hat r, r_{k-1} \rangle, \quad
        \beta_k = \frac{\rho_k}{\rho_{k-1}} \frac{\alpha_{k-1}}{\omega_{k-1}}, \quad
        p_k = r_{k-1} + \beta_k (p_{k-1} - \omega_{k-1} v_{k-1}), \\
        v_k &= A p_k, \quad \alpha_k = \frac{\rho_k}{\langle \hat r, v_k \rangle}, \quad
        s_k = r_{k-1} - \alpha_k v_k, \\
        t_k &= A s_k, \quad \omega_k = \frac{\langle t_k, s_k \rangle}{\langle t_k, t_k \rangle},
        \quad x_k = x_{k-1} + \alpha_k p_k + \omega_k s_k, \quad r_k = s_k - \omega_k t_k.

    All scalars are per sample.  A sample stops (and its ``x`` stops changing) when the
    recursively updated residual ``||s_k||`` or ``||r_k||`` meets ``atol + rtol * ||b||``.
    The residual of BiCGStab is not monotone, so each sample keeps the iterate with the
    smallest residual seen so far and returns it (the MATLAB convention); an unconverged
    result is never worse than ``x0``.  Breakdowns never produce NaN:

    - :math:`\rho_k \approx 0` (shadow residual orthogonal to the residual): the sample
      restarts with :math:`\hat r = r_{k-1}`, :math:`p_k = r_{k-1}`;
    - :math:`\langle \hat r, v_k\rangle \approx 0`, or :math:`\|A p_k\|` numerically zero
      relative to a running estimate of :math:`\|A\|` (``p_k`` in the null space): the step
      falls back to :math:`\alpha_k = 0` (a minimal-residual step along :math:`r_{k-1}`) and
      the sample restarts next iteration;
    - :math:`\omega_k \approx 0` or :math:`\|A s_k\|` numerically zero: :math:`\omega_k = 0`
      and the sample restarts next iteration;
    - a non-finite iterate or residual stops the sample (its best iterate is kept).

    When every sample has stopped, the true residual is recomputed (one ``matvec``); samples
    whose recursive residual drifted away from the true one restart from it while steps
    remain, so the reported ``residual`` and ``converged`` are honest.  On singular,
    inconsistent systems BiCGStab does not control the null-space component of ``x``
    (it stays finite but may grow); prefer :class:`~deqkit.linear.GMRES` there.

    **Right preconditioning** (``preconditioner=P``, :math:`P \approx A^{-1}`; Saad 2003,
    §9.3.2, applied to BiCGStab): the recurrences above run on :math:`A P`, i.e.
    :math:`\hat p_k = P p_k`, :math:`v_k = A \hat p_k`, :math:`\hat s_k = P s_k`,
    :math:`t_k = A \hat s_k` and :math:`x_k = x_{k-1} + \alpha_k \hat p_k + \omega_k \hat s_k`
    (two products with ``P`` per iteration); the residuals :math:`r_k, s_k` are those of
    :math:`A x = b`, so the stopping test is unchanged.  No ``inv_norm`` estimate (``None``).

    Args:
        rtol: relative tolerance, default ``1e-6``.  With ``rtol = atol = 0`` the solver runs
            ``max_steps`` iterations (or stops at an exact solution).
        atol: absolute tolerance, default ``1e-8``.
        max_steps: maximum number of iterations (two ``matvec`` each), default ``100``.

    Reference:
        H. A. van der Vorst, "Bi-CGSTAB: A fast and smoothly converging variant of Bi-CG for
        the solution of nonsymmetric linear systems", SIAM J. Sci. Stat. Comput. 13(2),
        631-644, 1992; Y. Saad, "Iterative Methods for Sparse Linear Systems", 2nd ed.,
        SIAM, 2003, §7.4.2 and §9.3.

    Example:
        >>> import torch
        >>> from deqkit.linear import BiCGStab
        >>> d = torch.tensor([[1.0, 2.0, 4.0], [0.5, 1.0, 8.0]], dtype=torch.float64)
        >>> b = torch.ones(2, 3, dtype=torch.float64)
        >>> sol = BiCGStab(rtol=1e-12).solve(lambda v: d * v, b)
        >>> torch.allclose(sol.value, 1 / d), sol.converged.tolist()
        (True, [True, True])
    """

    rtol: float = 1e-6
    atol: float = 1e-8
    max_steps: int = 100

    def __post_init__(self) -> None:
        # rtol = atol = 0 is allowed: exactly max_steps iterations
        check_tolerances("BiCGStab", self.rtol, self.atol, both_zero=True, example="1e-6")
        check_int("BiCGStab", "max_steps", self.max_steps, example=100)

    def run(self, op: AbstractLinearOperator, prepared: object, rhs: Tensor,
            x0: Tensor | None, preconditioner: AbstractLinearOperator | None = None
            ) -> LinearSolution:
        """Solve ``A x = rhs`` row by row; see the class docstring."""
        _, tol = _tolerance(rhs, self.rtol, self.atol)
        x = _initial_guess(rhs, x0)
        r = rhs.clone() if x0 is None else rhs - op(x)
        nstep = torch.zeros(rhs.shape[0], dtype=torch.int64, device=rhs.device)
        it = 0
        while True:
            rnorm = batched_norm(r)
            done = rnorm <= tol
            if it >= self.max_steps or bool(done.all()):  # one host sync per (re)start
                break
            # (Re)start: shadow residual = current true residual for every sample.
            rec = _Recurrence.start(x, r, rnorm, active=~done)
            while it < self.max_steps:
                rec.step(op, tol, nstep, preconditioner)
                it += 1
                if it < self.max_steps and not bool(rec.active.any()):  # one sync per step
                    break
            x = rec.x_best
            r = rhs - op(x)  # true residual

        return LinearSolution(
            value=x, converged=done, residual=rnorm, nstep=nstep, nmatvec=op.count
        )


@dataclasses.dataclass
class _Recurrence:
    """The per-sample BiCGStab recurrences of one (re)start, and the best iterate so far."""

    x: Tensor
    r: Tensor
    rnorm: Tensor
    active: Tensor
    r_hat: Tensor
    rhat_norm: Tensor
    restart: Tensor
    rho: Tensor
    alpha: Tensor
    omega: Tensor
    p: Tensor
    v: Tensor
    anorm: Tensor  # running lower bound of ||A||_2
    x_best: Tensor
    best: Tensor

    @classmethod
    def start(cls, x: Tensor, r: Tensor, rnorm: Tensor, active: Tensor) -> _Recurrence:
        return cls(
            x=x, r=r, rnorm=rnorm, active=active, r_hat=r.clone(), rhat_norm=rnorm.clone(),
            restart=torch.ones_like(active), rho=torch.ones_like(rnorm),
            alpha=torch.ones_like(rnorm), omega=torch.ones_like(rnorm), p=torch.zeros_like(r),
            v=torch.zeros_like(r), anorm=torch.zeros_like(rnorm), x_best=x, best=rnorm,
        )

    def step(self, op: AbstractLinearOperator, tol: Tensor, nstep: Tensor,
             pc: AbstractLinearOperator | None = None) -> None:
        """One iteration (two products, and two of the right preconditioner ``pc`` if given:
        the recurrences are those of ``A P``, the iterate ``x`` that of ``A``); counts
        ``nstep`` for the samples that were active."""
        finfo = torch.finfo(self.r.dtype)
        tiny = finfo.tiny
        cos_tol = finfo.eps  # breakdown threshold on the cosine of two vectors
        null_tol = 100 * finfo.eps  # ||A p|| below null_tol * ||A|| * ||p||: p in null(A)
        active, r, rnorm = self.active, self.r, self.rnorm
        rho_new = self._shadow(r, rnorm, cos_tol)
        fresh = self.restart | ~active
        # Divisions by zero can only happen in lanes that torch.where discards.
        beta = (rho_new / self.rho) * (self.alpha / self.omega)
        p = torch.where(
            fresh[:, None], r, r + beta[:, None] * (self.p - self.omega[:, None] * self.v)
        )
        p_hat = p if pc is None else pc(p)
        v = op(p_hat)
        den = _dot(self.r_hat, v)
        pnorm, vnorm = batched_norm(p), batched_norm(v)
        self.anorm = torch.maximum(self.anorm, vnorm / pnorm.clamp_min(tiny))
        alpha_bd = (den.abs() <= cos_tol * self.rhat_norm * vnorm) | (
            vnorm <= null_tol * self.anorm * pnorm
        )
        alpha = torch.where(active & ~alpha_bd, rho_new / den, 0.0)
        s = r - alpha[:, None] * v
        snorm = batched_norm(s)
        half = snorm <= tol  # converged after the half step
        s_hat = s if pc is None else pc(s)
        t = op(s_hat)
        tt = _dot(t, t)
        ts = _dot(t, s)
        tnorm = torch.sqrt(tt)
        self.anorm = torch.maximum(self.anorm, tnorm / snorm.clamp_min(tiny))
        omega_bd = (ts.abs() <= cos_tol * tnorm * snorm) | (tnorm <= null_tol * self.anorm * snorm)
        omega = torch.where(active & ~half & ~omega_bd, ts / tt, 0.0)
        # Inactive samples have alpha = omega = 0: x and r do not change.
        self.x = self.x.addcmul(alpha[:, None], p_hat).addcmul_(omega[:, None], s_hat)
        self.r = s.addcmul(omega[:, None], t, value=-1.0)
        self.rnorm = batched_norm(self.r)
        self.rho, self.alpha, self.omega, self.p, self.v = rho_new, alpha, omega, p, v
        self.restart = alpha_bd | omega_bd
        nstep += active
        self._keep_best(tol)

    def _shadow(self, r: Tensor, rnorm: Tensor, cos_tol: float) -> Tensor:
        """``rho = <r_hat, r>``; samples where it (nearly) vanishes restart with ``r_hat = r``."""
        rho_new = _dot(self.r_hat, r)
        self.restart = self.restart | (rho_new.abs() <= cos_tol * self.rhat_norm * rnorm)
        self.r_hat = torch.where(self.restart[:, None], r, self.r_hat)
        self.rhat_norm = torch.where(self.restart, rnorm, self.rhat_norm)
        return torch.where(self.restart, rnorm * rnorm, rho_new)

    def _keep_best(self, tol: Tensor) -> None:
        """Keep the iterate with the smallest (recursive) residual; a sample whose iterate or
        residual overflows stops there."""
        finite = torch.isfinite(self.rnorm) & torch.isfinite(batched_norm(self.x))
        better = finite & (self.rnorm < self.best)
        self.best = torch.where(better, self.rnorm, self.best)
        self.x_best = torch.where(better[:, None], self.x, self.x_best)
        self.active = self.active & finite & (self.rnorm > tol)

