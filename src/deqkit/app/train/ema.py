"""Exponential moving average of a model's weights (``deqkit train --ema``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn


class WeightEMA:
    r"""Exponential moving average of a model's floating-point parameters.

    After the ``t``-th :meth:`update` (one per optimiser step) the average is

    .. math:: \bar w_1 = w_1, \qquad \bar w_t = d\,\bar w_{t-1} + (1 - d)\,w_t,

    the rule of ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn(d)`` (whose
    update function is used here). Unlike ``AveragedModel`` no copy of the module is kept:
    only the averaged tensors, by parameter name, and :meth:`applied` swaps them into the
    model for evaluation. So buffers (dropout masks, spectral-norm vectors) stay the model's
    own, and the averaged tensors go into checkpoints as plain tensors
    (:meth:`state_dict`), which makes ``--resume`` continue the average exactly.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> ema = WeightEMA(model, 0.9)
        >>> ema.update(model); ema.n_averaged
        1
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        self.decay = float(decay)
        self.names = [n for n, p in model.named_parameters() if p.is_floating_point()]
        self.params = {n: p.detach().clone() for n, p in model.named_parameters()
                       if n in self.names}
        self.n_averaged = 0
        self._avg = get_ema_multi_avg_fn(self.decay)

    def _model_params(self, model: nn.Module) -> list[Tensor]:
        named = dict(model.named_parameters())
        return [named[n].detach() for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current parameters into the average (the first call copies)."""
        current = self._model_params(model)
        avg = [self.params[n] for n in self.names]
        if self.n_averaged == 0:
            torch._foreach_copy_(avg, current)
        else:
            self._avg(avg, current, self.n_averaged)
        self.n_averaged += 1

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block the model holds the averaged parameters (restored afterwards)."""
        if self.n_averaged == 0:
            yield model
            return
        current = self._model_params(model)
        saved = [p.clone() for p in current]
        with torch.no_grad():
            torch._foreach_copy_(current, [self.params[n] for n in self.names])
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(current, saved)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the average (``deqkit eval``)."""
        named = dict(model.named_parameters())
        for n, t in self.params.items():
            named[n].copy_(t)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "n_averaged": self.n_averaged,
                "params": {n: t.clone() for n, t in self.params.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.names) - set(state["params"])
        if missing:
            raise ValueError(f"the checkpoint's weight average lacks {sorted(missing)}.")
        with torch.no_grad():
            for n in self.names:
                self.params[n].copy_(state["params"][n])
        self.n_averaged = int(state["n_averaged"])


def averaged(ema: WeightEMA | None, model: nn.Module) -> Any:
    """``ema.applied(model)``, or a no-op context without an average."""
    return ema.applied(model) if ema is not None else contextlib.nullcontext(model)


__all__ = ["WeightEMA", "averaged"]
