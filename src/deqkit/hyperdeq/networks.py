r"""The three small networks of :class:`~deqkit.hyperdeq.HyperAnderson`, and what they compute.

* the **initialiser** :math:`h_\phi` (:func:`initialiser`): injected input -> initial state;
* the **update network** :math:`s_\xi` (:func:`update_network`, :func:`update_features`,
  :func:`learned_weights`): scale-free features of the recent residuals -> a correction of
  the least-squares Anderson weights and a damping;
* the **preconditioner** :math:`p_\eta` (:func:`preconditioner`, :func:`precondition`,
  :func:`floor_distance`): a learned entrywise scaling of the residuals.

The builders return plain ``nn.Sequential``/``nn.Linear``/``nn.Parameter`` objects, which
:class:`~deqkit.hyperdeq.HyperAnderson` holds under its historical attribute names
(``init_map``, ``compress``, ``update_net``, ``pre_gain``, ``pre_net``), so its
``state_dict`` keys do not depend on this module's layout. The maths is in the class
docstring of :class:`~deqkit.hyperdeq.HyperAnderson` (Bai, Koltun, Kolter, "Neural Deep
Equilibrium Solvers", ICLR 2022, for the initialiser and the update network).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

_CONVS = (nn.Conv1d, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # by len(state_shape) - 1


def step_feature(k: int) -> float:
    """Step index as a feature in [0, 1): ``k / (k + 8)``, independent of the step budget (the
    same during unrolled training and at inference)."""
    return k / (k + 8.0)


# ------------------------------------------------------------------------------ initialiser


def initialiser(
    shape: tuple[int, ...],
    in_channels: int,
    *,
    hidden: int | None,
    depthwise: bool,
    layers: int,
    separable: bool,
    groups: int | None,
) -> nn.Sequential:
    r"""The initialiser :math:`h_\phi` on channels-first tensors (vector states are
    ``(B, C, 1)`` signals), from ``in_channels`` to ``shape[0]`` channels.

    ``layers == 0``: an optional depthwise 3x3 convolution (``depthwise``, spatial states
    only), an optional pointwise hidden layer (``hidden`` channels, ReLU), a final 1x1
    convolution. ``layers > 0``: that many 3x3 convolutions (depthwise-separable with
    ``separable``; 1x1 for vector states) of ``hidden`` channels, each followed by a GroupNorm
    and a ReLU, then the final 1x1 convolution. With ``groups`` a GroupNorm ends the map;
    without, the final convolution starts at zero (an untrained initialiser is the zero start).
    """
    conv = _CONVS[len(shape) - 1]
    mods: list[nn.Module] = []
    if layers:
        if hidden is None:
            raise ValueError("initialiser: `layers` > 0 needs `hidden` (the width).")
        ks = 3 if len(shape) > 1 else 1
        hg = math.gcd(hidden, groups or 8)
        c_in = in_channels
        for _ in range(layers):
            if separable:  # depthwise 3x3, then a pointwise channel mix
                if ks > 1:
                    mods.append(conv(c_in, c_in, ks, padding=ks // 2, groups=c_in))
                mods.append(conv(c_in, hidden, 1))
            else:
                mods.append(conv(c_in, hidden, ks, padding=ks // 2))
            mods += [nn.GroupNorm(hg, hidden), nn.ReLU()]
            c_in = hidden
    else:
        if depthwise and len(shape) > 1:
            mods.append(conv(in_channels, in_channels, 3, padding=1, groups=in_channels))
        if hidden is not None:
            mods += [conv(in_channels, hidden, 1), nn.ReLU()]
    last = conv(hidden or in_channels, shape[0], 1)
    mods.append(last)
    if groups is not None:
        mods.append(nn.GroupNorm(groups, shape[0]))
    else:  # zero start until trained
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    return nn.Sequential(*mods)


# --------------------------------------------------------------------------- update network


def update_network(
    channels: int, m: int, features: int, hidden: int, beta_init: float, beta_max: float
) -> tuple[nn.Linear, nn.Sequential]:
    r"""``(compress, net)``: the learned residual compression :math:`p` (``channels`` ->
    ``features``) and the update network :math:`s_\xi`, whose ``m + 1`` outputs are the
    weight corrections and the damping logit. Its last layer starts at zero with the damping
    logit at :math:`\sigma^{-1}(\beta_{\text{init}} / \beta_{\max})`, so an untrained network
    gives the least-squares weights and the damping ``beta_init``."""
    compress = nn.Linear(channels, features, bias=False)
    n_in = m + (m - 1) + m * (m - 1) // 2 + m + 2 * features * m + 2
    net = nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, m + 1))
    out = net[2]
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    with torch.no_grad():
        out.bias[m] = math.log(beta_init / (beta_max - beta_init))
    return compress, net


def compress_residual(weight: Tensor, r: Tensor, channels: int, positions: int) -> Tensor:
    """(W, D) -> (W, 2p): mean and RMS over positions of the learned channel projection
    ``weight`` (p, C)."""
    g = r.to(weight.dtype).view(r.shape[0], channels, positions)
    y = torch.einsum("pc,wcs->wps", weight, g)
    return torch.cat([y.mean(2), y.square().mean(2).add(1e-30).sqrt()], dim=1)


def update_features(
    H: Tensor, Q: Tensor, alpha_ls: Tensor, perm: Tensor, absr: Tensor, absg: Tensor,
    fz: Tensor, k: int, triu: Tensor, dtype: torch.dtype,
) -> Tensor:
    r"""The update network's input :math:`\phi(G)` ``(W, n_in)`` from the float64 Gram matrix
    ``H`` (W, m, m), the compressed residuals ``Q`` (W, m, 2p), the least-squares weights and
    the slots ``perm`` in age order (0 = newest; ``n = len(perm)`` valid): the history mask,
    the log norm ratios to the newest residual, the cosines between residuals,
    :math:`\operatorname{asinh}\alpha^{\text{LS}}`, the compressed residuals normalised by the
    newest one's RMS, the step feature and the log relative residual."""
    W, m = H.shape[0], H.shape[1]
    n = perm.shape[0]
    Ha = H[:, perm][:, :, perm]  # (W, n, n) age order
    d = Ha.diagonal(dim1=1, dim2=2).clamp_min(1e-300)  # squared norms
    sq = d.sqrt()
    cos_full = H.new_zeros(W, m, m)
    cos_full[:, :n, :n] = Ha / (sq.unsqueeze(2) * sq.unsqueeze(1))
    cos_f = cos_full[:, triu[0], triu[1]]  # (W, m(m-1)/2)
    ratio = H.new_zeros(W, m)
    ratio[:, :n] = (0.5 * (d.log() - d[:, :1].log())).clamp(-10, 10)
    al = H.new_zeros(W, m)
    al[:, :n] = torch.asinh(alpha_ls.index_select(1, perm))
    mask = H.new_zeros(W, m)
    mask[:, :n] = 1.0
    scale = (absg.detach() / math.sqrt(fz.shape[1])).to(dtype)
    q = Q.index_select(1, perm).to(dtype) / scale.clamp_min(1e-30).view(W, 1, 1)
    qf = Q.new_zeros(W, m, Q.shape[2]).to(dtype)
    qf[:, :n] = q.clamp(-100, 100)
    fnorm = torch.linalg.vector_norm(fz.detach(), dim=1)
    rel = (absr.detach() / fnorm.clamp_min(1e-30)).clamp_min(1e-30)
    step_f = torch.stack(
        [torch.full_like(rel, step_feature(k)), rel.log10().clamp(-12, 2) / 6], dim=1
    )
    small = torch.cat([mask, ratio[:, 1:], cos_f, al], dim=1).to(dtype)
    return torch.cat([small, qf.flatten(1), step_f.to(dtype)], dim=1)


def learned_weights(
    out: Tensor, alpha_ls: Tensor, perm: Tensor, beta_max: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    r"""``(alpha, beta)`` from the update network's output ``out`` (W, m + 1):
    :math:`\alpha = \alpha^{\text{LS}} + \delta - \tfrac1n \mathbf 1 \mathbf 1^\top\delta` in
    slot order (W, n), and :math:`\beta = \beta_{\max}\sigma(\cdot)` (W, 1), both in
    ``dtype``; ``alpha_ls`` is in slot order, ``perm`` lists the slots in age order."""
    n, m = perm.shape[0], out.shape[1] - 1
    delta = out[:, :n]
    delta = delta - delta.mean(dim=1, keepdim=True)
    beta = (beta_max * torch.sigmoid(out[:, m])).to(dtype).unsqueeze(1)
    alpha_age = alpha_ls.index_select(1, perm).to(delta.dtype) + delta  # (W, n)
    inv = torch.empty_like(perm)  # back to slot order: slot perm[j] gets age j
    inv[perm] = torch.arange(n, device=perm.device)
    return alpha_age.index_select(1, inv).to(dtype), beta


# --------------------------------------------------------------------------- preconditioner


def preconditioner(channels: int, kappa: float, hidden: int) -> tuple[nn.Parameter, nn.Sequential]:
    r"""``(gain, net)``: the per-channel log gain :math:`a_0 = -\log(1 - \kappa)` and the
    network :math:`p_\eta` (3 features -> ``2 * channels`` outputs :math:`(a - a_0, b)`), whose
    last layer starts at zero."""
    gain = nn.Parameter(torch.full((channels,), -math.log1p(-float(kappa))))
    net = nn.Sequential(nn.Linear(3, hidden), nn.GELU(), nn.Linear(hidden, 2 * channels))
    nn.init.zeros_(net[2].weight)
    nn.init.zeros_(net[2].bias)
    return gain, net


def floor_distance(fz: Tensor, channels: int, positions: int) -> tuple[Tensor, Tensor]:
    """(W, D) -> the active mask and the distance of each entry from its channel's floor
    (zero off the active entries), both (W, C, P).

    Per sample and channel, the *floor* is the end of the channel's range (over the
    positions) where more entries sit (within ``1e-3`` of the range); an entry is *active*
    when it is further than that from the floor."""
    f = fz.detach().view(fz.shape[0], channels, positions)
    lo = f.amin(dim=2, keepdim=True)
    hi = f.amax(dim=2, keepdim=True)
    eps = 1e-3 * (hi - lo)
    above = f - lo > eps
    below = hi - f > eps
    floor_lo = (~above).sum(dim=2, keepdim=True) >= (~below).sum(dim=2, keepdim=True)
    act = torch.where(floor_lo, above, below).to(f.dtype)
    return act, act * torch.where(floor_lo, f - lo, hi - f)


def precondition(
    gain: Tensor, net: nn.Module, fz: Tensor, r: Tensor, absr: Tensor, k: int,
    groups: int | None,
) -> Tensor:
    r"""Scaled residual :math:`P(r)` (W, D): :math:`\exp(a \odot \text{active} + b) \odot r`,
    or with ``groups`` :math:`e^{b} \odot (r + (e^{a} - 1) \odot \Pi_h(\text{active} \odot
    r))`, :math:`\Pi_h` the per-group projection orthogonal to the distance from the floor
    :math:`h` (the direction a final GroupNorm maps to ~0)."""
    channels = gain.shape[0]
    nw, positions = r.shape[0], r.shape[1] // channels
    act, dist = floor_distance(fz, channels, positions)
    act = act.to(gain.dtype)  # (W, C, P)
    fnorm = torch.linalg.vector_norm(fz.detach(), dim=1).clamp_min(1e-30)
    rel = (absr.detach() / fnorm).clamp_min(1e-30).log10().clamp(-12, 2) / 6
    feats = torch.stack(
        [rel.to(gain.dtype), torch.full_like(rel, step_feature(k), dtype=gain.dtype),
         act.mean(dim=(1, 2))],
        dim=1,
    )
    out = net(feats)  # (W, 2C)
    a = gain + out[:, :channels]
    b = out[:, channels:]
    if groups is None:
        log_s = (a.unsqueeze(2) * act + b.unsqueeze(2)).clamp(-4.0, 4.0)
        return torch.exp(log_s).to(r.dtype).reshape(nw, -1) * r
    x = (act.to(r.dtype) * r.view(nw, channels, positions)).reshape(nw, groups, -1)
    h = dist.to(r.dtype).reshape(nw, groups, -1)
    coef = torch.linalg.vecdot(x, h) / torch.linalg.vecdot(h, h).clamp_min(1e-30)
    x = (x - coef.unsqueeze(2) * h).view(nw, channels, positions)
    g = torch.expm1(a.clamp(-4.0, 4.0)).to(r.dtype).unsqueeze(2)
    scale = torch.exp(b.clamp(-4.0, 4.0)).to(r.dtype).unsqueeze(2)
    return (scale * (r.view(nw, channels, positions) + g * x)).reshape(nw, -1)


def precondition_into(
    gain: Tensor, net: nn.Module, fz: Tensor, r: Tensor, absr: Tensor, k: int,
    groups: int | None, out: Tensor, work: Tensor,
) -> Tensor:
    r""":func:`precondition` for inference (no autograd), written into ``out`` (W, D), which
    may be a strided view such as a history slot; ``work`` is scratch space of at least
    ``(4, W, D)`` (contiguous rows), so that a step allocates nothing of the state's size.
    Returns ``out``.

    The same map in float-only passes over the (W, C, P) state, each into a preallocated
    buffer: on the CPU a comparison to a bool tensor costs ~2.5x one written to a float
    buffer, a full-width ``where`` on a bool mask ~40x a float subtraction (PyTorch 2.x, one
    thread), and a fresh output of the state's size can cost more than the op itself (page
    faults), so the masks are 0/1 floats and ``where`` is an ``addcmul`` with a 0/1 factor.
    With ``groups``, :math:`\langle \text{active} \odot r, h\rangle = \langle r,
    h\rangle` (:math:`h` vanishes off the active entries) and :math:`P(r) = \big(e^{b} +
    e^{b}(e^{a} - 1)\,\text{active}\big) \odot r - e^{b}(e^{a} - 1)\,c \odot h`,
    :math:`c` the per-group projection coefficient. The masks and the floor distance are
    exactly :func:`floor_distance`'s; the result equals :func:`precondition` up to float
    rounding."""
    channels = gain.shape[0]
    nw, positions = r.shape[0], r.shape[1] // channels
    shape = (nw, channels, positions)
    b1, b2, b3, b4 = (work[i, :nw].view(shape) for i in range(4))
    f = fz.reshape(shape)
    lo, hi = f.amin(dim=2, keepdim=True), f.amax(dim=2, keepdim=True)
    eps = (hi - lo).mul_(1e-3)
    # 0/1 float masks written by the comparison itself (a bool result costs ~2.5x)
    above = torch.gt(torch.sub(f, lo, out=b1), eps, out=b3)  # f - lo > eps
    below = torch.gt(torch.sub(hi, f, out=b2), eps, out=b4)  # hi - f > eps
    # floor at the low end where at least as many entries sit there: #(~above) >= #(~below)
    n_above, n_below = above.sum(2, keepdim=True), below.sum(2, keepdim=True)
    fl = (n_above <= n_below).to(f.dtype)  # (W, C, 1)
    sgn = fl.mul(2.0).sub_(1.0)  # +1 floor low, -1 floor high
    base = torch.addcmul(hi, fl, lo - hi)  # fl ? lo : hi
    dist = torch.addcmul(base.mul_(-sgn), f, sgn, out=b1)  # f - lo  or  hi - f, exactly
    act = torch.gt(dist, eps, out=b3)  # fl ? above : below
    fnorm = torch.linalg.vector_norm(fz, dim=1).clamp_min(1e-30)
    rel = (absr / fnorm).clamp_min(1e-30).log10().clamp(-12, 2) / 6
    n_act = torch.addcmul(n_below, fl, n_above - n_below)  # active entries per channel
    frac = n_act.view(nw, channels).sum(1).to(gain.dtype) / (channels * positions)
    feats = torch.stack(
        [rel.to(gain.dtype), torch.full_like(rel, step_feature(k), dtype=gain.dtype), frac],
        dim=1,
    )
    o = net(feats)  # (W, 2C)
    a, b = gain + o[:, :channels], o[:, channels:]
    r3 = r.reshape(shape)
    o3 = out.view(shape)
    if groups is None:  # exp(clamp(a act + b)) r, act in {0, 1}
        lb = b.clamp(-4.0, 4.0).unsqueeze(2)
        sa = (a + b).clamp(-4.0, 4.0).unsqueeze(2).exp() - lb.exp()
        scale = torch.addcmul(lb.exp().to(r.dtype), sa.to(r.dtype), act, out=b2)
        return torch.mul(scale, r3, out=o3).view_as(out)
    scale = torch.exp(b.clamp(-4.0, 4.0)).to(r.dtype).unsqueeze(2)  # (W, C, 1)
    sg = scale * torch.expm1(a.clamp(-4.0, 4.0)).to(r.dtype).unsqueeze(2)
    h = dist.mul_(act)  # (W, C, P), zero off the active entries
    rh = torch.mul(r3, h, out=b2).view(nw, groups, -1).sum(2)
    hh = torch.mul(h, h, out=b2).view(nw, groups, -1).sum(2)
    coef = rh / hh.clamp_min(1e-30)  # (W, G)
    cg = sg * coef.repeat_interleave(channels // groups, dim=1).unsqueeze(2)  # (W, C, 1)
    torch.mul(torch.addcmul(scale, sg, act, out=b2), r3, out=o3)
    o3.addcmul_(cg, h, value=-1.0)
    return out


__all__ = [
    "compress_residual", "floor_distance", "initialiser", "learned_weights", "precondition",
    "precondition_into", "preconditioner", "step_feature", "update_features", "update_network",
]
