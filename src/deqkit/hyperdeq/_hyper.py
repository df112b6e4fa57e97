r"""HyperDEQ: a learned initialiser and a learned Anderson acceleration for a frozen DEQ.

Bai, Koltun, Kolter, "Neural Deep Equilibrium Solvers", ICLR 2022. A small network predicts
the initial state :math:`z^{[0]}` from the injected input, and another one, from the recent
residuals, predicts per-sample Anderson mixing weights and a damping at every step; both are
trained on the *solver's* quality (residuals along an unrolled solve) with the DEQ frozen.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_float, check_int, check_tolerances
from .._fixed_point import fixed_point
from ..solvers._base import AbstractFixedPointSolver, FlatFn, put_slot
from ..solvers.anderson import Anderson, anderson_weights

_OWNER = "HyperAnderson"
_TAU = 0.25  # smoothing (decades) of the hinge of train_hyper_solver(loss="tolerance")


@dataclasses.dataclass
class _HyperState:
    F: Tensor  # (W, m, D) past f(z_i)
    G: Tensor  # (W, m, D) past residuals g_i = f(z_i) - z_i
    H: Tensor  # (W, m, m) Gram matrix G G^T, float64
    Q: Tensor  # (W, m, 2p) compressed residuals (mean and RMS of the learned projection)
    best: Tensor  # (W,) lowest residual norm so far
    fz_best: Tensor  # (W, D) f at the lowest-residual iterate (the safeguard's fallback step)
    k: int = dataclasses.field(default=0, metadata={"batch": False})


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
    ) -> None:
        super().__init__()
        if isinstance(state_shape, int) and not isinstance(state_shape, bool):
            state_shape = (state_shape,)
        try:
            shape = tuple(state_shape)
        except TypeError:
            shape = ()
        if not shape or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape
        ):
            raise ValueError(
                f"{_OWNER}: `state_shape` must be the per-sample state shape (channels first), "
                f"a tuple of positive ints such as (32, 8, 8) or (128,), got {state_shape!r}."
            )
        check_tolerances(_OWNER, rtol, atol)
        check_int(_OWNER, "m", m)
        check_int(_OWNER, "features", features)
        check_int(_OWNER, "hidden", hidden, none=True)
        check_int(_OWNER, "init_hidden", init_hidden, none=True)
        check_int(_OWNER, "init_layers", init_layers, 0)
        if init_layers and init_hidden is None:
            raise ValueError(f"{_OWNER}: `init_layers` > 0 needs `init_hidden` (the width).")
        _check_groups("init_groups", init_groups, shape[0])
        if len(shape) > 4:
            raise ValueError(f"{_OWNER}: at most 3 spatial dimensions, got {shape!r}.")
        if in_channels is None:
            in_channels = shape[0]
        check_int(_OWNER, "in_channels", in_channels)
        check_float(_OWNER, "beta_max", beta_max, gt=0)
        check_float(_OWNER, "beta_init", beta_init, gt=0, lt=beta_max,
                    example=f"0.9 (below beta_max={beta_max})")
        check_float(_OWNER, "safeguard", safeguard, ge=1, none=True)
        check_float(_OWNER, "regularisation", regularisation, ge=0)
        check_float(_OWNER, "precondition", precondition, ge=0, lt=1, none=True)
        check_int(_OWNER, "precondition_hidden", precondition_hidden)
        _check_groups("precondition_groups", precondition_groups, shape[0])
        self.state_shape = shape
        self.channels = shape[0]
        self.positions = math.prod(shape[1:])
        self.in_channels = in_channels
        self.rtol = float(rtol)
        self.atol = float(atol)
        self.m = m
        self.features = features
        self.beta_init = float(beta_init)
        self.beta_max = float(beta_max)
        self.safeguard = None if safeguard is None else float(safeguard)
        self.regularisation = float(regularisation)

        # Initialiser on channels-first tensors (vector states are (B, C, 1) signals).
        conv = (nn.Conv1d, nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(shape) - 1]
        layers: list[nn.Module] = []
        if init_layers:
            assert init_hidden is not None
            ks = 3 if len(shape) > 1 else 1
            hg = math.gcd(init_hidden, init_groups or 8)
            c_in = in_channels
            for _ in range(init_layers):
                if init_separable:  # depthwise 3x3, then a pointwise channel mix
                    if ks > 1:
                        layers.append(conv(c_in, c_in, ks, padding=ks // 2, groups=c_in))
                    layers.append(conv(c_in, init_hidden, 1))
                else:
                    layers.append(conv(c_in, init_hidden, ks, padding=ks // 2))
                layers += [nn.GroupNorm(hg, init_hidden), nn.ReLU()]
                c_in = init_hidden
        else:
            if init_depthwise and len(shape) > 1:
                layers.append(conv(in_channels, in_channels, 3, padding=1, groups=in_channels))
            if init_hidden is not None:
                layers += [conv(in_channels, init_hidden, 1), nn.ReLU()]
        layers.append(conv(init_hidden or in_channels, self.channels, 1))
        if init_groups is not None:
            layers.append(nn.GroupNorm(init_groups, self.channels))
        else:  # zero start until trained
            nn.init.zeros_(layers[-1].weight)
            nn.init.zeros_(layers[-1].bias)
        self.init_map = nn.Sequential(*layers)
        # Update network (None: least-squares Anderson weights, damping fixed at beta_init).
        self.compress: nn.Linear | None = None
        self.update_net: nn.Sequential | None = None
        if hidden is not None:
            self.compress = nn.Linear(self.channels, features, bias=False)
            n_in = m + (m - 1) + m * (m - 1) // 2 + m + 2 * features * m + 2
            self.update_net = nn.Sequential(
                nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, m + 1)
            )
            out = self.update_net[2]
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
            with torch.no_grad():
                out.bias[m] = math.log(self.beta_init / (self.beta_max - self.beta_init))
        iu = torch.triu_indices(m, m, offset=1)
        self.register_buffer("_triu", iu, persistent=False)
        # Learned diagonal preconditioner of the residuals (see the class docstring).
        self.precondition = None if precondition is None else float(precondition)
        self.precondition_groups = precondition_groups
        self.pre_gain: nn.Parameter | None = None
        self.pre_net: nn.Sequential | None = None
        if precondition is not None:
            self.pre_gain = nn.Parameter(
                torch.full((self.channels,), -math.log1p(-float(precondition)))
            )
            self.pre_net = nn.Sequential(
                nn.Linear(3, precondition_hidden), nn.GELU(),
                nn.Linear(precondition_hidden, 2 * self.channels),
            )
            nn.init.zeros_(self.pre_net[2].weight)
            nn.init.zeros_(self.pre_net[2].bias)

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

    def attach(self, deq: nn.Module) -> _Attachment:
        """Use this solver and its initialiser in a :class:`deqkit.nn.DEQ` layer.

        Sets ``deq.solver`` to this solver and overrides ``deq.init_state`` with
        :meth:`initial_state`, so ``deq(x)`` (and e.g. ``ConvDEQ.forward``) starts from the
        predicted state. The solver is *not* registered as a submodule (the model's
        ``parameters()`` and ``state_dict`` are unchanged). Returns a handle whose
        ``remove()`` restores the previous solver and initial state; it is also a context
        manager.
        """
        if not hasattr(deq, "solver") or not hasattr(deq, "cell"):
            raise TypeError(
                f"{_OWNER}.attach: expected a deqkit.nn.DEQ layer (e.g. model.deq), got "
                f"{type(deq).__name__}."
            )
        return _Attachment(deq, self)

    # ------------------------------------------------------------------ protocol
    def init(self, fn: FlatFn, z: Tensor, fz: Tensor, r: Tensor, max_steps: int) -> _HyperState:
        w, d = z.shape
        if d != self.channels * self.positions:
            raise ValueError(
                f"{_OWNER}: the flat state has {d} entries per sample but state_shape "
                f"{self.state_shape} has {self.channels * self.positions}."
            )
        m = self.m
        return _HyperState(
            F=z.new_zeros(w, m, d),
            G=z.new_zeros(w, m, d),
            H=torch.zeros(w, m, m, dtype=torch.float64, device=z.device),
            Q=z.new_zeros(w, m, 2 * self.features),
            best=z.new_full((w,), math.inf),
            fz_best=fz,
            k=0,
        )

    def _compress(self, r: Tensor) -> Tensor:
        """(W, D) -> (W, 2p): mean and RMS over positions of the learned channel projection."""
        assert self.compress is not None
        w = self.compress.weight
        g = r.to(w.dtype).view(r.shape[0], self.channels, self.positions)
        y = torch.einsum("pc,wcs->wps", w, g)
        return torch.cat([y.mean(2), y.square().mean(2).add(1e-30).sqrt()], dim=1)

    def step(
        self, fn: FlatFn, z: Tensor, fz: Tensor, r: Tensor, state: _HyperState
    ) -> tuple[Tensor, Tensor | None, _HyperState]:
        m = self.m
        k = state.k
        slot = k % m
        n = min(k + 1, m)
        absr = torch.linalg.vector_norm(r, dim=1)
        if self.pre_net is not None and k > 0:  # the first step stays a plain step f(z0)
            g = self._precondition(fz, r, absr, k)
            fg = z + g
            absg = torch.linalg.vector_norm(g, dim=1)
        else:
            g, fg, absg = r, fz, absr
        Fb = put_slot(state.F, slot, fg)
        Gb = put_slot(state.G, slot, g)
        Qb = state.Q
        if self.update_net is not None:
            Qb = put_slot(Qb, slot, self._compress(g).to(Qb.dtype))
        row = torch.linalg.vecdot(Gb[:, :n], g.unsqueeze(1)).to(torch.float64)  # (W, n)
        H = state.H
        if torch.is_grad_enabled() and (row.requires_grad or H.requires_grad):
            H = H.clone()
        H[:, slot, :n] = row
        H[:, :n, slot] = row

        # Safeguard bookkeeping (per sample): reject a step that raised the residual.
        if k == 0 or self.safeguard is None:
            reject = None
        else:
            reject = ~(absr < self.safeguard * state.best)  # strict: no stalling
        improved = absr < state.best
        best = torch.where(improved, absr, state.best).detach()
        fz_best = torch.where(improved.unsqueeze(1), fz, state.fz_best)

        # Classical least-squares weights over the n valid slots (float64, detached).
        Hd = H.detach()
        alpha_ls = anderson_weights(Hd[:, :n, :n], slot, self.regularisation).squeeze(1)

        if self.update_net is None:  # least-squares weights, fixed damping
            alpha = alpha_ls.to(z.dtype)
            beta: Tensor | float = self.beta_init
        else:
            # Features in age order (0 = newest), padded to m.
            perm = torch.tensor([(slot - j) % m for j in range(n)], device=z.device)
            feats = self._features(Hd, Qb.detach(), alpha_ls, perm, n, absr, absg, fz, k)
            out = self.update_net(feats)  # (W, m + 1)
            delta = out[:, :n]
            delta = delta - delta.mean(dim=1, keepdim=True)
            beta = (self.beta_max * torch.sigmoid(out[:, m])).to(z.dtype).unsqueeze(1)
            alpha_age = alpha_ls.index_select(1, perm).to(delta.dtype) + delta  # (W, n)
            # Back to slot order: slot perm[j] gets age j.
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(n, device=z.device)
            alpha = alpha_age.index_select(1, inv).to(z.dtype)
        mix_f = torch.bmm(alpha.unsqueeze(1), Fb[:, :n]).squeeze(1)
        mix_g = torch.bmm(alpha.unsqueeze(1), Gb[:, :n]).squeeze(1)
        z_next = mix_f - (1.0 - beta) * mix_g
        if reject is not None:
            z_next = torch.where(reject.unsqueeze(1), state.fz_best, z_next)
        new_state = dataclasses.replace(
            state, F=Fb, G=Gb, H=H, Q=Qb, best=best, fz_best=fz_best, k=k + 1
        )
        return z_next, None, new_state

    def active(self, fz: Tensor) -> Tensor:
        """(W, D) -> (W, C, P) float mask of the entries away from their channel's floor.

        Per sample and channel, the *floor* is the end of the channel's range (over the
        positions) where more entries sit (within ``1e-3`` of the range); an entry of
        :math:`f(z)` is *active* when it is further than that from the floor. For a cell
        ending in a ReLU and a GroupNorm, the units whose ReLU is off all sit at the floor
        (the minimum for a positive GroupNorm weight), so this flags the units where the map
        is not locally constant. Vector states (one position) have no active entries.
        """
        return self._floor_distance(fz)[0]

    def _floor_distance(self, fz: Tensor) -> tuple[Tensor, Tensor]:
        """(W, D) -> the active mask and the distance of each entry from its channel's floor
        (zero off the active entries), both (W, C, P)."""
        f = fz.detach().view(fz.shape[0], self.channels, self.positions)
        lo = f.amin(dim=2, keepdim=True)
        hi = f.amax(dim=2, keepdim=True)
        eps = 1e-3 * (hi - lo)
        above = f - lo > eps
        below = hi - f > eps
        floor_lo = (~above).sum(dim=2, keepdim=True) >= (~below).sum(dim=2, keepdim=True)
        act = torch.where(floor_lo, above, below).to(f.dtype)
        return act, act * torch.where(floor_lo, f - lo, hi - f)

    def _precondition(self, fz: Tensor, r: Tensor, absr: Tensor, k: int) -> Tensor:
        r"""Scaled residual :math:`P(r)` (W, D): :math:`\exp(a \odot \text{active} + b)
        \odot r`, or with ``precondition_groups`` :math:`e^{b} \odot (r + (e^{a} - 1) \odot
        \Pi_h(\text{active} \odot r))`."""
        assert self.pre_net is not None and self.pre_gain is not None
        w = self.pre_gain
        act, dist = self._floor_distance(fz)
        act = act.to(w.dtype)  # (W, C, P)
        fnorm = torch.linalg.vector_norm(fz.detach(), dim=1).clamp_min(1e-30)
        rel = (absr.detach() / fnorm).clamp_min(1e-30).log10().clamp(-12, 2) / 6
        feats = torch.stack(
            [rel.to(w.dtype), torch.full_like(rel, _step_feature(k), dtype=w.dtype),
             act.mean(dim=(1, 2))],
            dim=1,
        )
        out = self.pre_net(feats)  # (W, 2C)
        a = w + out[:, : self.channels]
        b = out[:, self.channels :]
        if self.precondition_groups is None:
            log_s = (a.unsqueeze(2) * act + b.unsqueeze(2)).clamp(-4.0, 4.0)
            s = torch.exp(log_s).to(r.dtype).reshape(r.shape[0], -1)
            return s * r
        # Scale only the part of the active residual orthogonal, per group, to the distance
        # from the floor h (the direction the GroupNorm maps to ~0: see the class docstring).
        nw, g = r.shape[0], self.precondition_groups
        x = (act.to(r.dtype) * r.view(nw, self.channels, self.positions)).reshape(nw, g, -1)
        h = dist.to(r.dtype).reshape(nw, g, -1)
        coef = torch.linalg.vecdot(x, h) / torch.linalg.vecdot(h, h).clamp_min(1e-30)
        x = (x - coef.unsqueeze(2) * h).view(nw, self.channels, self.positions)
        gain = torch.expm1(a.clamp(-4.0, 4.0)).to(r.dtype).unsqueeze(2)
        scale = torch.exp(b.clamp(-4.0, 4.0)).to(r.dtype).unsqueeze(2)
        out_r = scale * (r.view(nw, self.channels, self.positions) + gain * x)
        return out_r.reshape(nw, -1)

    def _features(
        self,
        H: Tensor,
        Q: Tensor,
        alpha_ls: Tensor,
        perm: Tensor,
        n: int,
        absr: Tensor,
        absg: Tensor,
        fz: Tensor,
        k: int,
    ) -> Tensor:
        m = self.m
        assert self.compress is not None
        dt = self.compress.weight.dtype
        W = H.shape[0]
        Ha = H[:, perm][:, :, perm]  # (W, n, n) age order
        d = Ha.diagonal(dim1=1, dim2=2).clamp_min(1e-300)  # squared norms
        sq = d.sqrt()
        cos = Ha / (sq.unsqueeze(2) * sq.unsqueeze(1))
        cos_full = H.new_zeros(W, m, m)
        cos_full[:, :n, :n] = cos
        cos_f = cos_full[:, self._triu[0], self._triu[1]]  # (W, m(m-1)/2)
        ratio = H.new_zeros(W, m)
        ratio[:, :n] = (0.5 * (d.log() - d[:, :1].log())).clamp(-10, 10)
        al = H.new_zeros(W, m)
        al[:, :n] = torch.asinh(alpha_ls.index_select(1, perm))
        mask = H.new_zeros(W, m)
        mask[:, :n] = 1.0
        scale = (absg.detach() / math.sqrt(self.channels * self.positions)).to(dt)
        q = Q.index_select(1, perm).to(dt) / scale.clamp_min(1e-30).view(W, 1, 1)
        qf = Q.new_zeros(W, m, Q.shape[2]).to(dt)
        qf[:, :n] = q.clamp(-100, 100)
        fnorm = torch.linalg.vector_norm(fz.detach(), dim=1)
        rel = (absr.detach() / fnorm.clamp_min(1e-30)).clamp_min(1e-30)
        step_f = torch.stack(
            [torch.full_like(rel, _step_feature(k)), rel.log10().clamp(-12, 2) / 6],
            dim=1,
        )
        small = torch.cat([mask, ratio[:, 1:], cos_f, al], dim=1).to(dt)
        return torch.cat([small, qf.flatten(1), step_f.to(dt)], dim=1)

    def extra_repr(self) -> str:
        return (
            f"state_shape={self.state_shape}, m={self.m}, rtol={self.rtol}, atol={self.atol}, "
            f"safeguard={self.safeguard}, precondition={self.precondition}"
        )


def _check_groups(name: str, groups: int | None, channels: int) -> None:
    """``groups`` (optional) must be a positive int dividing the state's channels."""
    if groups is None:
        return
    check_int(_OWNER, name, groups)
    if channels % groups:
        raise ValueError(
            f"{_OWNER}: `{name}` ({groups}) must divide the state channels ({channels})."
        )


def _step_feature(k: int) -> float:
    """Step index as a feature in [0, 1): ``k / (k + 8)``, independent of the step budget (the
    same during unrolled training and at inference)."""
    return k / (k + 8.0)


class _Attachment:
    """Handle returned by :meth:`HyperAnderson.attach`; ``remove()`` undoes the attachment."""

    def __init__(self, deq: nn.Module, solver: HyperAnderson) -> None:
        self.deq = deq
        self._old_solver = deq.solver
        self._had_init = "init_state" in deq.__dict__
        self._old_init = deq.__dict__.get("init_state")
        # object.__setattr__: do not register the solver as a submodule of the model.
        object.__setattr__(deq, "solver", solver)
        object.__setattr__(deq, "init_state", solver.initial_state)

    def remove(self) -> None:
        object.__setattr__(self.deq, "solver", self._old_solver)
        if self._had_init:
            object.__setattr__(self.deq, "init_state", self._old_init)
        else:
            self.deq.__dict__.pop("init_state", None)

    def __enter__(self) -> _Attachment:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _as_tuple(batch: Any) -> tuple[Tensor, ...]:
    if isinstance(batch, Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(b, Tensor) for b in batch):
        return tuple(batch)
    raise TypeError(
        "train_hyper_solver: each item of `inputs` must be the DEQ cell's input tensor (the "
        f"injection) or a tuple of input tensors, got {type(batch).__name__}."
    )


def _cell_of(deq_layer: Any, owner: str) -> Callable[..., Tensor]:
    cell = deq_layer.cell if isinstance(deq_layer, nn.Module) and hasattr(deq_layer, "cell") else (
        deq_layer
    )
    if not callable(cell):
        raise TypeError(
            f"{owner}: `deq_layer` must be a DEQ layer or a callable cell, got "
            f"{type(deq_layer).__name__}."
        )
    return cell


def pretrain_initialiser(
    deq_layer: Any,
    inputs: Iterable[Any],
    solver: HyperAnderson,
    steps: int = 500,
    lr: float = 3e-3,
    *,
    target_solver: AbstractFixedPointSolver | None = None,
    target_max_steps: int = 100,
    seed: int = 0,
    cell_steps: int = 0,
) -> dict[str, Any]:
    r"""Fit the initialiser alone to tightly solved equilibria (regression on :math:`z^\star`).

    One pass over ``inputs`` collects the batches and solves each to :math:`z^\star`
    (``target_solver``, no grad); then ``steps`` Adam steps (cosine-decayed learning rate) on
    random batches minimise the mean relative distance
    :math:`\|f^{(c)}(h_\phi(x)) - z^\star\| / \|z^\star\|`, where :math:`f^{(c)}` is
    ``cell_steps`` plain applications of the cell (``cell_steps=0``: the initial state itself
    is regressed). With ``cell_steps=1`` the initial state is fitted so that the solver's
    *first* step (a plain step, which every solve takes and counts) lands near
    :math:`z^\star`; the initial state itself stays cell-free. Only the initialiser's parameters
    move; the DEQ is unchanged. Meant to run before :func:`train_hyper_solver` (see its
    ``init_pretrain_steps``): the unrolled solver loss alone pulls the initial state only
    weakly toward :math:`z^\star`.

    Args:
        deq_layer: a :class:`deqkit.nn.DEQ` or a cell ``cell(z, *inputs)``.
        inputs: an iterable of cell inputs (as for :func:`train_hyper_solver`).
        solver: the :class:`HyperAnderson` whose ``init_map`` is trained (in place).
        steps: optimisation steps. Default: 500.
        lr: Adam learning rate (cosine-decayed to 10%). Default: 3e-3.
        target_solver: solver of the references. Default: ``Anderson(m=5, rtol=1e-6, atol=0)``.
        target_max_steps: step budget of the reference solves. Default: 100.
        seed: seed of the batch order. Default: 0.
        cell_steps: plain cell applications between the initial state and the regression
            target (differentiated through, the cell frozen). Default: 0.

    Returns:
        dict with ``loss`` (per-step mean relative distances), ``time_s`` (including the
        reference solves), ``parameters`` (the initialiser's) and ``steps``.
    """
    if not isinstance(solver, HyperAnderson):
        raise TypeError(
            f"pretrain_initialiser: `solver` must be a HyperAnderson, got {type(solver).__name__}."
        )
    check_int("pretrain_initialiser", "steps", steps)
    check_int("pretrain_initialiser", "target_max_steps", target_max_steps)
    check_int("pretrain_initialiser", "cell_steps", cell_steps, 0)
    check_float("pretrain_initialiser", "lr", lr, gt=0)
    cell = _cell_of(deq_layer, "pretrain_initialiser")
    if target_solver is None:
        target_solver = Anderson(m=5, rtol=1e-6, atol=0)

    modules = [c for c in (cell, deq_layer) if isinstance(c, nn.Module)]
    modes = [c.training for c in modules]
    for c in modules:
        c.eval()
    t0 = time.perf_counter()
    data: list[tuple[tuple[Tensor, ...], Tensor]] = []
    try:
        with torch.no_grad():
            for batch in inputs:
                xs = tuple(t.detach() for t in _as_tuple(batch))
                z0 = solver.initial_state(*xs)
                ref = fixed_point(
                    lambda z, *a: cell(z, *a), torch.zeros_like(z0), solver=target_solver,
                    max_steps=target_max_steps, args=xs, throw=False,
                )
                data.append((xs, ref.value.detach()))
    finally:
        for c, mode in zip(modules, modes):
            c.train(mode)
    if not data:
        raise ValueError("pretrain_initialiser: `inputs` is empty.")
    params = [p for p in solver.init_map.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.1 * lr)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    history: list[float] = []
    for c in modules:
        c.eval()
    try:
        for _ in range(steps):
            if not order:
                order = torch.randperm(len(data), generator=gen).tolist()
            xs, z_star = data[order.pop()]
            z = solver.initial_state(*xs)
            for _ in range(cell_steps):
                z = cell(z, *xs)
            history.append(_fit_step(z.flatten(1), z_star, params, opt, sched))
    finally:
        for c, mode in zip(modules, modes):
            c.train(mode)
    opt.zero_grad(set_to_none=True)
    return {
        "loss": history,
        "time_s": time.perf_counter() - t0,
        "parameters": sum(p.numel() for p in params),
        "steps": steps,
    }


def _fit_step(z: Tensor, z_star: Tensor, params: list[Tensor], opt: Any, sched: Any) -> float:
    """One Adam step on the mean relative distance of (W, D) ``z`` to ``z_star``.

    ``torch.autograd.grad`` over ``params`` only: a DEQ cell applied in between gets no grad.
    """
    zs = z_star.flatten(1).to(z.dtype)
    dist = torch.linalg.vector_norm(z - zs, dim=1) / torch.linalg.vector_norm(
        zs, dim=1
    ).clamp_min(1e-12)
    loss = dist.mean()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for p, g in zip(params, grads):
        p.grad = None if g is None else g
    opt.step()
    sched.step()
    return float(loss.detach())


def train_hyper_solver(
    deq_layer: Any,
    inputs: Iterable[Any],
    solver: HyperAnderson,
    steps: int = 200,
    k: int = 10,
    lr: float = 3e-3,
    *,
    loss: str = "relative",
    tolerances: Iterable[float] = (1e-3, 1e-4),
    init_weight: float = 1.0,
    target_weight: float = 0.0,
    target_solver: AbstractFixedPointSolver | None = None,
    target_max_steps: int = 100,
    grad_clip: float | None = 1.0,
    callback: Callable[[int, float], None] | None = None,
    init_pretrain_steps: int = 0,
    init_pretrain_lr: float | None = None,
    init_pretrain_cell_steps: int = 0,
) -> dict[str, Any]:
    r"""Train a :class:`HyperAnderson` on a frozen DEQ (HyperDEQ, Bai et al., ICLR 2022).

    For each batch of cell inputs :math:`x`, the solve is unrolled for ``k`` steps with
    autograd from the predicted start :math:`z^{[0]} = h_\phi(x)`, and the solver's
    parameters :math:`(\phi, \xi)` take an Adam step (cosine-decayed learning rate, gradient
    norm clipped) on

    .. math::
        \mathcal L = \sum_{i=0}^{k} \ell\Big(\frac{\|f(z^{[i]}) - z^{[i]}\|}
        {\|f(z^{[i]})\|}\Big)
        + w_0 \frac{\|z^{[0]} - z^\star\|}{\|z^\star\|}
        + w_z \sum_{i=1}^{k} \frac{\|z^{[i]} - z^\star\|}{\|z^\star\|},

    averaged over the batch, with :math:`\ell(t) = t` (``loss="relative"``),
    :math:`\ell(t) = \log t` (``loss="log"``, which weighs late steps as much as early ones) or
    :math:`\ell(t) = \sum_{\epsilon} \tau\,\mathrm{softplus}(\log_{10}(t/\epsilon)/\tau)`,
    :math:`\tau = 0.25` (``loss="tolerance"``: a smooth count of the steps still above each
    target tolerance :math:`\epsilon` in ``tolerances``, i.e. of the f evaluations a solve
    stopping there spends; steps already below every tolerance cost nothing),
    and :math:`z^\star` a tight reference solve (only computed when :math:`w_0` or
    :math:`w_z` is non-zero). Only the solver's parameters are differentiated
    (``torch.autograd.grad``): the DEQ receives no gradient and is unchanged. The cell is put
    in eval mode during training and restored afterwards.

    Args:
        deq_layer: a :class:`deqkit.nn.DEQ` (its ``cell`` is used) or a cell
            ``cell(z, *inputs)``.
        inputs: an iterable of cell inputs (the injection tensor, or a tuple of tensors), e.g.
            a list of batches of ``model.stem(x)``; re-iterated when exhausted.
        solver: the :class:`HyperAnderson` to train (in place).
        steps: optimisation steps. Default: 200.
        k: unrolled solver steps per loss. Default: 10.
        lr: Adam learning rate (cosine-decayed to 10%). Default: 3e-3.
        loss: ``"relative"``, ``"log"`` or ``"tolerance"``. Default: ``"relative"``.
        tolerances: target relative residuals of ``loss="tolerance"``.
            Default: ``(1e-3, 1e-4)``.
        init_weight: :math:`w_0`, weight of the initialisation loss. Default: 1.0.
        target_weight: :math:`w_z`, weight of the per-step distance to :math:`z^\star`.
            Default: 0.0.
        target_solver: solver of the reference :math:`z^\star`.
            Default: ``Anderson(m=5, rtol=1e-6, atol=0)``.
        target_max_steps: step budget of the reference solve. Default: 100.
        grad_clip: max gradient norm (``None``: no clipping). Default: 1.0.
        callback: called as ``callback(step, loss)`` after every step.
        init_pretrain_steps: first fit the initialiser alone to :math:`z^\star` for this
            many steps (:func:`pretrain_initialiser`, one pass of ``inputs`` for the
            references). Default: 0 (none).
        init_pretrain_lr: learning rate of that phase. Default: ``lr``.
        init_pretrain_cell_steps: ``cell_steps`` of that phase (fit the state after this
            many plain cell steps from the initial state). Default: 0.

    Returns:
        dict with ``loss`` (per-step losses), ``time_s`` (wall time, pretraining included),
        ``parameters`` (the solver's parameter count), ``steps`` and, with pretraining,
        ``pretrain`` (:func:`pretrain_initialiser`'s result).

    Example:
        >>> import torch
        >>> import deqkit as dk
        >>> from deqkit.hyperdeq import HyperAnderson, train_hyper_solver
        >>> _ = torch.manual_seed(0)
        >>> lin = torch.nn.Linear(6, 6, bias=False)
        >>> layer = dk.nn.DEQ(lambda z, u: torch.tanh(0.6 * lin(z) + u))
        >>> data = [torch.randn(8, 6) for _ in range(2)]
        >>> solver = HyperAnderson((6,), rtol=1e-5)
        >>> out = train_hyper_solver(layer, data, solver, steps=3, k=4)
        >>> len(out["loss"]), lin.weight.grad is None
        (3, True)
    """
    if not isinstance(solver, HyperAnderson):
        raise TypeError(
            f"train_hyper_solver: `solver` must be a HyperAnderson, got {type(solver).__name__}."
        )
    owner = "train_hyper_solver"
    check_int(owner, "steps", steps)
    check_int(owner, "k", k)
    check_int(owner, "target_max_steps", target_max_steps)
    check_float(owner, "lr", lr, gt=0)
    check_float(owner, "init_weight", init_weight, ge=0)
    check_float(owner, "target_weight", target_weight, ge=0)
    check_choice(owner, "loss", loss, ("relative", "log", "tolerance"))
    try:
        tols = [float(t) for t in tolerances]
    except (TypeError, ValueError):
        tols = []
    if not tols or not all(0 < t < math.inf for t in tols):
        raise ValueError(
            "train_hyper_solver: `tolerances` must be a non-empty sequence of floats > 0, got "
            f"{tolerances!r}."
        )
    log_tols = [math.log10(t) for t in tols]
    check_float(owner, "grad_clip", grad_clip, gt=0, finite=False, none=True)
    check_int(owner, "init_pretrain_steps", init_pretrain_steps, 0)
    cell = _cell_of(deq_layer, "train_hyper_solver")
    t_start = time.perf_counter()
    pre = None
    if init_pretrain_steps:
        pre = pretrain_initialiser(
            deq_layer, inputs, solver, init_pretrain_steps,
            lr if init_pretrain_lr is None else init_pretrain_lr,
            target_solver=target_solver, target_max_steps=target_max_steps,
            cell_steps=init_pretrain_cell_steps,
        )
    if target_solver is None:
        target_solver = Anderson(m=5, rtol=1e-6, atol=0)

    params = [p for p in solver.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.1 * lr)
    need_target = init_weight > 0 or target_weight > 0
    modules = [c for c in (cell, deq_layer) if isinstance(c, nn.Module)]
    modes = [c.training for c in modules]
    for c in modules:
        c.eval()
    history: list[float] = []
    it = iter(inputs)
    try:
        for step_i in range(steps):
            try:
                batch = next(it)
            except StopIteration:
                it = iter(inputs)
                try:
                    batch = next(it)
                except StopIteration:
                    raise ValueError("train_hyper_solver: `inputs` is empty.") from None
            xs = tuple(t.detach() for t in _as_tuple(batch))
            z0 = solver.initial_state(*xs)
            shape = z0.shape

            def fn(zf: Tensor, _xs: tuple[Tensor, ...] = xs, _shape: Any = shape) -> Tensor:
                return cell(zf.view(_shape), *_xs).reshape(_shape[0], -1)

            z_star = None
            if need_target:
                with torch.no_grad():
                    ref = fixed_point(
                        lambda z, *a: cell(z, *a), torch.zeros_like(z0), solver=target_solver,
                        max_steps=target_max_steps, args=xs, throw=False,
                    )
                z_star = ref.value.reshape(shape[0], -1)
                zs_norm = torch.linalg.vector_norm(z_star, dim=1).clamp_min(1e-12)
            z = z0.reshape(shape[0], -1)
            total = z.new_zeros(())
            if init_weight > 0:
                dist = torch.linalg.vector_norm(z - z_star, dim=1) / zs_norm
                total = total + init_weight * dist.mean()
            fz = fn(z)
            state = None
            for i in range(k + 1):
                r = fz - z
                rel = torch.linalg.vector_norm(r, dim=1) / torch.linalg.vector_norm(
                    fz, dim=1
                ).clamp_min(1e-12)
                if loss == "log":
                    term = rel.clamp_min(1e-12).log()
                elif loss == "tolerance":
                    lr10 = rel.clamp_min(1e-12).log10()
                    term = sum(_TAU * F.softplus((lr10 - lt) / _TAU) for lt in log_tols)
                else:
                    term = rel
                total = total + term.mean()
                if target_weight > 0 and i > 0:
                    dist = torch.linalg.vector_norm(z - z_star, dim=1) / zs_norm
                    total = total + target_weight * dist.mean()
                if i == k:
                    break
                if state is None:
                    state = solver.init(fn, z, fz, r, k)
                z, fz_next, state = solver.step(fn, z, fz, r, state)
                fz = fn(z) if fz_next is None else fz_next
            grads = torch.autograd.grad(total, params, allow_unused=True)
            for p, g in zip(params, grads):
                p.grad = None if g is None else torch.nan_to_num(g)
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            value = float(total.detach())
            history.append(value)
            if callback is not None:
                callback(step_i, value)
    finally:
        for c, mode in zip(modules, modes):
            c.train(mode)
    out = {
        "loss": history,
        "time_s": time.perf_counter() - t_start,
        "parameters": sum(p.numel() for p in params),
        "steps": steps,
    }
    if pre is not None:
        out["pretrain"] = pre
    return out


__all__ = ["HyperAnderson", "pretrain_initialiser", "train_hyper_solver"]
