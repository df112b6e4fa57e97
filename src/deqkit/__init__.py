"""deqkit: deep equilibrium models and implicit layers for PyTorch.

>>> import deqkit as dk
>>> sorted(m.name for m in dk.RESULTS)
['diverged', 'max_steps_reached', 'nonfinite', 'stagnated', 'successful']
"""

from . import nn as nn
from . import stability as stability
from . import zoo as zoo
from ._fixed_point import ToleranceWarning as ToleranceWarning
from ._fixed_point import fixed_point as fixed_point
from ._minimise import minimise as minimise
from ._root_find import root_find as root_find
from ._solution import RESULTS as RESULTS
from ._solution import Solution as Solution
from ._solution import SolverError as SolverError
from .adjoint import AbstractAdjoint as AbstractAdjoint
from .adjoint import BackwardSolveWarning as BackwardSolveWarning
from .adjoint import HigherOrderError as HigherOrderError
from .adjoint import ImplicitAdjoint as ImplicitAdjoint
from .adjoint import JacobianFreeAdjoint as JacobianFreeAdjoint
from .adjoint import OneStepAdjoint as OneStepAdjoint
from .adjoint import PhantomAdjoint as PhantomAdjoint
from .adjoint import ReconstructionWarning as ReconstructionWarning
from .adjoint import ReversibleAdjoint as ReversibleAdjoint
from .adjoint import SHINEAdjoint as SHINEAdjoint
from .adjoint import UnrolledAdjoint as UnrolledAdjoint
from .adjoint import UnsupportedTransformError as UnsupportedTransformError
from .hyperdeq import HyperAnderson as HyperAnderson
from .hyperdeq import train_hyper_solver as train_hyper_solver
from .linear import GMRES as GMRES
from .linear import AbstractLinearSolver as AbstractLinearSolver
from .linear import BiCGStab as BiCGStab
from .linear import Dense as Dense
from .linear import LinearSolution as LinearSolution
from .linear import Neumann as Neumann
from .linear import RecyclingGMRES as RecyclingGMRES
from .nn._export import FixedStepDEQ as FixedStepDEQ
from .nn._export import FixedStepModel as FixedStepModel
from .nn._export import export_fixed_steps as export_fixed_steps
from .nn._export import residual_at as residual_at
from .solvers import AbstractFixedPointSolver as AbstractFixedPointSolver
from .solvers import Anderson as Anderson
from .solvers import Broyden as Broyden
from .solvers import FallbackChain as FallbackChain
from .solvers import FixedSteps as FixedSteps
from .solvers import NewtonKrylov as NewtonKrylov
from .solvers import Picard as Picard
from .solvers import Reversible as Reversible
from .stability import StabilityReport as StabilityReport
from .stability import fixed_point_correction_loss as fixed_point_correction_loss
from .stability import jacobian_frobenius_reg as jacobian_frobenius_reg
from .stability import jacobian_spectral_norm as jacobian_spectral_norm
from .stability import jacobian_spectral_radius as jacobian_spectral_radius
from .stability import lipschitz_upper_bound as lipschitz_upper_bound
from .stability import stability_report as stability_report

__version__ = "0.1.0"
