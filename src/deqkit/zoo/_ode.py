"""Neural ODE baseline with the dynamics of the DEQ MLP cell."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_float, check_int
from ._common import activation as _activation
from ._common import (
    check_in_shape,
    check_input,
    check_num_classes,
)


def _torchdiffeq() -> Any:
    try:
        import torchdiffeq
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "NeuralODEClassifier needs torchdiffeq; install it with "
            "`pip install 'deqkit[ode]'` (or `pip install torchdiffeq`)."
        ) from err
    return torchdiffeq


class _Dynamics(nn.Module):
    """``d(z, u)/dt = (phi(W z + u) - z, 0)``, counting its evaluations."""

    def __init__(self, width: int, activation: str) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width, bias=False)
        self.act = _activation("NeuralODEClassifier", activation)
        self.nfe = 0

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        self.nfe += 1
        z, u = state
        return self.act(self.linear(z) + u) - z, torch.zeros_like(u)


class NeuralODEClassifier(nn.Module):
    r"""Neural ODE classifier whose dynamics are the DEQ MLP cell's residual.

    .. math::
        z(0) = 0, \qquad \frac{\mathrm d z}{\mathrm d t} = \phi(W z + U x + b) - z, \qquad
        \text{logits} = V z(T) + c.

    The equilibria of these dynamics are exactly the fixed points of :class:`DEQMLP`'s cell,
    so as :math:`T \to \infty` (and :math:`\|W\| < 1`) the model tends to a DEQ; at finite
    :math:`T` it is a continuous-depth network (Chen et al., "Neural Ordinary Differential
    Equations", NeurIPS 2018). The injection :math:`U x + b` is computed once and carried as
    a constant part of the ODE state, so the adjoint method also returns its gradient.
    Integrated by ``torchdiffeq`` (``odeint_adjoint`` when ``adjoint=True``, else ``odeint``),
    imported lazily: install the ``deqkit[ode]`` extra.

    Args:
        in_shape: per-sample input shape (flattened).
        num_classes: number of classes.
        width: state dimension. Default: 128.
        method: torchdiffeq method. Default: ``"dopri5"``.
        rtol: relative tolerance of the integrator. Default: 1e-3.
        atol: absolute tolerance of the integrator. Default: 1e-4.
        adjoint: use the adjoint method (O(1) memory) for gradients. Default: True.
        t_final: integration time :math:`T`. Default: 1.0.
        activation: ``"tanh"``, ``"relu"`` or ``"gelu"``. Default: ``"tanh"``.

    Attributes:
        nfe: number of dynamics evaluations of the latest forward pass.
        nfe_backward: number of dynamics evaluations of the latest backward pass (adjoint).

    Example:
        >>> import torch
        >>> model = NeuralODEClassifier((6,), 3, width=8)
        >>> model(torch.randn(2, 6)).shape, model.nfe > 0
        (torch.Size([2, 3]), True)
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        width: int = 128,
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-4,
        adjoint: bool = True,
        t_final: float = 1.0,
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        _torchdiffeq()  # fail early, naming the extra
        self.in_shape = check_in_shape(owner, in_shape)
        num_classes = check_num_classes(owner, num_classes)
        width = check_int(owner, "width", width)
        self.rtol = check_float(owner, "rtol", rtol, gt=0)
        self.atol = check_float(owner, "atol", atol, gt=0)
        self.t_final = check_float(owner, "t_final", t_final, gt=0)
        self.method = method
        self.adjoint = bool(adjoint)
        self.inject = nn.Linear(math.prod(self.in_shape), width)
        self.func = _Dynamics(width, activation)
        self.head = nn.Linear(width, num_classes)
        self.nfe = 0
        self._nfe_at_forward_end = 0

    @property
    def nfe_backward(self) -> int:
        return self.func.nfe - self._nfe_at_forward_end

    def forward(self, x: Tensor) -> Tensor:
        check_input(type(self).__name__, x, self.in_shape)
        return self.integrate(x)

    def integrate(self, x: Tensor, *, adjoint: bool | None = None, method: str | None = None,
                  rtol: float | None = None, atol: float | None = None,
                  options: dict[str, Any] | None = None) -> Tensor:
        """The forward pass with another integrator setting (same parameters and dynamics).

        Each argument left as None takes the model's own setting; ``options`` goes to
        torchdiffeq (e.g. ``{"step_size": 0.1}`` for a fixed-step ``method="rk4"``). Used to
        measure the same trained model under other integrators (``deqkit compare``).

        Example:
            >>> import torch
            >>> model = NeuralODEClassifier((6,), 3, width=8)
            >>> x = torch.randn(2, 6)
            >>> fixed = model.integrate(x, adjoint=False, method="rk4",
            ...                         options={"step_size": 0.25})
            >>> model.nfe  # 4 steps of rk4, 4 evaluations each
            16
        """
        u = self.inject(x.flatten(1))
        z0 = torch.zeros_like(u)
        t = torch.tensor([0.0, self.t_final], dtype=u.dtype, device=u.device)
        self.func.nfe = 0
        kw: dict[str, Any] = dict(rtol=self.rtol if rtol is None else rtol,
                                  atol=self.atol if atol is None else atol,
                                  method=method or self.method, options=options)
        tde = _torchdiffeq()
        if self.adjoint if adjoint is None else adjoint:
            kw["adjoint_options"] = options and dict(options)
            zT, _ = tde.odeint_adjoint(
                self.func, (z0, u), t, adjoint_params=tuple(self.func.parameters()), **kw
            )
        else:
            zT, _ = tde.odeint(self.func, (z0, u), t, **kw)
        self.nfe = self.func.nfe
        self._nfe_at_forward_end = self.func.nfe
        return self.head(zT[-1])


__all__ = ["NeuralODEClassifier"]
