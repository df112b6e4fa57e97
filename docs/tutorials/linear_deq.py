r"""The two exercises of the DEQ chapter, worked out and checked numerically.

**Exercise 1.** A DEQ uses the linear cell $f(z, x) = W z + U x + b$. Which condition on $W$
makes the fixed point exist and be unique? Compute it explicitly.

**Exercise 2.** Derive the implicit-differentiation formula from the fixed-point equation
$z^\star = f(z^\star, \theta)$. When is it well defined?

The script answers both on paper (in the text) and then checks every claim with deqkit in
float64. Run it with `python docs/tutorials/linear_deq.py`; `DEQKIT_TUTORIAL_SMALL=1` uses
smaller sizes (that is how the test suite runs it).
"""

# %% [markdown]
# ## Exercise 1: existence, uniqueness and the closed form
#
# **Contraction.** For any vector norm and its induced matrix norm,
#
# $$\|f(z, x) - f(z', x)\| = \|W (z - z')\| \le \|W\|\,\|z - z'\|,$$
#
# so $f(\cdot, x)$ is a contraction with constant $L = \|W\|$ whenever $\|W\| < 1$. The
# Banach fixed-point theorem ($\mathbb R^d$ is complete) then gives
#
# * a **unique** fixed point $z^\star$,
# * convergence of the plain iteration $z_{k+1} = f(z_k, x)$ from **any** start, with the
#   a-priori bound $\|z_k - z^\star\| \le \frac{L^k}{1 - L}\,\|z_1 - z_0\|$.
#
# **Closed form.** The fixed-point equation is linear:
#
# $$z = W z + U x + b \iff (I - W)\,z = U x + b .$$
#
# With $\|W\| < 1$ every eigenvalue of $W$ has modulus $\le \|W\| < 1$, so $1$ is not an
# eigenvalue, $I - W$ is invertible and
#
# $$z^\star = (I - W)^{-1}(U x + b) = \sum_{k \ge 0} W^k (U x + b)$$
#
# (the Neumann series converges because $\|W^k\| \le \|W\|^k$). The series is exactly what
# an infinitely deep weight-tied network started at $z_0 = 0$ computes, one term per layer.
#
# **Sharper conditions.** Existence and uniqueness only need $I - W$ to be invertible
# ($1 \notin \operatorname{spec}(W)$); convergence of the plain iteration needs the spectral
# radius $\rho(W) < 1$. $\|W\| < 1$ (in *some* induced norm) implies both and is what
# spectral normalisation enforces for the nonlinear cell $\tanh(Wz + Ux + b)$, where the
# closed form is lost but the contraction argument survives (tanh is 1-Lipschitz).

# %%
import os

import torch

import deqkit as dk

SMALL = os.environ.get("DEQKIT_TUTORIAL_SMALL") == "1"
B, d, n = (4, 8, 3) if SMALL else (64, 64, 16)  # batch, state size, input size
F64 = torch.float64
gen = torch.Generator().manual_seed(0)


def contractive(d: int, norm: float) -> torch.Tensor:
    """A random d x d matrix with spectral norm ||W||_2 = norm."""
    A = torch.randn(d, d, dtype=F64, generator=gen)
    return norm * A / torch.linalg.matrix_norm(A, 2)


L = 0.9
W = contractive(d, L)
U = torch.randn(d, n, dtype=F64, generator=gen)
b = torch.randn(d, dtype=F64, generator=gen)
x = torch.randn(B, n, dtype=F64, generator=gen)


def f(z, x):
    return z @ W.T + x @ U.T + b


# The closed form z* = (I - W)^{-1} (U x + b), one column per sample.
z_closed = torch.linalg.solve(torch.eye(d, dtype=F64) - W, (x @ U.T + b).T).T

# %% [markdown]
# Now solve the same equation with deqkit's solvers. Passing `x` as `args` lets the driver
# drop samples from the batch as they converge.

# %%
z0 = torch.zeros(B, d, dtype=F64)
picard = dk.fixed_point(f, z0, dk.Picard(rtol=1e-13, atol=0), args=(x,), max_steps=1000)
anderson = dk.fixed_point(f, z0, dk.Anderson(rtol=1e-13, atol=0), args=(x,), max_steps=200)
picard_error = float((picard.value - z_closed).abs().max())
anderson_error = float((anderson.value - z_closed).abs().max())
print(f"Picard:   {int(picard.stats['nstep'].max()):4d} steps, max |z - z*| = {picard_error:.1e}")
print(f"Anderson: {int(anderson.stats['nstep'].max()):4d} steps, "
      f"max |z - z*| = {anderson_error:.1e}")

# %% [markdown]
# Banach's a-priori bound holds at every step of the plain iteration (here in the
# Euclidean norm, for which $L = \|W\|_2$):

# %%
z_prev = z0
z_k = f(z0, x)
first_step = torch.linalg.vector_norm(z_k - z0, dim=1)
bound_holds = True
for k in range(1, 60):
    error = torch.linalg.vector_norm(z_k - z_closed, dim=1)
    bound = L**k / (1 - L) * first_step
    bound_holds &= bool((error <= bound * (1 + 1e-12)).all())
    z_k = f(z_k, x)
print(f"a-priori bound ||z_k - z*|| <= L^k/(1-L) ||z_1 - z_0|| held for k < 60: {bound_holds}")

# %% [markdown]
# The spectral-norm condition is sufficient, not necessary. The non-normal matrix below has
# $\|W\|_2 \approx 2.1$ but $\rho(W) = 0.5$: the iterates first grow (transient amplification),
# then converge to the same closed form, because $\|W^k\|_2 \to 0$.

# %%
W_nonnormal = torch.tensor([[0.5, 2.0], [0.0, 0.5]], dtype=F64)
c = torch.tensor([[1.0, -1.0]], dtype=F64)
z_star_nn = torch.linalg.solve(torch.eye(2, dtype=F64) - W_nonnormal, c.T).T
sol_nn = dk.fixed_point(lambda z: z @ W_nonnormal.T + c, torch.zeros(1, 2, dtype=F64),
                        dk.Picard(rtol=1e-12, atol=0), max_steps=500, trace=True)
nonnormal_error = float((sol_nn.value - z_star_nn).abs().max())
residuals = sol_nn.stats["trace"][:, 0]
print(f"||W||_2 = {float(torch.linalg.matrix_norm(W_nonnormal, 2)):.2f}, rho(W) = 0.5: "
      f"{int(sol_nn.stats['nstep'][0])} Picard steps, residual peaked at "
      f"{float(residuals.nan_to_num(0).max()):.2f} (started at {float(residuals[0]):.2f}), "
      f"error {nonnormal_error:.1e}")

# %% [markdown]
# ## Exercise 2: the implicit gradient
#
# Let $z^\star(\theta)$ satisfy $z^\star = f(z^\star, \theta)$ and let $\ell(z^\star)$ be a
# loss. Differentiate both sides of the fixed-point equation with respect to $\theta$
# (chain rule through both arguments of $f$):
#
# $$\frac{\mathrm d z^\star}{\mathrm d\theta}
#   = J\,\frac{\mathrm d z^\star}{\mathrm d\theta} + \frac{\partial f}{\partial\theta},
#   \qquad J = \frac{\partial f}{\partial z}\Big|_{z^\star},$$
#
# hence $(I - J)\,\frac{\mathrm d z^\star}{\mathrm d\theta} = \frac{\partial f}{\partial\theta}$
# and, **when $I - J$ is invertible**,
#
# $$\frac{\mathrm d z^\star}{\mathrm d\theta} = (I - J)^{-1}\frac{\partial f}{\partial\theta},
#   \qquad
#   \frac{\mathrm d \ell}{\mathrm d\theta}
#   = \frac{\partial \ell}{\partial z^\star}(I - J)^{-1}\frac{\partial f}{\partial\theta}.$$
#
# This is the implicit function theorem applied to $g(z, \theta) = z - f(z, \theta) = 0$,
# whose Jacobian in $z$ is $I - J$. Backpropagation never forms the inverse: it solves one
# linear system for the row vector $u^\top = \frac{\partial\ell}{\partial z^\star}(I - J)^{-1}$,
#
# $$(I - J^\top)\,u = \nabla_{z^\star}\ell,$$
#
# with vector-Jacobian products $v \mapsto J^\top v$, and then does one ordinary backward
# pass $u^\top \partial f/\partial\theta$ through a single evaluation of $f$ at $z^\star$.
# Nothing depends on how the forward solver reached $z^\star$: no iterates are stored.
#
# **Well-posedness.** The formula needs $I - J$ invertible at $z^\star$, i.e. $1$ is not an
# eigenvalue of $J$. A contraction ($\|J\| \le L < 1$) guarantees it, and then the Neumann
# series $u = \sum_k (J^\top)^k \nabla\ell$ converges too (that is `dk.Neumann`). The
# conditioning of the system is about $1/(1 - \rho(J))$: as $\rho(J) \to 1$ gradients become
# large and the backward solve slow.
#
# **The linear DEQ.** Here $J = W$, $\partial f/\partial x = U$, $\partial f/\partial b = I$,
# so with $u = (I - W^\top)^{-1}\nabla_{z^\star}\ell$ the gradients are
#
# $$\nabla_x \ell = U^\top u,\qquad \nabla_b \ell = u,\qquad \nabla_W \ell = u\,z^{\star\top},
#   \qquad \nabla_U \ell = u\,x^\top$$
#
# (summed over the batch for the shared parameters). deqkit's implicit adjoint must
# reproduce them.

# %%
def loss_of(z):
    return 0.5 * (z**2).sum()


params = [W, U, b]
for p in params:
    p.requires_grad_(True)
x_leaf = x.clone().requires_grad_(True)
sol = dk.fixed_point(f, z0, dk.Anderson(rtol=1e-13, atol=0), args=(x_leaf,), max_steps=200,
                     adjoint=dk.ImplicitAdjoint(dk.GMRES(rtol=1e-13, atol=0)))
grads = torch.autograd.grad(loss_of(sol.value), [*params, x_leaf])
with torch.no_grad():
    zs = z_closed
    u = torch.linalg.solve(torch.eye(d, dtype=F64) - W.T, zs.T).T  # dl/dz* = z* for this loss
    by_hand = [u.T @ zs, u.T @ x, u.sum(0), u @ U]  # dW, dU, db, dx
gradient_error = max(float((g - h).abs().max() / h.abs().max()) for g, h in zip(grads, by_hand))
print(f"implicit gradients vs the closed form: max relative error {gradient_error:.1e}")
print(f"backward GMRES iterations: at most {int(sol.backward['nstep'].max())}")

# %% [markdown]
# The derivation did not use linearity, so check a nonlinear cell too,
# $f(z, x) = \tanh(W z + U x + b)$, against central finite differences of the loss in
# random directions $v$: $\big(\ell(\theta + h v) - \ell(\theta - h v)\big) / 2h$.

# %%
def equilibrium_loss(W, U, b, x):
    with torch.no_grad():
        s = dk.fixed_point(lambda z, x: torch.tanh(z @ W.T + x @ U.T + b), z0,
                           dk.Anderson(rtol=1e-14, atol=0), args=(x,), max_steps=300)
    return float(loss_of(s.value))


def cell(z, x):
    return torch.tanh(z @ W.T + x @ U.T + b)


sol = dk.fixed_point(cell, z0, dk.Anderson(rtol=1e-14, atol=0), args=(x_leaf,), max_steps=300,
                     adjoint=dk.ImplicitAdjoint(dk.Dense()))
implicit = torch.autograd.grad(loss_of(sol.value), [*params, x_leaf])
h = 1e-5
fd_errors = []
for _ in range(4):
    directions = [torch.randn(t.shape, dtype=F64, generator=gen) for t in (*params, x)]
    with torch.no_grad():
        base = [W, U, b, x]
        plus = equilibrium_loss(*(t + h * v for t, v in zip(base, directions)))
        minus = equilibrium_loss(*(t - h * v for t, v in zip(base, directions)))
    numeric = (plus - minus) / (2 * h)
    analytic = float(sum((g * v).sum() for g, v in zip(implicit, directions)))
    fd_errors.append(abs(numeric - analytic) / abs(analytic))
finite_difference_error = max(fd_errors)
print(f"tanh cell: implicit vs finite-difference directional derivatives, "
      f"max relative error {finite_difference_error:.1e}")

# %% [markdown]
# **Implicit differentiation is not unrolling.** Backpropagating through $k$ Picard steps
# (`dk.UnrolledAdjoint`) gives the gradient of the $k$-th iterate, which approaches the
# implicit gradient only as $k \to \infty$ (here roughly like $L^k$), while storing all $k$
# steps. The implicit gradient is the limit, at the memory of one step.

# %%
unrolled_errors = {}
reference = torch.cat([g.flatten() for g in implicit])
for k in (5, 10, 20, 40):
    s = dk.fixed_point(cell, z0, dk.FixedSteps(dk.Picard()), args=(x_leaf,), max_steps=k,
                       adjoint=dk.UnrolledAdjoint(), throw=False, divergence_ratio=None)
    g = torch.cat([t.flatten() for t in torch.autograd.grad(loss_of(s.value),
                                                            [*params, x_leaf])])
    unrolled_errors[k] = float((g - reference).norm() / reference.norm())
    print(f"unrolled through {k:2d} steps: relative gradient error {unrolled_errors[k]:.1e}")

# %% [markdown]
# Finally, conditioning. Take a symmetric positive semi-definite $W$ whose largest eigenvalue
# is $\|W\|_2$: as it approaches 1, $I - W$ approaches a singular matrix, the condition
# number grows like $1/(1 - \|W\|)$, the gradient grows with it and GMRES needs more
# iterations. At $\|W\| = 1$ the gradient (and, generically, the fixed point) no longer
# exists.

# %%
A = torch.randn(d, d, dtype=F64, generator=gen)
S = A @ A.T / torch.linalg.matrix_norm(A @ A.T, 2)  # symmetric PSD, top eigenvalue 1
conditioning = {}
for norm in (0.5, 0.9, 0.99):
    Wn = (norm * S).requires_grad_(True)
    s = dk.fixed_point(lambda z, x, Wn=Wn: z @ Wn.T + x @ U.T.detach() + b.detach(), z0,
                       dk.Anderson(rtol=1e-12, atol=0), args=(x,), max_steps=500,
                       adjoint=dk.ImplicitAdjoint(dk.GMRES(rtol=1e-10, atol=0, max_steps=500)))
    (gW,) = torch.autograd.grad(loss_of(s.value), [Wn])
    cond = float(torch.linalg.cond(torch.eye(d, dtype=F64) - Wn.detach()))
    conditioning[norm] = dict(cond=cond, grad_norm=float(gW.norm()),
                              gmres_steps=int(s.backward["nstep"].max()))
    print(f"||W|| = {norm:4}: cond(I - W) = {cond:7.1f}, ||dl/dW|| = {float(gW.norm()):10.3g}, "
          f"GMRES iterations {conditioning[norm]['gmres_steps']}")
