from ._base import AbstractAdjoint as AbstractAdjoint
from ._base import HigherOrderError as HigherOrderError
from .implicit import BackwardSolveWarning as BackwardSolveWarning
from .implicit import ImplicitAdjoint as ImplicitAdjoint
from .jacobian_free import JacobianFreeAdjoint as JacobianFreeAdjoint
from .jacobian_free import PhantomAdjoint as PhantomAdjoint
from .onestep import OneStepAdjoint as OneStepAdjoint
from .unrolled import UnrolledAdjoint as UnrolledAdjoint
