r"""HyperAnderson: learned Anderson acceleration with a learned initialiser, as a deqkit solver.

Bai, Koltun, Kolter, "Neural Deep Equilibrium Solvers", ICLR 2022. The solver implements the
engine's protocol (:meth:`HyperAnderson.init`, :meth:`HyperAnderson.step`), so a solve with it
is an ordinary :func:`deqkit.fixed_point` call: stopping, statistics and batch compaction are
the engine's. Its mixing weights start from the core's least-squares weights
(:func:`deqkit.solvers.anderson.anderson_weights`); the networks are built in
:mod:`deqkit.hyperdeq.networks` and trained by :mod:`deqkit.hyperdeq.train`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

from ..solvers._base import AbstractFixedPointSolver, FlatFn, put_slot
from ..solvers._buffers import BufferPool, Lease, reusable
from ..solvers.anderson import anderson_weights
from . import networks
from ._state import Attachment, HyperState, gram_update
from .settings import check_settings, state_shape_of

_OWNER = "HyperAnderson"


class HyperAnderson(nn.Module, AbstractFixedPointSolver):
    r"""Learnable Anderson acceleration with a learned initialiser (HyperDEQ).

    Bai, Koltun, Kolter, "Neural Deep Equilibrium Solvers", ICLR 2022. Two small networks
    are attached to a frozen DEQ :math:`z = f(z, x)`:

    * the **initialiser** predicts the initial state from the injected input,
      :math:`z^{[0]} = h_\phi(x)`: a depthwise 3x3 convolution (spatial states), a
      pointwise two-layer network (1x1 convolutions, ReLU) from the injection's channels to
      the state's channels, and optionally a GroupNorm (:meth:`initial_state`); or, with
      ``init_layers``, a stack of 3x3 convolution (optionally depthwise-separable) + GroupNorm
      + ReLU layers and a final 1x1 convolution;
    * the **update network** :math:`s_\xi` (optional, ``hidden``) predicts, per sample and
      per step, a correction
      :math:`\Delta\alpha` to the classical Anderson weights and a damping
      :math:`\beta \in (0, \beta_{\max})`. With :math:`G = [g_{k-n+1}, \dots, g_k]`,
      :math:`g_i = f(z_i) - z_i`, the :math:`n \le m` most recent residuals:

    .. math::
        \alpha^{\text{LS}} = \arg\min_{\mathbf 1^\top\alpha = 1}\|G^\top\alpha\|^2, \qquad
        (\delta, \beta_k) = s_\xi\big(\phi(G), k\big), \qquad
        \alpha = \alpha^{\text{LS}} + \delta - \tfrac1n \mathbf 1 \mathbf 1^\top\delta,

    .. math::
        z_{k+1} = \sum_i \alpha_i f(z_i) - (1 - \beta_k) \sum_i \alpha_i g_i .

    The features :math:`\phi(G)` are scale-free: the cosines between the residuals, the log
    ratios of their norms to the newest one, :math:`\operatorname{asinh}\alpha^{\text{LS}}`,
    the log relative residual, the step index, and a learned compression of each residual
    (a linear projection of its channels to ``features`` channels, then the mean and RMS over
    the remaining positions, normalised by the newest residual's RMS). The last layer of the
    update network starts at zero, so an untrained solver is Anderson with damping
    ``beta_init``; without ``init_groups`` the initialiser starts at zero (the usual zero
    start).

    **Preconditioner** (optional, ``precondition``; a deqkit extension of the paper): the
    residuals are rescaled entrywise before they enter the Anderson history,

    .. math::
        P(g) = \exp\big(a \odot \mathbb 1_{\text{active}} + b\big) \odot g, \qquad
        (a - a_0, b) = p_\eta\big(\log_{10}\tfrac{\|g\|}{\|f(z)\|}, k,
        \text{active fraction}\big),

    per channel, with :math:`a_0 = -\log(1 - \kappa)` learned per channel (``precondition``
    is :math:`\kappa`) and :math:`p_\eta` a small network whose last layer starts at zero,
    and Anderson runs on :math:`z \mapsto z + P(f(z) - z)` (same fixed points). The active
    entries (:meth:`active`) are those of :math:`f(z)` away from their channel's floor: for a
    cell ending in ReLU and GroupNorm (such as :class:`~deqkit.zoo.ConvDEQ`'s), the switched
    off units sit at the floor and :math:`f` is locally constant in them (zero rows of the
    Jacobian), while the rest of the Jacobian has eigenvalues near a common :math:`\lambda`
    (real, 0.6-0.8, on the trained digits ConvDEQ of ``benchmarks/bench_hyperdeq.py``); scaling
    those residuals by :math:`1/(1 - \kappa)`, :math:`\kappa \approx \lambda`, is a diagonal
    Newton step. The first step stays a plain step :math:`f(z^{[0]})`. ``precondition=0``
    starts exactly as plain (learned) Anderson.

    With ``precondition_groups`` (the groups of the cell's final GroupNorm) the gain spares
    the one direction per group that the GroupNorm maps to zero. Write the cell's end as
    :math:`f = \gamma \odot \hat y + \beta`, :math:`\hat y` the group-standardised
    :math:`y = \mathrm{ReLU}(\cdot)`; its Jacobian is :math:`\frac{\gamma}{\sigma}(I -
    \tfrac1n \mathbf 1 \mathbf 1^\top - \tfrac1n \hat y \hat y^\top)` per group, and
    the only direction supported on the active units that it sends to zero is :math:`y`
    itself (zero off the active units), i.e. per channel the distance :math:`h` of
    :math:`f(z)` from its floor, up to the channel's scale :math:`|\gamma_c|`. A gain
    :math:`1/(1-\kappa)` on that direction (eigenvalue ~0, not :math:`\kappa`) overshoots
    it by :math:`\kappa/(1-\kappa)` at every step, which stalls the solve a few steps in. So

    .. math::
        P(g) = e^{b} \odot \big(g + (e^{a} - 1) \odot \Pi_h(\mathbb 1_{\text{active}}
        \odot g)\big), \qquad \Pi_h x = x - \frac{\langle x, h\rangle}{\|h\|^2} h
        \ \text{per group},

    which equals the form above without the projection; it adds no parameters. On the digits
    ConvDEQ of ``benchmarks/bench_hyperdeq.py`` it removes the stall: the trained solver needs
    1.7-2.1 f evaluations fewer to 1e-3 and 2.3-3.1 fewer to 1e-4 (seeds 0 and 1) than the
    same weights without it.

    **Safeguard** (on by default): a step whose residual :math:`\|f(z_k) - z_k\|` is not below
    ``safeguard`` times the lowest residual seen so far for that sample is rejected and
    replaced by a plain step from the best iterate, :math:`z_{k+1} = f(z_{\text{best}})`.
    On an :math:`L`-contraction that step shrinks the best residual by :math:`L`, and with
    ``safeguard=1`` every accepted step lowers it, so a badly trained network cannot stall
    or diverge where plain iteration converges.

    Stopping, statistics and batch compaction are the driver's, as for every deqkit solver
    (per-sample test :math:`\|f(z)-z\| \le \text{atol} + \text{rtol}\|f(z)\|`); the state is
    batch-first. :meth:`step` is out-of-place differentiable when grad is enabled, so the
    solver can be unrolled (:class:`~deqkit.UnrolledAdjoint`) and trained with
    :func:`train_hyper_solver`. The solver is an ``nn.Module``: move it with ``.to()``.

    Args:
        state_shape: per-sample state shape, channels first, e.g. ``(32, 8, 8)`` for a
            :class:`~deqkit.zoo.ConvDEQ` on digits or ``(128,)`` for a
            :class:`~deqkit.zoo.DEQMLP`.
        in_channels: channels of the injected input given to :meth:`initial_state` (its
            other dimensions must match the state's). Default: ``state_shape[0]``.
        rtol: relative tolerance. Default: 1e-5.
        atol: absolute tolerance. Default: 1e-7.
        m: memory (number of past iterates mixed). Default: 5.
        features: channels of the learned residual compression :math:`p`. Default: 2.
        hidden: width of the update network's hidden layer, or ``None`` for no update network
            (the least-squares Anderson weights :math:`\alpha^{\text{LS}}` and the fixed
            damping ``beta_init``: what an untrained update network computes, at no parameter
            cost; e.g. when only the initialiser and the preconditioner are trained).
            Default: 16.
        init_hidden: hidden channels of the initialiser (``None``: a single linear 1x1 map).
            Default: 32.
        init_depthwise: start the initialiser with a depthwise 3x3 convolution (states with
            spatial dimensions only). Default: True.
        init_layers: if > 0, the initialiser is instead a stack of this many 3x3
            convolutions (``init_hidden`` channels, each followed by a GroupNorm and a ReLU;
            1x1 for vector states) and a final 1x1 convolution to the state's channels: more
            capacity for a better initial state, at a few thousand parameters per layer.
            Requires ``init_hidden``. Default: 0 (the depthwise + pointwise initialiser).
        init_separable: with ``init_layers``, make each 3x3 convolution depthwise-separable
            (a depthwise 3x3 then a 1x1 convolution): about ``9 c + c h + h`` parameters per
            layer instead of ``9 c h + h``, i.e. 1,440 instead of 9,312 (with the GroupNorm)
            for 32 channels. Default: False.
        init_groups: end the initialiser with a GroupNorm of this many groups (matches a
            GroupNorm-ed state such as ConvDEQ's); ``None``: no norm, and the initialiser
            starts at zero. Default: None.
        beta_init: initial damping predicted by the untrained network, in
            (0, ``beta_max``). Default: 0.9.
        beta_max: upper bound of the predicted damping (:math:`\beta = \beta_{\max}
            \sigma(\cdot)`); with ``beta_max=2`` and ``beta_init=1`` the untrained solver is
            undamped Anderson and training may move :math:`\beta` either way. Default: 1.0.
        safeguard: reject a step whose residual is not below this multiple of the lowest
            residual so far (>= 1), or ``None`` to disable. Default: 1.0.
        regularisation: relative Tikhonov regulariser of the least-squares system.
            Default: 1e-8.
        precondition: :math:`\kappa \in [0, 1)`, the initial gain of the learned residual
            preconditioner (see above), or ``None`` for none. A rejecting ``safeguard`` of 1
            can cut the preconditioned steps short; 2 works better with it. Default: None.
        precondition_hidden: hidden width of the preconditioner's network. Default: 8.
        precondition_groups: groups of the cell's final GroupNorm: the preconditioner then
            leaves, per group, the direction of the distance from the floor unscaled (see
            above); ``None``: no projection. Must divide the state channels. Default: None.
        fast_inference: when autograd is off, run :meth:`step`'s inference path (the same
            iteration with fewer passes over the state and the history updated in place;
            equal up to float rounding). ``False`` keeps the differentiable path also for
            inference (e.g. to compare). Default: True.

    Example:
        >>> import torch
        >>> import deqkit as dk
        >>> from deqkit.hyperdeq import HyperAnderson
        >>> _ = torch.manual_seed(0)
        >>> W = torch.randn(6, 6)
        >>> W = 0.8 * W / torch.linalg.matrix_norm(W, 2)
        >>> x = torch.randn(4, 6)
        >>> solver = HyperAnderson((6,), rtol=1e-6, atol=0)
        >>> with torch.no_grad():
        ...     sol = dk.fixed_point(lambda z, u: torch.tanh(z @ W.T + u),
        ...                          solver.initial_state(x), solver=solver, args=(x,))
        >>> sol.result, bool(sol.stats["rel_residual"].max() <= 1e-6)
        (<RESULTS.successful: 0>, True)

        The compact configuration of ``benchmarks/bench_hyperdeq.py`` for a
        :class:`~deqkit.zoo.ConvDEQ` state (32 channels, GroupNorm with 8 groups): a depthwise
        + pointwise initialiser, the projected preconditioner, no update network.

        >>> small = HyperAnderson((32, 8, 8), init_hidden=None, init_groups=8, hidden=None,
        ...                       precondition=0.7, precondition_groups=8,
        ...                       precondition_hidden=4, beta_init=1.0, beta_max=2.0,
        ...                       safeguard=2.0)
        >>> sum(p.numel() for p in small.parameters())
        1808
    """

    supports_unrolled = True

    def __init__(
        self,
        state_shape: tuple[int, ...] | int,
        in_channels: int | None = None,
        *,
        rtol: float = 1e-5,
        atol: float = 1e-7,
        m: int = 5,
        features: int = 2,
        hidden: int | None = 16,
        init_hidden: int | None = 32,
        init_depthwise: bool = True,
        init_layers: int = 0,
        init_separable: bool = False,
        init_groups: int | None = None,
        beta_init: float = 0.9,
        beta_max: float = 1.0,
        safeguard: float | None = 1.0,
        regularisation: float = 1e-8,
        precondition: float | None = None,
        precondition_hidden: int = 8,
        precondition_groups: int | None = None,
        fast_inference: bool = True,
    ) -> None:
        super().__init__()
        shape = state_shape_of(state_shape)
        in_channels = shape[0] if in_channels is None else in_channels
        check_settings(
            shape, in_channels, rtol=rtol, atol=atol, m=m, features=features, hidden=hidden,
            init_hidden=init_hidden, init_layers=init_layers, init_groups=init_groups,
            beta_init=beta_init, beta_max=beta_max, safeguard=safeguard,
            regularisation=regularisation, precondition=precondition,
            precondition_hidden=precondition_hidden, precondition_groups=precondition_groups,
        )
        self.state_shape = shape
        self.channels, self.positions = shape[0], math.prod(shape[1:])
        self.in_channels = in_channels
        self.rtol, self.atol = float(rtol), float(atol)
        self.m, self.features = m, features
        self.beta_init, self.beta_max = float(beta_init), float(beta_max)
        self.safeguard = None if safeguard is None else float(safeguard)
        self.regularisation = float(regularisation)
        self.fast_inference = bool(fast_inference)
        self.init_map = networks.initialiser(
            shape, in_channels, hidden=init_hidden, depthwise=init_depthwise,
            layers=init_layers, separable=init_separable, groups=init_groups,
        )
        # Update network (None: least-squares Anderson weights, damping fixed at beta_init).
        self.compress: nn.Linear | None = None
        self.update_net: nn.Sequential | None = None
        if hidden is not None:
            self.compress, self.update_net = networks.update_network(
                self.channels, m, features, hidden, self.beta_init, self.beta_max
            )
        self.register_buffer("_triu", torch.triu_indices(m, m, offset=1), persistent=False)
        # Learned diagonal preconditioner of the residuals (see the class docstring).
        self.precondition = None if precondition is None else float(precondition)
        self.precondition_groups = precondition_groups
        self.pre_gain: nn.Parameter | None = None
        self.pre_net: nn.Sequential | None = None
        if precondition is not None:
            self.pre_gain, self.pre_net = networks.preconditioner(
                self.channels, float(precondition), precondition_hidden
            )

    # ------------------------------------------------------------------ initialiser
    def initial_state(self, x: Tensor, *rest: Any) -> Tensor:
        r"""Predicted initial state :math:`z^{[0]} = h_\phi(x)` from the injected input.

        Args:
            x: injection, ``(B, in_channels, *spatial)`` with the state's spatial shape.
            *rest: further DEQ inputs (ignored), so this can stand in for a cell's
                ``init_state(*inputs)``.

        Returns:
            ``(B, *state_shape)``, in ``x``'s dtype.
        """
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[1] != self.in_channels:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{_OWNER}.initial_state: expected an injection of shape "
                f"(B, {self.in_channels}, ...), got {got}."
            )
        h = x.to(self.init_map[0].weight.dtype)
        h = self.init_map(h.unsqueeze(-1) if h.dim() == 2 else h)
        z = h.squeeze(-1) if x.dim() == 2 else h
        if tuple(z.shape[1:]) != self.state_shape:
            raise ValueError(
                f"{_OWNER}.initial_state: the injection {tuple(x.shape)} maps to a state "
                f"{tuple(z.shape[1:])}, not {self.state_shape}; spatial shapes must match."
            )
        return z.to(x.dtype)

    def attach(self, deq: nn.Module) -> Attachment:
        """Use this solver and its initialiser in a :class:`deqkit.nn.DEQ` layer.

        Runs ``deq`` with ``solver=self`` and ``init_state=self.initial_state`` through
        :meth:`deqkit.nn.DEQ.overrides`, so ``deq(x)`` (and e.g. ``ConvDEQ.forward``) starts
        from the predicted state. The solver is *not* registered as a submodule (the model's
        ``parameters()`` and ``state_dict`` are unchanged). Returns a handle whose
        ``remove()`` restores the previous solver and initial state; it is also a context
        manager (restoring them when the block ends, also on an exception).

        Example:
            >>> import torch, deqkit as dk
            >>> layer = dk.nn.DEQ(lambda z, x: torch.tanh(0.5 * z + x))
            >>> solver = HyperAnderson((3,), rtol=1e-6)
            >>> with torch.no_grad(), solver.attach(layer):
            ...     _ = layer(torch.randn(2, 3))
            ...     layer.solver is solver
            True
            >>> type(layer.solver).__name__
            'Anderson'
        """
        overrides = getattr(deq, "overrides", None)
        if not callable(overrides) or not hasattr(deq, "cell"):
            raise TypeError(
                f"{_OWNER}.attach: expected a deqkit.nn.DEQ layer (e.g. model.deq), got "
                f"{type(deq).__name__}."
            )
        return Attachment(overrides(solver=self, init_state=self.initial_state))

    # ------------------------------------------------------------------ protocol
    def init(self, fn: FlatFn, z: Tensor, fz: Tensor, r: Tensor, max_steps: int) -> HyperState:
        w, d = z.shape
        if d != self.channels * self.positions:
            raise ValueError(
                f"{_OWNER}: the flat state has {d} entries per sample but state_shape "
                f"{self.state_shape} has {self.channels * self.positions}."
            )
        m = self.m
        if self.fast_inference and not torch.is_grad_enabled():
            # (only the n <= m written slots are ever read: no zero fill on this path)
            (F, G, work), lease = self._inference_buffers(w, d, z, fz)
        else:
            lease, work = None, None
            F, G = z.new_zeros(w, m, d), z.new_zeros(w, m, d)
        return HyperState(
            F=F,
            G=G,
            H=torch.zeros(w, m, m, dtype=torch.float64, device=z.device),
            Q=z.new_zeros(w, m, 2 * self.features),
            best=z.new_full((w,), math.inf),
            fz_best=fz,
            k=0,
            work=work,
            lease=lease,
        )

    def _inference_buffers(self, w: int, d: int, z: Tensor, fz: Tensor
                           ) -> tuple[tuple[Tensor, Tensor, Tensor | None], Lease | None]:
        """The inference path's history and scratch buffers ``(F, G, work)`` and their lease:
        those of the last finished solve of the same width, dtype and device where
        :func:`~deqkit.solvers._buffers.reusable` (~11,000 minor faults, ~20 ms of system
        time per solve of the 250-sample ``benchmarks/bench_hyperdeq.py`` solve without
        reuse); a solve nested in another one's f gets fresh ones."""
        key = (w, d, self.m, z.dtype, z.device, torch.is_inference_mode_enabled(),
               self.pre_gain is not None)  # (inference tensors are read-only outside it)

        def make() -> tuple[Tensor, Tensor, Tensor | None]:
            return (z.new_empty(w, self.m, d), z.new_empty(w, self.m, d),
                    z.new_empty(4, w, d) if key[-1] else None)

        if not reusable(z, fz):
            return make(), None
        return self.__dict__.setdefault("_buffer_pool", BufferPool()).lease(key, make)

    def step(
        self, fn: FlatFn, z: Tensor, fz: Tensor, r: Tensor, state: HyperState
    ) -> tuple[Tensor, Tensor | None, HyperState]:
        if self.fast_inference and not torch.is_grad_enabled():
            return self._step_inference(z, fz, r, state)
        m, k = self.m, state.k
        slot, n = k % m, min(k + 1, m)
        absr = torch.linalg.vector_norm(r, dim=1)
        if self.pre_gain is not None and self.pre_net is not None and k > 0:
            # (the first step stays a plain step f(z0))
            g = networks.precondition(self.pre_gain, self.pre_net, fz, r, absr, k,
                                      self.precondition_groups)
            fg, absg = z + g, torch.linalg.vector_norm(g, dim=1)
        else:
            g, fg, absg = r, fz, absr
        Fb, Gb = put_slot(state.F, slot, fg), put_slot(state.G, slot, g)
        Qb = state.Q
        if self.compress is not None:
            q = networks.compress_residual(self.compress.weight, g, self.channels,
                                           self.positions)
            Qb = put_slot(Qb, slot, q.to(Qb.dtype))
        H = gram_update(state.H, Gb[:, :n], g, slot)
        # Safeguard bookkeeping (per sample): reject a step that raised the residual.
        reject = None if k == 0 or self.safeguard is None else \
            ~(absr < self.safeguard * state.best)  # strict: no stalling
        improved = absr < state.best
        best = torch.where(improved, absr, state.best).detach()
        fz_best = torch.where(improved.unsqueeze(1), fz, state.fz_best)
        # The core's least-squares Anderson weights over the n valid slots (float64, detached).
        Hd = H.detach()
        alpha_ls = anderson_weights(Hd[:, :n, :n], slot, self.regularisation).squeeze(1)
        if self.update_net is None:  # least-squares weights, fixed damping
            alpha, beta = alpha_ls.to(z.dtype), self.beta_init
        else:
            perm = torch.tensor([(slot - j) % m for j in range(n)], device=z.device)
            feats = networks.update_features(Hd, Qb.detach(), alpha_ls, perm, absr, absg, fz,
                                             k, self._triu, self.compress.weight.dtype)
            alpha, beta = networks.learned_weights(self.update_net(feats), alpha_ls, perm,
                                                   self.beta_max, z.dtype)
        mix_f = torch.bmm(alpha.unsqueeze(1), Fb[:, :n]).squeeze(1)
        mix_g = torch.bmm(alpha.unsqueeze(1), Gb[:, :n]).squeeze(1)
        z_next = mix_f - (1.0 - beta) * mix_g
        if reject is not None:
            z_next = torch.where(reject.unsqueeze(1), state.fz_best, z_next)
        new_state = dataclasses.replace(
            state, F=Fb, G=Gb, H=H, Q=Qb, best=best, fz_best=fz_best, k=k + 1
        )
        return z_next, None, new_state

    def _step_inference(
        self, z: Tensor, fz: Tensor, r: Tensor, state: HyperState
    ) -> tuple[Tensor, Tensor | None, HyperState]:
        """:meth:`step` without autograd (``fast_inference``): the same iteration with fewer
        passes over the (W, D) state. The preconditioned residual is written straight into
        its history slot (:func:`networks.precondition_into`), the Gram row is one batched
        vector-matrix product (no (W, m, D) temporary), the damping term is skipped when
        ``beta == 1``, and on the CPU (where reading a flag costs no device sync) the
        safeguard's full-width ``where`` runs only when some sample rejects a step or fails
        to improve. The state is updated in place."""
        m, k = self.m, state.k
        slot, n = k % m, min(k + 1, m)
        full = n == m
        F, G = state.F, state.G
        absr = torch.linalg.vector_norm(r, dim=1)
        if self.pre_gain is not None and self.pre_net is not None and k > 0:
            g = networks.precondition_into(self.pre_gain, self.pre_net, fz, r, absr, k,
                                           self.precondition_groups, G[:, slot],
                                           state.work)
            torch.add(z, g, out=F[:, slot])
            absg = None if self.update_net is None else torch.linalg.vector_norm(g, dim=1)
        else:
            F[:, slot].copy_(fz)
            G[:, slot].copy_(r)
            g, absg = r, absr
        if self.compress is not None:
            q = networks.compress_residual(self.compress.weight, g, self.channels,
                                           self.positions)
            state.Q[:, slot].copy_(q.to(state.Q.dtype))
        Gn = G if full else G[:, :n]
        row = torch.matmul(g.unsqueeze(1), Gn.transpose(1, 2)).squeeze(1)  # (W, n)
        row = row.to(torch.float64)
        H = state.H
        H[:, slot, :n] = row
        H[:, :n, slot] = row
        # Safeguard bookkeeping (per sample): reject a step that raised the residual.
        host = z.device.type == "cpu"  # a flag read is free there
        reject = None if k == 0 or self.safeguard is None else \
            ~(absr < self.safeguard * state.best)
        if reject is not None and host and not bool(reject.any()):
            reject = None
        improved = absr < state.best
        if host and bool(improved.all()):
            state.fz_best = fz
        else:
            state.fz_best = torch.where(improved.unsqueeze(1), fz, state.fz_best)
        state.best = torch.where(improved, absr, state.best)
        Fn = F if full else F[:, :n]
        if self.update_net is None:  # least-squares weights, fixed damping
            beta: Any = self.beta_init
            if n == 1:
                alpha = None
            else:
                alpha = anderson_weights(H if full else H[:, :n, :n], slot,
                                         self.regularisation).to(z.dtype)
        else:
            alpha_ls = anderson_weights(H[:, :n, :n], slot, self.regularisation).squeeze(1)
            perm = torch.tensor([(slot - j) % m for j in range(n)], device=z.device)
            feats = networks.update_features(H, state.Q, alpha_ls, perm, absr, absg, fz, k,
                                             self._triu, self.compress.weight.dtype)
            a2, beta = networks.learned_weights(self.update_net(feats), alpha_ls, perm,
                                                self.beta_max, z.dtype)
            alpha = a2.unsqueeze(1)
        if alpha is None:  # one slot: its weight is 1
            z_next = F[:, slot] if beta == 1.0 else F[:, slot] - (1.0 - beta) * G[:, slot]
            z_next = z_next.clone() if beta == 1.0 else z_next
        else:
            z_next = torch.bmm(alpha, Fn).squeeze(1)
            if not (isinstance(beta, float) and beta == 1.0):
                z_next = z_next - (1.0 - beta) * torch.bmm(alpha, Gn).squeeze(1)
        if reject is not None:
            z_next = torch.where(reject.unsqueeze(1), state.fz_best, z_next)
        state.k = k + 1
        return z_next, None, state

    def active(self, fz: Tensor) -> Tensor:
        """(W, D) -> (W, C, P) float mask of the entries away from their channel's floor.

        Per sample and channel, the *floor* is the end of the channel's range (over the
        positions) where more entries sit (within ``1e-3`` of the range); an entry of
        :math:`f(z)` is *active* when it is further than that from the floor. For a cell
        ending in a ReLU and a GroupNorm, the units whose ReLU is off all sit at the floor
        (the minimum for a positive GroupNorm weight), so this flags the units where the map
        is not locally constant. Vector states (one position) have no active entries.

        Example:
            >>> import torch
            >>> solver = HyperAnderson((2, 3))
            >>> fz = torch.tensor([[0.0, 0.0, 2.0, 1.0, 1.0, 1.0]])  # (1, C * P)
            >>> solver.active(fz)  # channel 0: one unit above its floor; channel 1: constant
            tensor([[[0., 0., 1.],
                     [0., 0., 0.]]])
        """
        return networks.floor_distance(fz, self.channels, self.positions)[0]

    def extra_repr(self) -> str:
        return (
            f"state_shape={self.state_shape}, m={self.m}, rtol={self.rtol}, atol={self.atol}, "
            f"safeguard={self.safeguard}, precondition={self.precondition}"
        )


__all__ = ["HyperAnderson"]
