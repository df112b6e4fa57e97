from ._base import AbstractAdjoint as AbstractAdjoint
from ._base import HigherOrderError as HigherOrderError
from .implicit import BackwardSolveWarning as BackwardSolveWarning
from .implicit import ImplicitAdjoint as ImplicitAdjoint
from .jacobian_free import JacobianFreeAdjoint as JacobianFreeAdjoint
from .onestep import OneStepAdjoint as OneStepAdjoint
from .phantom import PhantomAdjoint as PhantomAdjoint
from .unrolled import UnrolledAdjoint as UnrolledAdjoint
