r"""Hypernetworks, and HyperDEQ: a network that learns to solve a DEQ faster.

Two ways a network can produce the computation of another one.

1. A **hypernetwork** $H_\phi$ generates the weights of a target network from a context
   $c$: $\theta = H_\phi(c)$, $\hat y = g_{\theta}(x)$. Training differentiates through the
   composition $\phi \to \theta \to \hat y$ with ordinary autograd (`dk.nn.HyperNetwork`,
   module `deqkit.nn.hypernetwork`).
2. **HyperDEQ** (Bai, Koltun, Kolter, "Neural Deep Equilibrium Solvers", ICLR 2022) trains a
   small network to *solve* a frozen DEQ: it predicts the initial state from the input and
   corrects the Anderson mixing weights at every step (`dk.HyperAnderson`,
   `dk.train_hyper_solver`). The package `deqkit.hyperdeq` holds the solver
   (`deqkit.hyperdeq.solver`, an ordinary solver of `dk.fixed_point`), its three networks
   (`deqkit.hyperdeq.networks`), the unrolled loss (`deqkit.hyperdeq.loss`) and the training
   loops (`deqkit.hyperdeq.train`).

`DEQKIT_TUTORIAL_SMALL=1` shrinks both experiments to a few seconds.
"""

# %%
import math
import os

import torch
from torch import nn

import deqkit as dk

SMALL = os.environ.get("DEQKIT_TUTORIAL_SMALL") == "1"
torch.manual_seed(0)

# %% [markdown]
# ## 1. A hypernetwork for a family of functions
#
# Each task is a sinusoid $y = a \sin(x + \varphi)$; the context is $c = (a, \cos\varphi,
# \sin\varphi)$. The hypernetwork maps $c$ to all the weights of a small MLP $g_\theta$,
#
# $$\theta(c) = \theta_0 + W\,\tanh(\dots\tanh(L_1 c)), $$
#
# with the head bias $\theta_0$ initialised to the MLP's own initial weights. A context of
# shape `(B, 3)` gives every sample its own weights (the target is applied with
# `torch.func.vmap`); the per-task network never exists as a module.

# %%
target = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                       nn.Linear(32, 1))
hyper = dk.nn.HyperNetwork(target, context_dim=3, hidden=32)
print(f"hypernetwork parameters: {sum(p.numel() for p in hyper.parameters())}, "
      f"generated per task: {sum(t.numel() for t in hyper.generate(torch.zeros(3)).values())}")


def tasks(n_tasks, n_points, generator):
    a = 0.5 + 1.5 * torch.rand(n_tasks, 1, generator=generator)
    phase = 2 * math.pi * torch.rand(n_tasks, 1, generator=generator)
    x = (10 * torch.rand(n_tasks, n_points, 1, generator=generator) - 5)
    y = a.unsqueeze(1) * torch.sin(x + phase.unsqueeze(1))
    return torch.cat([a, phase.cos(), phase.sin()], 1), x, y


g = torch.Generator().manual_seed(1)
c_test, x_test, y_test = tasks(64, 50, g)
with torch.no_grad():
    hyper_mse_before = nn.functional.mse_loss(hyper(c_test, x_test), y_test).item()
optimiser = torch.optim.Adam(hyper.parameters(), lr=3e-3)
for _ in range(150 if SMALL else 2000):
    c, x, y = tasks(16, 20, g)
    loss = nn.functional.mse_loss(hyper(c, x), y)
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
with torch.no_grad():
    hyper_mse_after = nn.functional.mse_loss(hyper(c_test, x_test), y_test).item()
print(f"held-out tasks: MSE {hyper_mse_before:.3f} before training, {hyper_mse_after:.3f} after "
      f"(predicting 0 gives {y_test.square().mean():.3f})")

# %% [markdown]
# Generated weights are large intermediate tensors when the target is big. `chunk_size`
# generates them in blocks inside checkpointed segments, so the backward pass regenerates
# them instead of storing them (same values and gradients, more compute).

# %%
hyper.chunk_size = 256
with torch.no_grad():
    chunked = hyper(c_test, x_test)
    hyper.chunk_size = None
    plain = hyper(c_test, x_test)
chunked_difference = (chunked - plain).abs().max().item()
print(f"chunked vs one-shot generation: max difference {chunked_difference:.1e}")

# %% [markdown]
# ## 2. HyperDEQ: learning the solver
#
# Take a DEQ whose weights are trained and frozen. Solving it still costs a few dozen cell
# evaluations per input, from the same zero start and with the same Anderson rule for every
# input. HyperAnderson adds two small networks:
#
# * an **initialiser** $z^{[0]} = h_\phi(u)$ from the injected input $u$;
# * an **update network** that, from scale-free features of the recent residuals, predicts a
#   correction to the least-squares Anderson weights $\alpha$ and a damping $\beta_k$:
#   $z_{k+1} = \sum_i \alpha_i f(z_i) - (1 - \beta_k)\sum_i \alpha_i g_i$,
#   $g_i = f(z_i) - z_i$.
#
# `dk.train_hyper_solver` unrolls $k$ solver steps from $h_\phi(u)$ (in deqkit's iteration
# engine, as any solve) and minimises the sum of the relative residuals along the way plus
# the distance of $z^{[0]}$ to the equilibrium;
# only the solver's parameters move. A safeguard rejects steps that do not lower the residual,
# so a poorly trained solver cannot do worse than plain iteration on a contraction.
#
# The DEQ here is a tanh cell with a spectrally normalised weight ($\|W\|_2 \le 0.95$, a
# slow contraction) standing in for a trained model.

# %%
d, batch = (16, 32) if SMALL else (64, 128)


class Cell(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = dk.nn.spectral_norm(nn.Linear(d, d), bound=0.95)

    def forward(self, z, u):
        return torch.tanh(self.lin(z) + u)


cell = Cell(d).requires_grad_(False)
deq = dk.nn.DEQ(cell, solver=dk.Anderson(rtol=1e-4, atol=0), max_steps=100)
train_inputs = [torch.randn(batch, d) for _ in range(8)]
test_input = torch.randn(4 * batch, d)

solver = dk.HyperAnderson((d,), rtol=1e-4, atol=0)
out = dk.train_hyper_solver(deq, train_inputs, solver, steps=40 if SMALL else 400, k=8)
print(f"solver training: loss {out['loss'][0]:.3f} -> {out['loss'][-1]:.3f} "
      f"({out['parameters']} parameters, {out['time_s']:.1f} s)")

# %% [markdown]
# Compare the number of cell evaluations to reach the same tolerance on unseen inputs.

# %%
with torch.no_grad():
    zero = torch.zeros_like(test_input)
    classic = dk.fixed_point(cell, zero, dk.Anderson(rtol=1e-4, atol=0), args=(test_input,),
                             max_steps=100)
    learned = dk.fixed_point(cell, solver.initial_state(test_input), solver,
                             args=(test_input,), max_steps=100)
hyper_agreement = (learned.value - classic.value).norm().item() / classic.value.norm().item()
for name, s in (("Anderson from 0", classic), ("HyperAnderson", learned)):
    print(f"{name:16s}: {s.result.name}, steps mean {s.stats['nstep'].float().mean():.1f}, "
          f"max {int(s.stats['nstep'].max())}")
print(f"relative difference between the two equilibria: {hyper_agreement:.1e}")

# %% [markdown]
# Both solvers reach the same equilibrium (up to the tolerance). On this small, quickly
# contracting cell the learned solver saves little: plain Anderson already needs under ten
# steps, and the run above used a short training budget. The gains reported in the HyperDEQ
# paper come from large models whose solves take tens of steps, where a good initial state
# removes most of them; `benchmarks/bench_hyperdeq.py` measures HyperAnderson against a grid
# of tuned Anderson settings on a trained `ConvDEQ`, with the parameter and training-time
# cost of the learned solver, and the wall time of each solve beside its f evaluations
# (a learned step costs more than a plain Anderson step, so fewer f evaluations are only
# part of the story).
