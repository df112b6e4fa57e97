"""The README's commands work as written.

The README opens with the set-up for a fresh machine (its first ``bash`` block, :data:`SETUP`):
``make demo``, ``make test``, ``source .venv/bin/activate``. Every later command of its
``bash`` blocks then runs here, in README order, in one fresh temporary folder that holds a
copy of what the commands name in the repository (:data:`CONTEXT`), with the environment the
set-up leaves: this interpreter's ``bin`` folder (the venv, with the ``deqkit`` and
``torchrun`` entry points) first on ``PATH``, as ``source .venv/bin/activate`` puts it.

To keep the whole run to seconds, a few mechanical rewrites are applied (:func:`rewrite`):

1. ``--epochs N`` becomes ``--epochs 1``, or ``--epochs 2`` on a ``--resume`` command (which
   extends the 1-epoch run before it by one epoch);
2. a ``train`` command without ``--resume`` gets ``--subset 256`` and ``--epochs 1`` where it
   does not set them (a resumed run keeps its recorded config, so it is left alone);
3. ``--tokens N`` (``deqkit generate``) becomes ``--tokens 20``.

Commands that need what CI lacks are skipped by the explicit list :data:`SKIP` (servers that run
until stopped, a GPU when there is none); their flags are still checked against the CLI's
``--help`` (:func:`test_readme_flags_exist`), so a README command that names a flag that does
not exist fails either way, and a skipped ``tensorboard --logdir DIR`` checks that DIR was
written by the commands before it. A failing command does not stop the run: the failure lists
every command that failed, with its output.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent  # the venv's bin folder when run as `.venv/bin/python -m pytest`

# The README's first bash block, comments stripped: the whole set-up of a fresh machine.
SETUP = [["make", "demo"], ["make", "test"], ["source", ".venv/bin/activate"]]
# Repository paths that README commands name relative to the repository root.
CONTEXT = ["configs"]


def _needs_cuda(argv: list[str]) -> str | None:
    if any(a == "cuda" or a.startswith("cuda:") for a in argv):
        import torch

        if not torch.cuda.is_available():
            return "needs a CUDA device"
    return None


# (predicate, reason): a command for which a predicate returns true is not run.
SKIP = [
    (lambda argv: argv[0] == "tensorboard", "a server that runs until stopped"),
    (lambda argv: argv[:2] == ["mkdocs", "serve"], "a server that runs until stopped"),
    (lambda argv: argv[0] == "make", "reinstalls the environment"),
]

EPOCHS = 1
SUBSET = 256
TOKENS = 20


def readme_blocks(lang: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    return re.findall(rf"^```{lang}\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def split_commands(block: str) -> list[list[str]]:
    """The commands of a bash block as argv lists (comments dropped, ``\\`` lines joined)."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            commands.append(argv)
    return commands


def readme_commands() -> list[list[str]]:
    """Every command after the set-up block, in README order."""
    blocks = readme_blocks("bash")
    assert blocks, "the README has no bash block"
    setup = split_commands(blocks[0])
    assert setup == SETUP, (
        f"the README's set-up block is now {setup}; update SETUP in tests/test_readme.py (and "
        "the environment this test gives the commands) to match"
    )
    return [argv for block in blocks[1:] for argv in split_commands(block)]


def _deqkit_part(argv: list[str]) -> list[str] | None:
    """The deqkit arguments of a command (``deqkit ...``, ``python -m deqkit ...``,
    ``torchrun ... -m deqkit ...``), or None if it is no deqkit command."""
    if argv[0] == "deqkit":
        return argv[1:]
    for i in range(len(argv) - 1):
        if argv[i] == "-m" and argv[i + 1] == "deqkit":
            return argv[i + 2:]
    return None


def rewrite(argv: list[str]) -> list[str]:
    """The module docstring's rewrites 1-3."""
    out = list(argv)
    resume = "--resume" in out
    for i, arg in enumerate(out[:-1]):
        if arg == "--epochs":
            out[i + 1] = str(EPOCHS + 1 if resume else EPOCHS)
        elif arg == "--tokens":
            out[i + 1] = str(TOKENS)
    deqkit = _deqkit_part(out)
    if deqkit and deqkit[0] == "train" and not resume:
        for flag, value in (("--subset", SUBSET), ("--epochs", EPOCHS)):
            if flag not in out:
                out += [flag, str(value)]
    return out


def skip_reason(argv: list[str]) -> str | None:
    for predicate, reason in SKIP:
        if predicate(argv):
            return reason
    return _needs_cuda(argv)


def test_rewrite_rules():
    assert rewrite(shlex.split("deqkit train --data digits --epochs 12 --out runs/a")) == (
        shlex.split("deqkit train --data digits --epochs 1 --out runs/a --subset 256"))
    assert rewrite(shlex.split("deqkit train --subset 64 --config c.toml")) == (
        shlex.split("deqkit train --subset 64 --config c.toml --epochs 1"))
    assert rewrite(shlex.split("deqkit train --out runs/a --resume --epochs 20")) == (
        shlex.split("deqkit train --out runs/a --resume --epochs 2"))
    assert rewrite(shlex.split("torchrun --nproc_per_node 2 -m deqkit train --out r")) == (
        shlex.split("torchrun --nproc_per_node 2 -m deqkit train --out r --subset 256 --epochs 1"))
    assert rewrite(shlex.split('deqkit generate r --prompt "A B" --tokens 200')) == (
        ["deqkit", "generate", "r", "--prompt", "A B", "--tokens", "20"])
    assert rewrite(["deqkit", "eval", "runs/a"]) == ["deqkit", "eval", "runs/a"]
    assert skip_reason(["tensorboard", "--logdir", "x"])
    assert skip_reason(["deqkit", "eval", "x"]) is None


def _help(args: list[str]) -> str:
    """``deqkit ARGS --help``, run in this process (argparse prints and exits)."""
    from deqkit.app.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*args, "--help"])
    return out.getvalue()


def test_readme_flags_exist():
    """Every ``--flag`` of a README deqkit command is one its subcommand accepts (skipped
    commands included), and so is every subcommand."""
    top = _help([])
    choices = re.search(r"\{([\w,-]+)\}", top)
    subcommands = set(choices.group(1).split(",")) if choices else set()
    helps: dict[str, str] = {}
    problems = []
    for argv in readme_commands():
        deqkit = _deqkit_part(argv)
        if deqkit is None:
            continue
        command = shlex.join(argv)
        if not deqkit or deqkit[0].startswith("-"):
            flags, text, where = deqkit, top, "deqkit --help"
        else:
            sub = deqkit[0]
            if sub not in subcommands:
                problems.append(f"{command!r}: `deqkit {sub}` is no deqkit subcommand "
                                f"(there are {sorted(subcommands)})")
                continue
            if sub not in helps:
                helps[sub] = _help([sub])
            flags, text, where = deqkit[1:], helps[sub], f"deqkit {sub} --help"
        for flag in flags:
            name = flag.split("=", 1)[0]
            if name.startswith("--") and not re.search(
                    rf"(?<![\w-]){re.escape(name)}(?![\w-])", text):
                problems.append(f"{command!r} uses {name}, which `{where}` does not list")
    assert not problems, "README commands with unknown flags:\n" + "\n".join(problems)


@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    """Every README command after the set-up runs, as written (bar the rewrites), in order."""
    if not (BIN / "deqkit").exists():
        pytest.skip(f"no deqkit entry point next to {sys.executable} (pip install -e .)")
    for name in CONTEXT:
        shutil.copytree(ROOT / name, tmp_path / name)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(BIN.parent),
        "MPLBACKEND": "Agg",
    }
    env.pop("PYTHONHOME", None)
    ran, skipped, failed = [], [], []
    for argv in readme_commands():
        reason = skip_reason(argv)
        if reason:
            skipped.append(f"{shlex.join(argv)} ({reason})")
            if argv[0] == "tensorboard" and "--logdir" in argv:  # what it would show exists
                logdir = argv[argv.index("--logdir") + 1]
                if not (tmp_path / logdir).is_dir():
                    failed.append(f"{shlex.join(argv)}: no folder {logdir} after the commands "
                                  "before it")
            continue
        command = shlex.join(rewrite(argv))
        start = time.perf_counter()
        proc = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=300, stdin=subprocess.DEVNULL,
        )
        ran.append(f"{time.perf_counter() - start:5.1f} s  {command}")
        if proc.returncode != 0:  # go on: the report names every failing command
            failed.append(
                f"exit {proc.returncode}: {shlex.join(argv)}\n    run as: {command}\n"
                f"    stdout: ...{proc.stdout[-1500:]}\n    stderr: ...{proc.stderr[-1500:]}"
            )
    print("ran:", *ran, "skipped:", *skipped, sep="\n  ")
    assert ran, "no README command ran"
    assert not failed, f"{len(failed)} README command(s) failed:\n" + "\n".join(failed)


def test_readme_python_blocks_run(capsys, monkeypatch):
    """The README's ```python blocks run in order, in one namespace, without warnings."""
    blocks = readme_blocks("python")
    assert blocks, "the README has no python block"
    module = types.ModuleType("deqkit_readme")  # dataclasses look their module up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for block in blocks:
        exec(compile(block, "README.md", "exec", dont_inherit=True), module.__dict__)
    capsys.readouterr()
