"""The one training engine behind ``deqkit train``, ``deqkit compare`` and the benchmarks.

:func:`fit` is the loop (in memory, any loss); :func:`train` wraps it in a run folder
(checkpoints, resume, metrics.jsonl, TensorBoard); :func:`evaluate` is the one evaluation.
"""

from .checkpoint import load_checkpoint as load_checkpoint
from .checkpoint import read_run_config as read_run_config
from .checkpoint import save_checkpoint as save_checkpoint
from .ema import WeightEMA as WeightEMA
from .eval_run import eval_checkpoint as eval_checkpoint
from .eval_run import plot_run as plot_run
from .evaluate import LossFn as LossFn
from .evaluate import backward_failures as backward_failures
from .evaluate import cross_entropy as cross_entropy
from .evaluate import evaluate as evaluate
from .evaluate import loss_and_correct as loss_and_correct
from .evaluate import solver_stats as solver_stats
from .fit import FitResult as FitResult
from .fit import FitState as FitState
from .fit import StepInfo as StepInfo
from .fit import fit as fit
from .plots import plot_history as plot_history
from .plots import plot_residual_traces as plot_residual_traces
from .run import train as train
from .setup import build_model as build_model
from .setup import make_optimizer as make_optimizer
from .step import StepOptions as StepOptions
from .step import TrainingDiverged as TrainingDiverged
from .step import random_shift as random_shift

__all__ = ["FitResult", "FitState", "LossFn", "StepInfo", "StepOptions", "TrainingDiverged",
           "WeightEMA", "backward_failures", "build_model", "cross_entropy", "eval_checkpoint",
           "evaluate", "fit", "load_checkpoint", "loss_and_correct", "make_optimizer",
           "plot_history", "plot_residual_traces", "plot_run", "random_shift",
           "read_run_config", "save_checkpoint", "solver_stats", "train"]
