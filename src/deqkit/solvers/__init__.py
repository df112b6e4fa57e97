from ._base import AbstractFixedPointSolver as AbstractFixedPointSolver
from .anderson import Anderson as Anderson
from .broyden import Broyden as Broyden
from .fallback import FallbackChain as FallbackChain
from .fixed import FixedSteps as FixedSteps
from .newton_krylov import NewtonKrylov as NewtonKrylov
from .picard import Picard as Picard
from .reversible import Reversible as Reversible
