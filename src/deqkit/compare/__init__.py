"""``deqkit compare``: explicit ResNet vs weight-tied unrolled net vs Neural ODE vs DEQ.

Trains every model family on the same task, data split and comparable parameter budget, and
measures each property of the classic comparison table (forward computation, memory, effective
depth, expressiveness, training speed, gradient accuracy) plus test accuracy. Wire the
subcommand with :func:`add_compare_parser`; or run ``python -m deqkit.compare --quick``.
"""

from ._expressiveness import homeomorphism_experiment as homeomorphism_experiment
from ._measure import deq_gradient_accuracy as deq_gradient_accuracy
from ._measure import effective_depth as effective_depth
from ._measure import explicit_gradient_accuracy as explicit_gradient_accuracy
from ._measure import forward_cost as forward_cost
from ._measure import gradient_error as gradient_error
from ._measure import memory_of as memory_of
from ._measure import memory_sweep as memory_sweep
from ._measure import ode_gradient_accuracy as ode_gradient_accuracy
from ._measure import sweep_factories as sweep_factories
from ._measure import training_speed as training_speed
from ._memory import fit_slope as fit_slope
from ._memory import peak_from_events as peak_from_events
from ._memory import peak_live_bytes as peak_live_bytes
from ._memory import saved_tensor_bytes as saved_tensor_bytes
from ._memory import verify_peak_method as verify_peak_method
from ._models import build_models as build_models
from ._models import train_model as train_model
from ._run import add_compare_parser as add_compare_parser
from ._run import run_compare as run_compare
