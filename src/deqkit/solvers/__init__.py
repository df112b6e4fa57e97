from ._base import AbstractFixedPointSolver as AbstractFixedPointSolver
from .anderson import Anderson as Anderson
from .broyden import Broyden as Broyden
from .fallback import FallbackChain as FallbackChain
from .hyper import HyperAnderson as HyperAnderson
from .hyper import train_hyper_solver as train_hyper_solver
from .newton_krylov import NewtonKrylov as NewtonKrylov
from .picard import Picard as Picard
