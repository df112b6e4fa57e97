"""Expressiveness: can a 1-D model map x -> -x?  (The document's homeomorphism case.)

All three models have a 1-D state, and their output *is* the final state: no extra
dimensions, no read-out that could flip the sign.

* Neural ODE: ``dz/dt = g(z)`` (g a small tanh MLP, autonomous), ``z(0) = x``, output
  ``z(1)``. The flow map is an increasing homeomorphism of R (trajectories cannot cross), so
  the best it can do on y = -x is the best order-preserving fit: MSE -> E[x^2] = 1/3 for
  x ~ U[-1, 1] (a near-constant map).
* ResNet: ``z_{l+1} = z_l + g_l(z_l)``, ``z_0 = x``, output ``z_L``. A finite residual step
  need not be invertible (e.g. g(z) = -2z), so it can reverse the order.
* DEQ: ``z* = f(z*, x)`` with ``f(z, x) = V tanh(A_z z + A_x x + b) + c`` whose Lipschitz
  constant in z is kept <= 0.9 (``A_z`` rescaled), output ``z*``; the map x -> z* is any
  function f allows, e.g. -x.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

import deqkit as dk


def _mlp(d_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, 1))


class ODE1D(nn.Module):
    def __init__(self, hidden: int = 16, rtol: float = 1e-5, atol: float = 1e-6) -> None:
        super().__init__()
        self.g = _mlp(1, hidden)
        self.rtol, self.atol = rtol, atol

    def forward(self, x: Tensor) -> Tensor:
        import torchdiffeq

        t = torch.tensor([0.0, 1.0], dtype=x.dtype)
        zT = torchdiffeq.odeint(lambda t, z: self.g(z), x, t, rtol=self.rtol, atol=self.atol,
                                method="dopri5")
        return zT[-1]


class ResNet1D(nn.Module):
    def __init__(self, depth: int = 4, hidden: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_mlp(1, hidden) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        z = x
        for g in self.blocks:
            z = z + g(z)
        return z


class DEQ1D(nn.Module):
    def __init__(self, hidden: int = 16, lipschitz: float = 0.9) -> None:
        super().__init__()
        self.a_z = nn.Parameter(0.1 * torch.randn(hidden, 1))
        self.a_x = nn.Linear(1, hidden)
        self.v = nn.Linear(hidden, 1)
        self.lipschitz = lipschitz

    def cell(self, z: Tensor, inj: Tensor) -> Tensor:
        # Lip_z(f) <= ||V||_2 ||A_z||_2 (tanh is 1-Lipschitz): rescale A_z to keep it <= lipschitz
        bound = self.v.weight.norm() * self.a_z.norm()
        a_z = self.a_z * torch.clamp(self.lipschitz / (bound + 1e-12), max=1.0)
        return self.v(torch.tanh(z @ a_z.T + inj))

    def forward(self, x: Tensor) -> Tensor:
        inj = self.a_x(x)
        sol = dk.fixed_point(self.cell, torch.zeros_like(x), dk.Anderson(rtol=1e-6, atol=1e-8),
                             dk.ImplicitAdjoint(dk.GMRES(rtol=1e-6, atol=0.0),
                                                on_failure="ignore"),
                             max_steps=100, args=(inj,), throw=False)
        return sol.value


def homeomorphism_experiment(steps: int = 300, n: int = 256, lr: float = 1e-2,
                             seed: int = 0) -> dict[str, Any]:
    """Train the three 1-D models on y = -x, x ~ U[-1, 1] (full batch Adam, ``steps`` steps);
    return the final MSE of each on a fresh test sample, plus the order-preserving bound."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g) * 2 - 1
    xt = torch.rand(1024, 1, generator=g) * 2 - 1
    out: dict[str, Any] = {"steps": steps, "n_train": n,
                           "order_preserving_bound": float((xt**2).mean()),
                           "models": {}}
    for name, make in (("neural_ode", ODE1D), ("resnet", ResNet1D), ("deq", DEQ1D)):
        torch.manual_seed(seed)
        m = make()
        opt = torch.optim.Adam(m.parameters(), lr=lr)
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = ((m(x) + x) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            pred = m(xt)
            mse = float(((pred + xt) ** 2).mean())
            order_kept = bool((pred[xt.argsort(0).squeeze(1)].diff(dim=0) >= -1e-6).all())
        out["models"][name] = {"mse": mse, "time_s": time.perf_counter() - t0,
                               "order_preserving": order_kept,
                               "params": sum(p.numel() for p in m.parameters())}
    return out


__all__ = ["DEQ1D", "ODE1D", "ResNet1D", "homeomorphism_experiment"]
