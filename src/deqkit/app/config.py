"""Training configuration: the one place a setting is declared (type, default, help, allowed
values), its validation, TOML/YAML/JSON files, and the model presets.

``deqkit train`` derives every flag from :class:`TrainConfig`'s fields: the flag is the field
name with dashes (``batch_size`` -> ``--batch-size``) unless the field's metadata names one,
and the help text is the field's ``help`` plus its default, so nothing is written twice.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import deqkit as dk

from . import names

SOLVERS = tuple(names.SOLVERS)
ADJOINTS = tuple(names.ADJOINTS)
BACKWARD_SOLVERS = tuple(names.LINEAR_SOLVERS)
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
# the forms `deqkit.data.load_dataset` accepts (kept in step by tests/test_cli_usage.py)
DATA_FORMS = {
    "digits": "8x8 handwritten digits",
    "mnist1d": "1-D signals",
    "text": "character-level Shakespeare, for the language models",
    "npz:PATH": "x_train/y_train/x_test/y_test arrays (x_val/y_val optional; CIFAR-10: "
                "deqkit.data.cifar10_to_npz)",
    "folder:PATH": "images, one sub-folder per class",
}


def _meta(help: str, choices: tuple[str, ...] = (), flag: str | None = None) -> dict[str, Any]:
    return {"help": help, "choices": choices, "flag": flag}


def _setting(default: Any, help: str, *, choices: tuple[str, ...] = (),
             flag: str | None = None) -> Any:
    """A :class:`TrainConfig` field with its help text, allowed values and flag name."""
    return dataclasses.field(default=default, metadata=_meta(help, choices, flag))


def _list(options: Any) -> str:
    return ", ".join(options)


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on. Saved as ``config.json`` in the run folder and
    inside every checkpoint, so ``--resume`` and ``deqkit eval`` rebuild the same run."""

    model: str = _setting("conv_deq", f"zoo model: {_list(sorted(names.MODELS))}")
    data: str = _setting("digits", "dataset: " + "; ".join(
        f"{k} = {v}" for k, v in DATA_FORMS.items()))
    data_root: str | None = _setting(None, "folder for cached data and base of relative "
                                     "data paths")
    data_args: dict = dataclasses.field(default_factory=dict, metadata=_meta(
        "dataset option, repeatable (e.g. --data-arg block_size=32 for text)", flag="--data-arg"))
    model_args: dict = dataclasses.field(default_factory=dict, metadata=_meta(
        "model hyperparameter, repeatable (e.g. --model-arg channels=48)", flag="--model-arg"))
    subset: int | None = _setting(None, "use only the first N training samples")
    epochs: int = _setting(10, "training epochs")
    batch_size: int = _setting(64, "batch size, global over all processes")
    lr: float = _setting(2e-3, "peak learning rate")
    weight_decay: float = _setting(1e-4, "weight decay (matrices only)")
    optimizer: str = _setting("adamw", "optimiser", choices=OPTIMIZERS)
    schedule: str = _setting("cosine", "learning-rate schedule", choices=SCHEDULES)
    grad_clip: float | None = _setting(1.0, "clip the gradient norm to this value; 'none' = "
                                       "no clipping")
    label_smoothing: float = _setting(0.0, "label smoothing in [0, 1]")
    augment_shift: int = _setting(0, "random roll of signals/images by up to N positions")
    ema: float = _setting(0.0, "exponential moving average of the weights with this decay "
                          "(e.g. 0.99), updated after every optimiser step and used for "
                          "validation, test, best.pt and `deqkit eval`; 0 = off")
    warm_start: bool = _setting(False, "start each training solve from the sample's "
                                "equilibrium of the last epoch (dk.nn.FixedPointCache; single "
                                "process); the cache is saved in the run's last.pt (key "
                                "'warm_start') so --resume continues exactly")
    warm_start_unfinished: bool = _setting(False, "with --warm-start, also store the samples "
                                           "whose solve stopped at the step budget (their "
                                           "lowest-residual iterate, if finite), not only the "
                                           "converged ones: with a small or growing budget "
                                           "(--max-steps-start) most early solves stop there")
    seed: int = _setting(0, "random seed")
    threads: int | None = _setting(1, "torch intra-op threads; 'none' = torch's default")
    device: str = _setting("auto", "auto = CUDA if present, else cpu; or cpu, cuda, cuda:N")
    precision: str = _setting("fp32", "autocast precision, fp16 with a GradScaler",
                              choices=PRECISIONS)
    solver: str = _setting("anderson", "forward fixed-point solver", choices=SOLVERS)
    solver_args: dict = dataclasses.field(default_factory=dict, metadata=_meta(
        "forward solver option, repeatable (e.g. --solver-arg m=6)", flag="--solver-arg"))
    rtol: float = _setting(1e-3, "forward relative tolerance")
    atol: float = _setting(0.0, "forward absolute tolerance")
    max_steps: int = _setting(20, "forward step budget in training")
    eval_max_steps: int = _setting(40, "forward step budget in evaluation")
    max_steps_start: int | None = _setting(None, "training step budget at the first "
                                           "equilibrium step, growing linearly to max_steps "
                                           "at the last step (dk.nn.DEQSchedule); 'none' = "
                                           "max_steps throughout")
    unroll_warmup: float = _setting(0.0, "epochs (fractions allowed) at the start in which "
                                    "the DEQ layer is a weight-tied network of unroll_depth "
                                    "cell applications, backpropagated through (the DEQ "
                                    "papers' pretraining; no solver, no warm start); 0 = off")
    unroll_depth: int = _setting(4, "cell applications in the unrolled warm-up")
    adjoint: str = _setting("implicit", "gradient method", choices=ADJOINTS)
    backward_solver: str = _setting("gmres", "linear solver of the implicit adjoint",
                                    choices=BACKWARD_SOLVERS)
    backward_rtol: float = _setting(1e-4, "backward relative tolerance")
    backward_max_steps: int = _setting(20, "backward iteration budget")
    reuse_forward: bool = _setting(False, "implicit adjoint: start and right-precondition the "
                                   "backward solve with the forward solver's estimate of "
                                   "(I - J)^-1 (anderson, broyden); still solved to "
                                   "backward_rtol")
    backward_rtol_from_forward: bool = _setting(False, "implicit adjoint: per-sample backward "
                                                "tolerance max(backward_rtol, 0.1 x the "
                                                "forward relative residual)")
    adjoint_cache: bool = _setting(False, "implicit adjoint: start each sample's backward "
                                   "solve from its adjoint vector of the last epoch (best "
                                   "multiple, one extra VJP; single process); saved in last.pt "
                                   "(key 'adjoint_cache')")
    reversible_checkpoint: int = _setting(4, "reversible adjoint: keep the exact iterates every "
                                          "N steps (bounds the reconstruction error; memory "
                                          "O(steps/N)); 0 = only the start")
    shine_refine: int = _setting(0, "shine adjoint: preconditioned refinement steps of "
                                 "u = M^T g (one VJP each)")
    phantom_steps: int = _setting(5, "phantom adjoint: damped steps from z*")
    phantom_damping: float = _setting(0.5, "phantom adjoint: damping in (0, 1]")
    residual_weight: float = _setting(1.0, "onestep adjoint: fixed-point residual penalty")
    jac_reg: float = _setting(0.0, "Jacobian regularisation weight")
    jac_reg_freq: float = _setting(1.0, "fraction of steps with the Jacobian regulariser")
    out: str | None = _setting(None, "run folder; default runs/MODEL-DATA-seedN")
    log_every: int = _setting(0, "also log every N training steps to metrics.jsonl; 0 = off")
    progress: bool = _setting(True, "progress bars")
    plots: bool = _setting(True, "PNG plots at the end of the run; `deqkit plot RUN` draws "
                           "them at any time")
    tensorboard: bool = _setting(False, "also write TensorBoard scalars to RUN/tensorboard/; "
                                 "needs `pip install 'deqkit[tensorboard]'`")

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_dir(self) -> str:
        return self.out or os.path.join("runs", f"{self.model}-{self.data}-seed{self.seed}")

    def build_solver(self) -> dk.AbstractFixedPointSolver:
        return names.build_solver(self.solver, rtol=self.rtol, atol=self.atol,
                                  **self.solver_args)

    def build_adjoint(self) -> dk.AbstractAdjoint:
        lin = names.build_linear_solver(self.backward_solver, rtol=self.backward_rtol, atol=0.0,
                                        max_steps=self.backward_max_steps)
        return names.build_adjoint(self.adjoint, linear_solver=lin,
                                   phantom_steps=self.phantom_steps,
                                   phantom_damping=self.phantom_damping,
                                   residual_weight=self.residual_weight,
                                   reuse_forward=self.reuse_forward,
                                   rtol_from_forward=self.backward_rtol_from_forward,
                                   shine_refine=self.shine_refine,
                                   reversible_checkpoint=self.reversible_checkpoint)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
_FIELDS = FIELDS


def default_of(key: str) -> Any:
    """The default value of the config field ``key``."""
    f = FIELDS[key]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def _fail(key: str, value: Any, want: str) -> None:
    raise ValueError(f"config `{key}` = {value!r} is invalid: {want}.")


def _check_names(cfg: TrainConfig) -> None:
    """The non-numeric fields: names (with the closest valid one), paths, tables, switches."""
    for key in ("model", "data"):
        if not isinstance(getattr(cfg, key), str) or not getattr(cfg, key):
            _fail(key, getattr(cfg, key), "expected a non-empty string")
    if cfg.model not in names.MODELS:
        raise names.unknown("model", cfg.model, names.MODELS)
    for key in ("out", "data_root"):
        v = getattr(cfg, key)
        if v is not None and (not isinstance(v, str) or not v):
            _fail(key, v, "expected a folder path (a non-empty string, e.g. \"runs/a\")")
    for key in ("data_args", "model_args", "solver_args"):
        if not isinstance(getattr(cfg, key), dict):
            _fail(key, getattr(cfg, key), "expected a table/dict of keyword arguments")
    for key, f in FIELDS.items():
        v, options = getattr(cfg, key), f.metadata["choices"]
        if options and v not in options:
            raise ValueError(f"config `{key}` = {v!r} is invalid{names.suggest(v, options)}: "
                             f"choose one of {list(options)}.")
    if not isinstance(cfg.device, str) or not _valid_device(cfg.device):
        _fail("device", cfg.device, "expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    for key in ("progress", "plots", "warm_start", "tensorboard", "reuse_forward",
                "backward_rtol_from_forward", "adjoint_cache", "warm_start_unfinished"):
        if not isinstance(getattr(cfg, key), bool):
            _fail(key, getattr(cfg, key), "expected true or false")


def validate(cfg: TrainConfig) -> None:
    """Check every field; raise ValueError naming the field, the value and what is allowed."""

    def positive_int(key: str, allow_zero: bool = False) -> None:
        v = getattr(cfg, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
            _fail(key, v, f"expected an int >= {0 if allow_zero else 1}")

    def number(key: str, lo: float, hi: float = float("inf"), open_lo: bool = False) -> None:
        v = getattr(cfg, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            _fail(key, v, "expected a number")
        if not math.isfinite(v):
            _fail(key, v, f"expected a finite number in {'(' if open_lo else '['}{lo}, "
                  f"{hi}{')' if math.isinf(hi) else ']'}")
        if not ((v > lo) if open_lo else (v >= lo)) or v > hi:
            _fail(key, v, f"expected a number in {'(' if open_lo else '['}{lo}, {hi}]")

    _check_names(cfg)
    for key in ("epochs", "batch_size", "max_steps", "eval_max_steps", "backward_max_steps",
                "phantom_steps", "unroll_depth"):
        positive_int(key)
    for key in ("seed", "log_every", "augment_shift", "shine_refine", "reversible_checkpoint"):
        positive_int(key, allow_zero=True)
    for key in ("subset", "threads", "max_steps_start"):
        if getattr(cfg, key) is not None:
            positive_int(key)
    _check_schedule(cfg, number)
    number("lr", 0.0, open_lo=True)
    number("weight_decay", 0.0)
    number("label_smoothing", 0.0, 1.0)
    if isinstance(cfg.ema, (int, float)) and not isinstance(cfg.ema, bool) \
            and not 0.0 <= cfg.ema < 1.0:
        _fail("ema", cfg.ema, "expected a decay in [0, 1) (flag --ema), e.g. 0.99 (an average "
              "over about 1/(1 - decay) = 100 optimiser steps), or 0 for no weight averaging")
    for key in ("ema", "rtol", "atol", "backward_rtol", "residual_weight", "jac_reg"):
        number(key, 0.0, 1.0 if key == "ema" else float("inf"))
    if cfg.rtol == 0 and cfg.atol == 0:
        _fail("rtol", cfg.rtol, "rtol and atol cannot both be 0")
    number("phantom_damping", 0.0, 1.0, open_lo=True)
    number("jac_reg_freq", 0.0, 1.0, open_lo=True)
    if cfg.grad_clip is not None:
        number("grad_clip", 0.0, open_lo=True)
    if cfg.adjoint == "reversible" and cfg.solver != "reversible":
        _fail("adjoint", cfg.adjoint, f"the reversible adjoint rebuilds the steps of "
              f"--solver reversible, not {cfg.solver!r}; pass --solver reversible")


def _check_schedule(cfg: TrainConfig, number: Any) -> None:
    """The DEQ training schedule: warm-up shorter than the run, budget start <= max_steps."""
    if cfg.warm_start_unfinished and not cfg.warm_start:
        _fail("warm_start_unfinished", True, "it says which samples --warm-start stores; "
              "add --warm-start or drop --warm-start-unfinished")
    number("unroll_warmup", 0.0)
    if cfg.unroll_warmup >= cfg.epochs:
        _fail("unroll_warmup", cfg.unroll_warmup,
              f"the warm-up must end before the last of the {cfg.epochs} epochs (else the "
              "run never solves the equilibrium); e.g. --unroll-warmup 1, or 0 for none")
    if cfg.max_steps_start is not None and cfg.max_steps_start > cfg.max_steps:
        _fail("max_steps_start", cfg.max_steps_start,
              f"the budget grows from max_steps_start to max_steps = {cfg.max_steps}, so it "
              "must not exceed it; lower --max-steps-start or raise --max-steps")


def _valid_device(name: str) -> bool:
    if name in ("auto", "cpu", "cuda"):
        return True
    head, _, idx = name.partition(":")
    return head == "cuda" and idx.isdigit()


def resolve_device(name: str) -> Any:
    """The ``torch.device`` of a config's ``device`` (``auto``: CUDA when available)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"config `device` = {name!r}: no CUDA device is available here; "
                         "use 'cpu' or 'auto'.")
    return dev


# Training settings a model needs to train well, applied by ``deqkit train`` to a new run for
# every key the user did not set (flags or config file); recorded in the run's config.json.
# The DEQ transformer trains with one Picard step and the one-step adjoint (with its
# fixed-point residual penalty) and is solved to equilibrium at test time: 2.52 test bpc vs
# 3.24 with Anderson + implicit GMRES at 20 steps (benchmarks/bench_lm.py, 90 s of CPU).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "deq_transformer": {"solver": "picard", "rtol": 1e-4, "atol": 1e-6, "max_steps": 1,
                        "eval_max_steps": 50, "adjoint": "onestep", "lr": 1e-2},
}


def preset_for(values: dict[str, Any]) -> dict[str, Any]:
    """The settings of the model's :data:`MODEL_PRESETS` that ``values`` leaves unset."""
    preset = MODEL_PRESETS.get(values.get("model", default_of("model")), {})
    return {k: v for k, v in preset.items() if k not in values}


def with_model_preset(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with the model's :data:`MODEL_PRESETS` filled in where unset."""
    return {**preset_for(values), **values}


def preset_line(model: str, applied: dict[str, Any]) -> str:
    """The one line ``deqkit train`` prints for a preset it applied."""
    settings = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in applied.items())
    return f"preset for {model}: {settings} (override any with its flag)"


def from_mapping(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a config from a mapping, rejecting unknown keys with the closest valid one."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        hints = ", ".join(f"{k!r}{names.suggest(k, FIELDS)}" for k in unknown
                          if names.suggest(k, FIELDS))
        raise ValueError(f"{source}: unknown key(s) {unknown}{': ' + hints if hints else ''}; "
                         f"valid keys are {sorted(FIELDS)}.")
    return TrainConfig(**values)


def _read(path: str, ext: str) -> Any:
    """The parsed contents of a config file (ValueError with the parser's message)."""
    try:
        if ext == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            with open(path, "rb") as fh:
                return tomllib.load(fh)
        with open(path, encoding="utf-8") as fh:
            if ext == ".json":
                return json.load(fh)
            import yaml

            return yaml.safe_load(fh) or {}
    except OSError as err:
        raise ValueError(f"config file {path!r} cannot be read: {err.strerror}.") from None
    except Exception as err:  # parse errors of any of the three formats
        msg = " ".join(str(err).split())
        raise ValueError(f"config file {path!r} could not be parsed: {msg}") from None


def load_file(path: str) -> dict[str, Any]:
    """Read a TOML (``.toml``), YAML (``.yaml``/``.yml``, needs PyYAML) or JSON config file."""
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist.")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".toml", ".yaml", ".yml", ".json"):
        raise ValueError(
            f"config file {path!r}: unknown extension {ext!r}; use .toml, .yaml or .json."
        )
    if ext in (".yaml", ".yml"):
        try:
            import yaml  # noqa: F401
        except ModuleNotFoundError:
            raise ValueError(
                f"config file {path!r} is YAML but PyYAML is not installed: "
                "`pip install 'deqkit[cli]'` (or pyyaml), or use a .toml/.json file."
            ) from None
    data = _read(path, ".yaml" if ext == ".yml" else ext)
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} must contain a table of keys, got "
                         f"{type(data).__name__}.")
    return data


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}"
                               for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def to_toml(values: dict[str, Any]) -> str:
    """``values`` as TOML. TOML has no null: a key set to None is written as a comment, which
    reads back as its default, so it is written only where the default is None too."""
    lines, tables = [], []
    for key, v in values.items():
        if isinstance(v, dict):
            if not v:
                continue
            tables.append(f"\n[{key}]\n" + "".join(f"{json.dumps(str(k))} = {_toml_value(x)}\n"
                                                   for k, x in v.items()))
        elif v is None:
            if default_of(key) is not None:
                raise ValueError(f"config `{key}` = None cannot be written as TOML (it has no "
                                 "null); use --print-config yaml or json.")
            lines.append(f"# {key} = (none)\n")
        else:
            lines.append(f"{key} = {_toml_value(v)}\n")
    return "".join(lines) + "".join(tables)


def dump(cfg: TrainConfig, fmt: str = "toml") -> str:
    """``cfg`` as a TOML, YAML or JSON file that ``deqkit train --config`` reads back."""
    values = cfg.to_dict()
    if fmt == "json":
        return json.dumps(values, indent=2) + "\n"
    if fmt == "yaml":
        try:
            import yaml
        except ModuleNotFoundError:
            raise ValueError("--print-config yaml needs PyYAML: `pip install 'deqkit[cli]'`; "
                             "or use toml or json.") from None
        return yaml.safe_dump(values, sort_keys=False)
    if fmt == "toml":
        return to_toml(values)
    raise ValueError(f"unknown config format {fmt!r}; choose toml, yaml or json.")


def parse_value(text: str) -> Any:
    """Parse ``--model-arg k=v`` values: JSON when possible (numbers, true/false, lists)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_pairs(pairs: list[str] | None, flag: str) -> dict[str, Any]:
    """``["k=v", ...]`` of a repeatable ``flag`` as a dict (values as :func:`parse_value`)."""
    out: dict[str, Any] = {}
    for item in pairs or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r} (e.g. {flag} width=32).")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value.strip())
    return out
