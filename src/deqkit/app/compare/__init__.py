"""``deqkit compare``: explicit ResNet vs weight-tied unrolled net vs Neural ODE vs DEQ.

Trains every model family on the same task, data split and comparable parameter budget, and
measures each property of the classic comparison table (forward computation, memory, effective
depth, expressiveness, training speed, gradient accuracy) plus test accuracy. Wire the
subcommand with :func:`add_compare_parser` (``deqkit compare --quick``).
"""

from .expressiveness import homeomorphism_experiment as homeomorphism_experiment
from .measure import ForcedSteps as ForcedSteps
from .measure import deq_gradient_accuracy as deq_gradient_accuracy
from .measure import effective_depth as effective_depth
from .measure import explicit_gradient_accuracy as explicit_gradient_accuracy
from .measure import forced_steps as forced_steps
from .measure import forward_cost as forward_cost
from .measure import gradient_error as gradient_error
from .measure import memory_of as memory_of
from .measure import memory_sweep as memory_sweep
from .measure import ode_gradient_accuracy as ode_gradient_accuracy
from .measure import sweep_factories as sweep_factories
from .measure import training_speed as training_speed
from .memory import fit_slope as fit_slope
from .memory import peak_from_events as peak_from_events
from .memory import peak_live_bytes as peak_live_bytes
from .memory import quiet_profiler as quiet_profiler
from .memory import saved_tensor_bytes as saved_tensor_bytes
from .memory import verify_peak_method as verify_peak_method
from .models import build_models as build_models
from .models import train_model as train_model
from .run import add_compare_parser as add_compare_parser
from .run import run_compare as run_compare
