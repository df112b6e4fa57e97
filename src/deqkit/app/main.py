"""deqkit: train, evaluate and sample deep equilibrium models (``python -m deqkit`` works too).

Every ``deqkit train`` flag comes from a field of :class:`deqkit.app.config.TrainConfig` (its
help, default and allowed values are written there once). A user error ends in one line,
``deqkit COMMAND: error: ...``, and exit status 2 (1 for a run that cannot go on).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import typing
from collections.abc import Callable
from typing import Any, NoReturn

import torch

import deqkit as dk

from . import config, names
from .compare import add_compare_parser
from .demo import add_demo_parser
from .files import RunError
from .generate import add_generate_parser

_FORMATS = ("toml", "yaml", "json")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``PROG: error: MESSAGE``."""

    subcommands: dict[str, _Parser]

    def error(self, message: str) -> NoReturn:
        if "invalid choice: " in message:  # a misspelt subcommand
            wrong = message.split("invalid choice: ", 1)[1].split(" ")[0].strip("'")
            message += names.suggest(wrong, getattr(self, "subcommands", {}))
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

    def unrecognized(self, extra: list[str]) -> NoReturn:
        """Refuse unknown arguments, suggesting the closest flag for each."""
        flags = [s for a in self._actions for s in a.option_strings]
        hints = "".join(names.suggest(x.split("=")[0].replace("_", "-"), flags)
                        for x in extra if x.startswith("--"))
        self.error(f"unrecognized arguments: {' '.join(extra)}{hints}")


def _optional(typ: type) -> Callable[[str], Any]:
    """An argparse ``type`` for ``X | None`` fields: ``none`` gives None."""

    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else typ(text)

    parse.__name__ = typ.__name__
    return parse


def _help(name: str, field: Any) -> str:
    """A field's help with its allowed values, its default and any model preset."""
    text = field.metadata["help"]
    if field.metadata["choices"]:
        text += f"; one of: {', '.join(field.metadata['choices'])}"
    default = config.default_of(name)
    if isinstance(default, bool):
        text += f" (default: {'on' if default else 'off'})"
    elif default not in (None, {}):
        text += f" (default: {default}"
        for model, preset in config.MODEL_PRESETS.items():
            if name in preset:
                text += f"; {model}: {preset[name]}"
        text += ")"
    return text.replace("%", "%%")


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`~deqkit.app.config.TrainConfig` field; an unset flag leaves no
    attribute on the namespace (so ``--grad-clip none`` differs from no flag)."""
    hints = typing.get_type_hints(config.TrainConfig)
    for name, field in config.FIELDS.items():
        flag = field.metadata["flag"] or "--" + name.replace("_", "-")
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS,
                              "help": _help(name, field)}
        hint, args = hints[name], typing.get_args(hints[name])
        if hint is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif hint is dict:
            kw.update(action="append", metavar="K=V")
        elif type(None) in args:
            kw["type"] = _optional(next(a for a in args if a is not type(None)))
        else:
            kw["type"] = hint
        parser.add_argument(flag, **kw)


def _add_train(sub: Any) -> None:
    tr = sub.add_parser("train", help="train a zoo model on built-in or your own data",
                        description="Train a zoo model into a run folder (config.json, "
                        "metrics.jsonl, last.pt, best.pt, summary.json, plots). Flags "
                        "override --config, which overrides the defaults.")
    tr.add_argument("--config", help="TOML, YAML or JSON file of config keys (the field "
                    "names below, e.g. batch_size); flags override it")
    tr.add_argument("--print-config", nargs="?", const="toml", choices=_FORMATS,
                    metavar="FORMAT", help="print the resolved config as toml (default), "
                    "yaml or json, in the form --config reads, and exit")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out (its "
                    "recorded config; flags may extend --epochs)")
    tr.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    add_train_flags(tr)
    tr.set_defaults(func=_train_cmd)


def _train_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys of a ``deqkit train``: recorded run < --config < flags."""
    from .train import read_run_config

    values: dict[str, Any] = {}
    file_values = config.load_file(args.config) if args.config else {}
    if args.resume:
        out = getattr(args, "out", None) or file_values.get("out")
        if not out:
            raise ValueError("--resume needs --out RUN_DIR (or a config file with `out`).")
        if not isinstance(out, str):
            raise ValueError(f"config `out` = {out!r} is invalid: expected a folder path (a "
                             "non-empty string, e.g. \"runs/a\").")
        values.update(read_run_config(out))
    values.update(file_values)
    for name, field in config.FIELDS.items():
        if not hasattr(args, name):
            continue
        if field.metadata["flag"]:  # K=V pairs, merged into the file's table
            pairs = config.parse_pairs(getattr(args, name), field.metadata["flag"])
            values[name] = {**values.get(name, {}), **pairs}
        else:
            values[name] = getattr(args, name)
    return values


def _train_cmd(args: argparse.Namespace) -> int:
    from .train import train

    values = _train_values(args)
    applied = {} if args.resume else config.preset_for(values)  # a resumed run keeps its own
    cfg = config.from_mapping({**applied, **values}, source=args.config or "command line")
    if applied:
        print(config.preset_line(cfg.model, applied),
              file=sys.stderr if args.print_config else sys.stdout)
    if args.print_config:
        sys.stdout.write(config.dump(cfg, args.print_config))
        return 0
    args.run_dir = cfg.run_dir()
    train(cfg, resume=args.resume, stop_after=args.stop_after)
    return 0


def _add_eval_and_plot(sub: Any) -> None:
    ev = sub.add_parser("eval", help="evaluate a checkpoint or a run folder (test metrics, "
                        "solver statistics)")
    ev.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN_FOLDER",
                    help="a checkpoint (.pt) or a run folder (its best.pt, else last.pt)")
    ev.add_argument("--max-steps", type=int, default=None,
                    help="test-time forward step budget (default: the run's eval_max_steps)")
    ev.add_argument("--split", default="test", choices=("train", "val", "test"),
                    help="data split to score (default: test)")
    ev.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the "
                    "run's)")
    ev.set_defaults(func=_eval_cmd)
    pl = sub.add_parser("plot", help="draw a run's plots (curves.png, solver.png, "
                        "residual_traces.png) from its files, also while it trains")
    pl.add_argument("run_dir", metavar="RUN_FOLDER", help="a deqkit train run folder")
    pl.set_defaults(func=_plot_cmd)


def _eval_cmd(args: argparse.Namespace) -> int:
    from .train import eval_checkpoint

    eval_checkpoint(args.checkpoint, max_steps=args.max_steps, split=args.split,
                    device=args.device)
    return 0


def _plot_cmd(args: argparse.Namespace) -> int:
    from . import train

    plot_run = getattr(train, "plot_run", None)
    if plot_run is None:
        raise ValueError("this version of deqkit cannot draw plots on demand (no plot_run).")
    if not os.path.isdir(args.run_dir):
        raise ValueError(f"{args.run_dir!r} is not a run folder.")
    if not plot_run(args.run_dir):
        raise ValueError(f"no plots drawn for {args.run_dir!r}: they need matplotlib (`pip "
                         "install 'deqkit[cli]'`) and at least one finished epoch.")
    return 0


def build_parser() -> _Parser:
    """The ``deqkit`` argument parser with every subcommand."""
    parser = _Parser(prog="deqkit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"deqkit {dk.__version__} "
                        f"(torch {torch.__version__}, Python {sys.version.split()[0]})")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.subcommands = sub.choices
    _add_train(sub)
    _add_eval_and_plot(sub)
    add_generate_parser(sub)
    add_compare_parser(sub)
    add_demo_parser(sub)
    return parser


def _interrupted(args: argparse.Namespace) -> str:
    """The line for Ctrl-C: for a started training run, how to resume it."""
    run_dir = getattr(args, "run_dir", None)
    if run_dir and os.path.isfile(os.path.join(run_dir, "config.json")):
        return (f"interrupted; resume with: deqkit train --resume --out "
                f"{shlex.quote(run_dir)}")
    return "interrupted" + ("; nothing was saved" if args.command == "train" else "")


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and not isinstance(err, RunError):
        where = f"{err.filename!r}: " if err.filename else ""
        return f"{where}{err.strerror or err}"
    return " ".join(str(err).split())


def main(argv: list[str] | None = None) -> int:
    """Run ``deqkit ARGS``; the exit status (0 ok, 1 a run failed, 2 a user error, 130 Ctrl-C)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.subcommands[args.command].unrecognized(extra)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"deqkit {args.command}: {_interrupted(args)}", file=sys.stderr)
        return 130
    except (ValueError, RunError, OSError) as err:  # user errors: one line, no traceback
        print(f"deqkit {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2 if isinstance(err, ValueError) else 1


if __name__ == "__main__":
    sys.exit(main())
