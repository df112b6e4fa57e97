"""HyperDEQ: learned solvers for a trained DEQ, above the driver (they run the core engine).

* :mod:`~deqkit.hyperdeq.solver`: :class:`HyperAnderson`, the learned Anderson solver (the
  engine's solver protocol);
* :mod:`~deqkit.hyperdeq.networks`: its initialiser, update network and preconditioner;
* :mod:`~deqkit.hyperdeq.train`: :func:`train_hyper_solver` and :func:`pretrain_initialiser`,
  which train those networks with the DEQ frozen.
"""

from .solver import HyperAnderson as HyperAnderson
from .train import pretrain_initialiser as pretrain_initialiser
from .train import train_hyper_solver as train_hyper_solver

__all__ = ["HyperAnderson", "pretrain_initialiser", "train_hyper_solver"]
