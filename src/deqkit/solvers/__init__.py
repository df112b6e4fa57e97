from ._base import AbstractFixedPointSolver as AbstractFixedPointSolver
from .anderson import Anderson as Anderson
from .broyden import Broyden as Broyden
from .newton_krylov import NewtonKrylov as NewtonKrylov
from .picard import Picard as Picard
from .fallback import FallbackChain as FallbackChain
