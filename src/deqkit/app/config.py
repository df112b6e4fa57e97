"""Training configuration: defaults, validation, TOML/YAML files and command-line overrides."""

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


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on. Saved as ``config.json`` in the run folder and
    inside every checkpoint, so ``--resume`` and ``deqkit eval`` rebuild the same run."""

    model: str = "conv_deq"
    data: str = "digits"
    data_root: str | None = None
    data_args: dict = dataclasses.field(default_factory=dict)
    model_args: dict = dataclasses.field(default_factory=dict)
    subset: int | None = None
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    schedule: str = "cosine"
    grad_clip: float | None = 1.0
    label_smoothing: float = 0.0
    augment_shift: int = 0
    ema: float = 0.0
    warm_start: bool = False
    seed: int = 0
    threads: int | None = 1
    device: str = "auto"
    precision: str = "fp32"
    solver: str = "anderson"
    solver_args: dict = dataclasses.field(default_factory=dict)
    rtol: float = 1e-3
    atol: float = 0.0
    max_steps: int = 20
    eval_max_steps: int = 40
    adjoint: str = "implicit"
    backward_solver: str = "gmres"
    backward_rtol: float = 1e-4
    backward_max_steps: int = 20
    phantom_steps: int = 5
    phantom_damping: float = 0.5
    residual_weight: float = 1.0
    jac_reg: float = 0.0
    jac_reg_freq: float = 1.0
    out: str | None = None
    log_every: int = 0
    progress: bool = True
    plots: bool = True
    tensorboard: bool = False

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
                                   residual_weight=self.residual_weight)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _fail(key: str, value: Any, want: str) -> None:
    raise ValueError(f"config `{key}` = {value!r} is invalid: {want}.")


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

    def choice(key: str, options: tuple[str, ...]) -> None:
        v = getattr(cfg, key)
        if v not in options:
            _fail(key, v, f"choose one of {list(options)}")

    for key in ("model", "data"):
        if not isinstance(getattr(cfg, key), str) or not getattr(cfg, key):
            _fail(key, getattr(cfg, key), "expected a non-empty string")
    for key in ("out", "data_root"):
        v = getattr(cfg, key)
        if v is not None and (not isinstance(v, str) or not v):
            _fail(key, v, "expected a folder path (a non-empty string, e.g. \"runs/a\")")
    for key in ("data_args", "model_args", "solver_args"):
        if not isinstance(getattr(cfg, key), dict):
            _fail(key, getattr(cfg, key), "expected a table/dict of keyword arguments")
    for key in ("epochs", "batch_size", "max_steps", "eval_max_steps", "backward_max_steps",
                "phantom_steps"):
        positive_int(key)
    for key in ("seed", "log_every", "augment_shift"):
        positive_int(key, allow_zero=True)
    if cfg.subset is not None:
        positive_int("subset")
    if cfg.threads is not None:
        positive_int("threads")
    number("lr", 0.0, open_lo=True)
    number("weight_decay", 0.0)
    number("label_smoothing", 0.0, 1.0)
    if isinstance(cfg.ema, (int, float)) and not isinstance(cfg.ema, bool) \
            and not 0.0 <= cfg.ema < 1.0:
        _fail("ema", cfg.ema, "expected a decay in [0, 1) (flag --ema), e.g. 0.99 (an average "
              "over about 1/(1 - decay) = 100 optimiser steps), or 0 for no weight averaging")
    number("ema", 0.0, 1.0)
    number("rtol", 0.0)
    number("atol", 0.0)
    if cfg.rtol == 0 and cfg.atol == 0:
        _fail("rtol", cfg.rtol, "rtol and atol cannot both be 0")
    number("backward_rtol", 0.0)
    number("phantom_damping", 0.0, 1.0, open_lo=True)
    number("residual_weight", 0.0)
    number("jac_reg", 0.0)
    number("jac_reg_freq", 0.0, 1.0, open_lo=True)
    if cfg.grad_clip is not None:
        number("grad_clip", 0.0, open_lo=True)
    choice("solver", SOLVERS)
    choice("adjoint", ADJOINTS)
    choice("backward_solver", BACKWARD_SOLVERS)
    choice("optimizer", OPTIMIZERS)
    choice("schedule", SCHEDULES)
    choice("precision", PRECISIONS)
    if not isinstance(cfg.device, str) or not _valid_device(cfg.device):
        _fail("device", cfg.device, "expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    for key in ("progress", "plots", "warm_start", "tensorboard"):
        if not isinstance(getattr(cfg, key), bool):
            _fail(key, getattr(cfg, key), "expected true or false")


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


def with_model_preset(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with the model's :data:`MODEL_PRESETS` filled in where unset."""
    preset = MODEL_PRESETS.get(values.get("model", TrainConfig.model), {})
    return {**preset, **values}


def from_mapping(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a config from a mapping, rejecting unknown keys."""
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ValueError(
            f"{source}: unknown key(s) {unknown}; valid keys are {sorted(_FIELDS)}."
        )
    return TrainConfig(**values)


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
            import yaml
        except ModuleNotFoundError as err:
            raise ValueError(
                f"config file {path!r} is YAML but PyYAML is not installed: "
                "`pip install pyyaml`, or use a .toml/.json file."
            ) from err
    try:
        if ext == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        elif ext == ".json":
            with open(path) as fh:
                data = json.load(fh)
        else:
            with open(path) as fh:
                data = yaml.safe_load(fh) or {}
    except Exception as err:  # parse errors of any of the three formats
        raise ValueError(f"config file {path!r} could not be parsed: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} must contain a table of keys, got {type(data)}.")
    return data


def parse_value(text: str) -> Any:
    """Parse ``--model-arg k=v`` values: JSON when possible (numbers, true/false, lists)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_pairs(pairs: list[str] | None, flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in pairs or []:
        if "=" not in item:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}.")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value.strip())
    return out
