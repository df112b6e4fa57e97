r"""Implicit layers beyond fixed points: `dk.root_find` and `dk.minimise`.

A fixed point $z = f(z)$ is one way to define an output implicitly. Two others are just as
common, and deqkit reduces both to the same solver loop and the same adjoint:

* a **root** $F(z^\star, \theta) = 0$ (`dk.root_find`), solved as the fixed point of
  $f(z) = z + F(z)$; by the implicit function theorem
  $\frac{\mathrm d z^\star}{\mathrm d\theta} = -J_F(z^\star)^{-1}\frac{\partial F}{\partial\theta}$;
* a **minimiser** $z^\star = \arg\min_z E(z, \theta)$ (`dk.minimise`), found as the root of
  $-\nabla_z E$; differentiating the optimality condition $\nabla_z E(z^\star, \theta) = 0$
  gives $\frac{\mathrm d z^\star}{\mathrm d\theta}
  = -H^{-1}\frac{\partial^2 E}{\partial z\,\partial\theta}$ with $H = \nabla_z^2 E$.

In both cases the backward pass solves one linear system (with vector-Jacobian or
Hessian-vector products; no matrix is formed) and never looks at the forward iterations.
Everything runs in float64 so the checks can be tight; the problems are small either way
(`DEQKIT_TUTORIAL_SMALL=1` only shortens the last training loop).
"""

# %%
import os

import torch

import deqkit as dk

SMALL = os.environ.get("DEQKIT_TUTORIAL_SMALL") == "1"
F64 = torch.float64
torch.manual_seed(0)

# %% [markdown]
# ## Root finding: Kepler's equation
#
# A body on an orbit of eccentricity $e$ is at eccentric anomaly $E$ when its mean anomaly is
# $M$, where $E - e \sin E = M$. There is no closed form for $E(M)$, but its derivative
# follows from the implicit function theorem with $F(E, M) = E - e\sin E - M$:
#
# $$\frac{\mathrm d E}{\mathrm d M} = -\frac{\partial F/\partial M}{\partial F/\partial E}
#   = \frac{1}{1 - e \cos E}.$$
#
# The default solver is Newton's method (`dk.NewtonKrylov`), with Jacobian-vector products
# of $F$: a handful of steps per sample.

# %%
e = 0.7
M = torch.linspace(0.1, 3.0, 8, dtype=F64).unsqueeze(1).requires_grad_(True)
sol = dk.root_find(lambda E: E - e * torch.sin(E) - M, M.detach().clone(),
                   solver=dk.NewtonKrylov(rtol=1e-14, atol=1e-14))
E_star = sol.value
(dE_dM,) = torch.autograd.grad(E_star.sum(), M)
with torch.no_grad():
    kepler_residual = float((E_star - e * torch.sin(E_star) - M).abs().max())
kepler_gradient_error = float((dE_dM - 1 / (1 - e * torch.cos(E_star.detach()))).abs().max())
print(f"Newton steps per sample: {sol.stats['nstep'].tolist()}")
print(f"max |E - e sin E - M| = {kepler_residual:.1e}; "
      f"dE/dM vs 1/(1 - e cos E): max error {kepler_gradient_error:.1e}")

# %% [markdown]
# ## An optimisation layer: ridge regression with a learned regulariser
#
# Each sample holds a small regression problem (features $A_b$, targets $y_b$). The layer
# returns the ridge solution
#
# $$z^\star_b = \arg\min_z \|A_b z - y_b\|^2 + \lambda \|z\|^2
#   = (A_b^\top A_b + \lambda I)^{-1} A_b^\top y_b,$$
#
# and we differentiate it with respect to $\lambda$. Differentiating the optimality condition
# $(A^\top A + \lambda I) z^\star = A^\top y$ gives the closed form
# $\frac{\mathrm d z^\star}{\mathrm d\lambda} = -(A^\top A + \lambda I)^{-1} z^\star$;
# `dk.minimise` must agree with it, having seen only the energy $E$.

# %%
B, n, p = 16, 8, 6
A = torch.randn(B, n, p, dtype=F64)
w_true = 0.5 * torch.randn(B, p, dtype=F64)
y = torch.einsum("bnp,bp->bn", A, w_true) + 2.0 * torch.randn(B, n, dtype=F64)
log_lam = torch.tensor(0.0, dtype=F64, requires_grad=True)


def energy(z, A, y):
    lam = log_lam.exp()
    return (torch.einsum("bnp,bp->bn", A, z) - y).square().sum(1) + lam * z.square().sum(1)


sol = dk.minimise(energy, torch.zeros(B, p, dtype=F64), args=(A, y),
                  solver=dk.NewtonKrylov(rtol=1e-13, atol=0))
z_star = sol.value
lam = log_lam.exp().detach()
H = A.transpose(1, 2) @ A + lam * torch.eye(p, dtype=F64)
z_closed = torch.linalg.solve(H, torch.einsum("bnp,bn->bp", A, y))
v = torch.randn(B, p, dtype=F64)  # an arbitrary cotangent
(g,) = torch.autograd.grad((z_star * v).sum(), log_lam)
g_closed = float((v * -torch.linalg.solve(H, z_closed)).sum() * lam)  # chain rule through exp
ridge_value_error = float((z_star.detach() - z_closed).abs().max())
ridge_gradient_error = abs(float(g) - g_closed) / abs(g_closed)
print(f"ridge layer: max |z* - closed form| = {ridge_value_error:.1e}, "
      f"d/dlog(lambda) relative error {ridge_gradient_error:.1e}")

# %% [markdown]
# ## Learning through the layer: choosing $\lambda$ by gradient descent
#
# Because the layer is differentiable, a hyperparameter of the inner problem can be tuned
# by ordinary gradient descent on an outer loss. Here the outer loss is the error of the
# ridge solution on held-out points of each regression (a bilevel problem; the inner solve
# is exact, so the outer gradient is the true hypergradient).

# %%
A_val = torch.randn(B, 3 * n, p, dtype=F64)
y_val = torch.einsum("bnp,bp->bn", A_val, w_true) + 2.0 * torch.randn(B, 3 * n, dtype=F64)
log_lam = torch.tensor(-3.0, dtype=F64, requires_grad=True)
optimiser = torch.optim.Adam([log_lam], lr=0.2)
validation = []
for _ in range(15 if SMALL else 60):
    z = dk.minimise(energy, torch.zeros(B, p, dtype=F64), args=(A, y),
                    solver=dk.NewtonKrylov(rtol=1e-10, atol=0)).value
    loss = (torch.einsum("bnp,bp->bn", A_val, z) - y_val).square().mean()
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    validation.append(loss.item())
print(f"validation MSE {validation[0]:.4f} -> {validation[-1]:.4f}, "
      f"lambda {float(torch.tensor(-3.0).exp()):.3f} -> {float(log_lam.detach().exp()):.3f}")

# %% [markdown]
# ## What to watch
#
# * `root_find`'s default Newton solver needs forward-mode AD through $F$; `dk.Broyden()`
#   needs none. Picard and Anderson iterate $z + F(z)$ and need it to be contractive.
# * `minimise` returns a *stationary point*: for a non-convex $E$ which one depends on
#   `z0`, and a singular Hessian at $z^\star$ makes the gradient ill-posed.
# * The tolerances are per sample, as for `fixed_point`; `sol.stats` and `sol.backward`
#   report the forward and backward solves.
