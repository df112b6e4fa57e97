"""Batched, matrix-free linear operators and solvers for implicit differentiation and Newton steps.

Every solver solves ``B`` independent systems ``A_b x_b = r_b`` given an operator (or only a
batched ``matvec``; see :class:`AbstractLinearSolver`), with per-sample stopping.

- :class:`GMRES`: restarted GMRES, the robust default for nonsymmetric systems.
- :class:`RecyclingGMRES`: GMRES that deflates a subspace recycled from its previous solves
  (GCRO; for sequences of related systems).
- :class:`BiCGStab`: short recurrences, two matvecs per step, constant memory.
- :class:`Neumann`: damped Richardson / truncated Neumann series (the classical DEQ
  fixed-point backward pass); needs a contractive iteration.
- :class:`Dense`: assembles the matrices and solves directly; the exact reference. It
  factorises once per operator (``init``) and reuses that for every right-hand side.

Operators (:class:`AbstractLinearOperator`): :class:`JacobianOperator` (the matrix-free
Jacobian of a cell at a point: ``mv`` = J v, ``rmv`` = J^T u), :class:`IdentityMinus`
(I - A; ``IdentityMinus(J).T`` is the implicit backward operator I - J^T),
:class:`MatrixOperator`, :class:`FunctionOperator` and :class:`LowRankUpdate`
(I + U V^T per sample: a quasi-Newton inverse, used as a preconditioner).

Every solver takes an optional ``preconditioner`` (an operator or ``v -> P v`` with
P ~ A^{-1}; :meth:`AbstractLinearSolver.solve`) and reports ``nprecond``, and GMRES and
Neumann estimate ||A^{-1}||_2 per sample (``LinearSolution.inv_norm``).
"""

from ._base import AbstractLinearSolver as AbstractLinearSolver
from ._base import LinearSolution as LinearSolution
from ._base import LinearSolverState as LinearSolverState
from ._lowrank import LowRankUpdate as LowRankUpdate
from ._operator import AbstractLinearOperator as AbstractLinearOperator
from ._operator import FunctionOperator as FunctionOperator
from ._operator import IdentityMinus as IdentityMinus
from ._operator import JacobianOperator as JacobianOperator
from ._operator import MatrixOperator as MatrixOperator
from .bicgstab import BiCGStab as BiCGStab
from .dense import Dense as Dense
from .gmres import GMRES as GMRES
from .neumann import Neumann as Neumann
from .recycle import RecycledSpace as RecycledSpace
from .recycle import RecyclingGMRES as RecyclingGMRES

__all__ = [
    "GMRES",
    "AbstractLinearOperator",
    "AbstractLinearSolver",
    "BiCGStab",
    "Dense",
    "FunctionOperator",
    "IdentityMinus",
    "JacobianOperator",
    "LinearSolution",
    "LinearSolverState",
    "LowRankUpdate",
    "MatrixOperator",
    "Neumann",
    "RecycledSpace",
    "RecyclingGMRES",
]
