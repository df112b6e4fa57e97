"""HyperDEQ: learned solvers for a trained DEQ, above the driver (they run the engine through
:func:`deqkit.fixed_point`)."""

from ._hyper import HyperAnderson as HyperAnderson
from ._hyper import pretrain_initialiser as pretrain_initialiser
from ._hyper import train_hyper_solver as train_hyper_solver
