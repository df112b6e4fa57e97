"""Model zoo: deep equilibrium models and the explicit baselines they are compared with.

Classifiers are built as ``Model(in_shape, num_classes, **hyperparameters)`` with ``in_shape``
the per-sample input shape (``(F,)`` vectors, ``(C, L)`` signals, ``(C, H, W)`` images) and map
``(B, *in_shape)`` to ``(B, num_classes)`` logits; the language models map token ids
``(B, T)`` to ``(B, T, vocab_size)``. Every DEQ model exposes its equilibrium layer as
``model.deq`` (``model.deq.last_solution.stats`` after a forward pass).

>>> import torch
>>> from deqkit.zoo import build_model
>>> model = build_model("conv_deq", (1, 8, 8), 10, channels=8, groups=2)
>>> model(torch.randn(2, 1, 8, 8)).shape
torch.Size([2, 10])
"""

from ._common import default_adjoint as default_adjoint
from ._common import default_solver as default_solver
from ._conv import ConvDEQ as ConvDEQ
from ._conv import ResidualCell as ResidualCell
from ._conv import ResNetConv as ResNetConv
from ._mdeq import MDEQ as MDEQ
from ._mdeq import MultiscaleCell as MultiscaleCell
from ._mlp import DEQMLP as DEQMLP
from ._mlp import MLPCell as MLPCell
from ._mlp import MonotoneClassifier as MonotoneClassifier
from ._mlp import ResNetMLP as ResNetMLP
from ._ode import NeuralODEClassifier as NeuralODEClassifier
from ._registry import MODELS as MODELS
from ._registry import build_model as build_model
from ._registry import hyperparameters as hyperparameters
from ._transformer import CausalSelfAttention as CausalSelfAttention
from ._transformer import DEQTransformerLM as DEQTransformerLM
from ._transformer import TransformerCell as TransformerCell
from ._transformer import TransformerLM as TransformerLM
from ._unrolled import UnrolledConv as UnrolledConv
from ._unrolled import UnrolledMLP as UnrolledMLP
from ._unrolled import unrolled as unrolled
