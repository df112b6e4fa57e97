"""Neural-network modules built on the deqkit core."""

from ..stability import cached_parametrizations as cached_parametrizations
from ..stability import scale_to_contractive as scale_to_contractive
from ..stability import spectral_norm as spectral_norm
from ..stability import weight_norm as weight_norm
from ._cache import FixedPointCache as FixedPointCache
from ._deq import DEQ as DEQ
from ._deq import DEQWarning as DEQWarning
from ._dropout import VariationalDropout as VariationalDropout
from ._dropout import VariationalDropout2d as VariationalDropout2d
from ._dropout import reset_dropout as reset_dropout
from ._dropout import select_dropout as select_dropout
from ._monotone import ForwardBackward as ForwardBackward
from ._monotone import MonotoneDEQ as MonotoneDEQ
from ._monotone import MonotoneLinear as MonotoneLinear
from ._monotone import PeacemanRachford as PeacemanRachford
from ._schedule import DEQSchedule as DEQSchedule
from .hypernetwork import HyperNetwork as HyperNetwork
