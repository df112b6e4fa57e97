"""Training regularisers for deep equilibrium models.

* :func:`jacobian_frobenius_reg` -- Jacobian regularisation (Bai, Koltun, Kolter 2021,
  "Stabilizing Equilibrium Models by Jacobian Regularization"): penalising
  ``||J_f(z*)||_F^2`` keeps the cell's Jacobian small at the equilibrium, which keeps the
  forward solver and the implicit backward pass fast and stable.
* :func:`fixed_point_correction_loss` -- fixed-point correction (Bai et al. 2022, "Deep
  Equilibrium Optical Flow Estimation"; TorchDEQ's ``fp_correction``): supervise several
  intermediate solver iterates with geometrically decaying weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from .._checks import check_bool, check_choice, check_float, check_int
from ..linear import JacobianOperator

__all__ = ["fixed_point_correction_loss", "jacobian_frobenius_reg"]

Reduction = Literal["mean", "sum", "none"]


def jacobian_frobenius_reg(
    f: Callable[[Tensor], Tensor],
    z: Tensor,
    n_samples: int = 1,
    normalise: bool = True,
    generator: torch.Generator | None = None,
    *,
    reduction: Reduction | None = None,
    fz: Tensor | None = None,
) -> Tensor:
    r"""Hutchinson estimate of the squared Frobenius norm of the cell Jacobian at ``z``.

    For each sample ``b`` with Jacobian :math:`J_b = \partial f(z)_b / \partial z_b` and
    Gaussian probes :math:`v \sim \mathcal N(0, I)`,
    :math:`\mathbb E_v \|v^T J_b\|_2^2 = \operatorname{tr}(J_b J_b^T) = \|J_b\|_F^2`, so

    .. math:: e_b = \frac{1}{K} \sum_{k=1}^{K} \|v_k^T J_b\|_2^2 \quad (K = \text{n\_samples})

    is an unbiased estimate (variance :math:`2\|J_b^T J_b\|_F^2 / K`).  Each probe costs one
    vector-Jacobian product ``torch.autograd.grad(f(z), z, v, create_graph=True)``, so the
    result is differentiable with respect to ``f``'s parameters (double backward) and is meant
    to be added to the training loss: ``loss = task_loss + gamma * jacobian_frobenius_reg(...)``.
    (Bai et al. use ``gamma`` around 1-10 with one probe, applied at the equilibrium ``z*``.)

    Normalisation and reduction:

    * ``normalise=True`` divides each :math:`e_b` by ``D = numel(z) / B`` (per-element value,
      as in the paper), ``False`` keeps :math:`\|J_b\|_F^2`.
    * ``reduction`` combines the per-sample values: ``"mean"`` over the batch, ``"sum"``, or
      ``"none"`` (shape ``(B,)``).  The default ``None`` means ``"mean"`` when ``normalise``
      and ``"sum"`` otherwise, so that
      ``jacobian_frobenius_reg(f, z) = sum_b e_b / numel(z)`` (exactly the paper's / TorchDEQ's
      ``jac_loss_estimate``) and ``jacobian_frobenius_reg(f, z, normalise=False)`` is the
      estimate of :math:`\sum_b \|J_b\|_F^2`.

    Under ``torch.no_grad()`` (e.g. for logging) the value is computed without building the
    double-backward graph and returned detached.

    ``z`` is normally the equilibrium.  If it requires grad, ``f(z)`` is differentiated with
    respect to it as is (the regulariser may then also back-propagate into ``z``'s history, as
    in the paper); otherwise a detached copy with ``requires_grad=True`` is used.

    Args:
        f: the cell, mapping ``(B, ...)`` to the same shape, samples independent.
        z: the point, usually the equilibrium, shape ``(B, ...)``, floating point.
        n_samples: number of probes ``K >= 1`` (default ``1``).
        normalise: divide by the per-sample number of elements ``D`` (default ``True``).
        generator: optional ``torch.Generator`` (on ``z``'s device) for the probes.
        reduction: ``"mean"``, ``"sum"``, ``"none"`` or ``None`` (default: see above).
        fz: optional, keyword-only: ``f(z)`` already computed from this very ``z`` (which must
            then require grad), to save one cell evaluation.

    Returns:
        A scalar tensor (``"mean"``/``"sum"``) or a ``(B,)`` tensor (``"none"``), attached to
        the graph of ``f``'s parameters.

    Raises:
        TypeError: ``f`` not callable, ``z`` or ``fz`` not tensors.
        ValueError: bad ``z``, ``n_samples``, ``reduction``, ``fz``; ``f`` changes the shape.

    Example:
        >>> import torch
        >>> W = torch.tensor([[0.5, 0.0], [0.0, 0.5]], requires_grad=True)
        >>> z = torch.zeros(4, 2)
        >>> reg = jacobian_frobenius_reg(lambda z: z @ W.T, z, n_samples=1000,
        ...                              generator=torch.Generator().manual_seed(0))
        >>> abs(reg.item() - 0.25) < 0.02  # exact value ||W||_F^2 / D = 0.5 / 2
        True
        >>> reg.backward(); W.grad is not None
        True
    """
    name = "jacobian_frobenius_reg"
    if not callable(f):
        raise TypeError(f"{name}: `f` must be callable, got {type(f).__name__}.")
    if not isinstance(z, Tensor):
        raise TypeError(
            f"{name}: `z` must be a torch.Tensor of shape (B, ...), got {type(z).__name__}."
        )
    if z.ndim < 1 or z.shape[0] == 0 or z.numel() == 0 or not z.is_floating_point():
        raise ValueError(
            f"{name}: `z` must be a floating-point tensor of shape (B, ...) with B >= 1 and at "
            f"least one element, got shape {tuple(z.shape)} and dtype {z.dtype}."
        )
    check_int(name, "n_samples", n_samples, example=1)
    check_bool(name, "normalise", normalise, error=ValueError)
    check_choice(name, "reduction", reduction, ("mean", "sum", "none", None))
    if reduction is None:
        reduction = "mean" if normalise else "sum"
    batch = z.shape[0]
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        if fz is None:
            zz = z if z.requires_grad else z.detach().requires_grad_(True)
            fz = f(zz)
        else:
            if not isinstance(fz, Tensor):
                raise TypeError(f"{name}: `fz` must be a tensor or None, got {type(fz).__name__}.")
            if not z.requires_grad:
                raise ValueError(
                    f"{name}: `fz` was given but `z` does not require grad, so f(z) cannot be "
                    "differentiated with respect to it. Pass fz=None (f is then evaluated "
                    "here) or compute fz = f(z) from a z with requires_grad=True."
                )
            zz = z
        if not isinstance(fz, Tensor) or fz.shape != z.shape:
            got = tuple(fz.shape) if isinstance(fz, Tensor) else type(fz).__name__
            raise ValueError(
                f"{name}: `f` must return a tensor of the same shape as z {tuple(z.shape)}, "
                f"got {got}."
            )
        per_sample = torch.zeros(batch, dtype=z.dtype, device=z.device)
        if fz.requires_grad:
            # f(z)'s graph is kept: it may still be needed (task loss, probes)
            jac = JacobianOperator.from_evaluation(zz, fz, create_graph=create_graph)
            for _ in range(n_samples):
                v = torch.randn(fz.shape, generator=generator, dtype=fz.dtype, device=fz.device)
                per_sample = per_sample + jac.rmv(v.reshape(batch, -1)).pow(2).sum(dim=1)
            per_sample = per_sample / n_samples
    if not create_graph:
        per_sample = per_sample.detach()
    if normalise:
        per_sample = per_sample / math.prod(z.shape[1:])
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def fixed_point_correction_loss(
    loss_fn: Callable[..., Tensor],
    states: Sequence[Tensor],
    targets: Any,
    gamma: float = 0.8,
    *,
    return_terms: bool = False,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    r"""Fixed-point correction loss: weighted supervision of several solver iterates.

    .. math:: \mathcal L = \sum_{k=0}^{K-1} \gamma^{K-1-k}\, \ell(z_k, y),

    where ``states = [z_0, ..., z_{K-1}]`` are intermediate iterates of the fixed-point solver
    in order (typically a few states sampled from the trajectory, the last one being the final
    estimate, whose weight is ``1``) and :math:`\ell` is ``loss_fn``.  Introduced as
    "fixed-point correction" in Bai et al. 2022, "Deep Equilibrium Optical Flow Estimation"
    (TorchDEQ ``fp_correction``); the gradient of each term flows through its own iterate
    (with one-step or phantom gradients), which stabilises training and lets earlier
    iterates already be good.

    Args:
        loss_fn: called as ``loss_fn(state, targets)``; should return a scalar tensor (a
            non-scalar result is weighted and summed elementwise).
        states: non-empty sequence of tensors, earliest first.
        targets: passed unchanged as the second argument of ``loss_fn``.
        gamma: decay in ``[0, 1]`` (default ``0.8``; ``1`` weights all states equally, ``0``
            keeps only the last).
        return_terms: keyword-only; also return the list of unweighted per-state losses
            (detached, for logging) (default ``False``).

    Returns:
        The weighted sum (a tensor), or ``(total, terms)`` when ``return_terms``.

    Raises:
        TypeError: ``loss_fn`` not callable, a state not a tensor, or ``loss_fn`` not
            returning a tensor.
        ValueError: empty ``states`` or ``gamma`` outside ``[0, 1]``.

    Example:
        >>> import torch
        >>> y = torch.zeros(2)
        >>> states = [torch.full((2,), 3.0), torch.full((2,), 2.0), torch.full((2,), 1.0)]
        >>> mse = lambda s, t: ((s - t) ** 2).mean()
        >>> fixed_point_correction_loss(mse, states, y, gamma=0.5)  # 0.25*9 + 0.5*4 + 1*1
        tensor(5.2500)
    """
    name = "fixed_point_correction_loss"
    if not callable(loss_fn):
        raise TypeError(f"{name}: `loss_fn` must be callable, got {type(loss_fn).__name__}.")
    if isinstance(states, Tensor) or not isinstance(states, Sequence):
        raise TypeError(
            f"{name}: `states` must be a list/tuple of tensors (solver iterates, earliest "
            f"first), got {type(states).__name__}. Wrap a single tensor as [z]."
        )
    if len(states) == 0:
        raise ValueError(
            f"{name}: `states` is empty. Pass at least one solver iterate, e.g. [z_star]."
        )
    for i, state in enumerate(states):
        if not isinstance(state, Tensor):
            raise TypeError(f"{name}: `states[{i}]` must be a tensor, got {type(state).__name__}.")
    check_float(name, "gamma", gamma, ge=0, le=1, example=0.8)
    n = len(states)
    total: Tensor | None = None
    terms: list[Tensor] = []
    for k, state in enumerate(states):
        term = loss_fn(state, targets)
        if not isinstance(term, Tensor):
            raise TypeError(
                f"{name}: `loss_fn` must return a tensor, got {type(term).__name__} for "
                f"states[{k}]."
            )
        terms.append(term.detach())
        weight = float(gamma) ** (n - 1 - k)
        if weight == 0.0:
            continue
        total = term * weight if total is None else total + term * weight
    assert total is not None  # the last state has weight 1
    if return_terms:
        return total, terms
    return total
