"""Batched, matrix-free linear solvers for implicit differentiation and Newton steps.

Every solver solves ``B`` independent systems ``A_b x_b = r_b`` given only a batched
``matvec`` (see :class:`AbstractLinearSolver`), with per-sample stopping.

- :class:`GMRES`: restarted GMRES, the robust default for nonsymmetric systems.
- :class:`BiCGStab`: short recurrences, two matvecs per step, constant memory.
- :class:`Neumann`: damped Richardson / truncated Neumann series (the classical DEQ
  fixed-point backward pass); needs a contractive iteration.
- :class:`Dense`: assembles the matrices and solves directly; the exact reference.
"""

from ._base import AbstractLinearSolver as AbstractLinearSolver
from ._base import LinearSolution as LinearSolution
from .bicgstab import BiCGStab as BiCGStab
from .dense import Dense as Dense
from .gmres import GMRES as GMRES
from .neumann import Neumann as Neumann

__all__ = ["GMRES", "AbstractLinearSolver", "BiCGStab", "Dense", "LinearSolution", "Neumann"]
