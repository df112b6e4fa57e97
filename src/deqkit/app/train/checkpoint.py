"""Checkpoints and the run folder: save/load, best.pt repair, resume checks, preparation."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from typing import Any

import torch

from ..files import RunError, RunLock, clean_temp_files, os_error_message, write_file

CHECKPOINT = "last.pt"
BEST = "best.pt"
CONFIG = "config.json"
# what --resume needs from last.pt besides load_checkpoint's config, model and epoch
RESUME_KEYS = ("optimizer", "scheduler", "history")
# config keys that may change on --resume: they do not change the numbers
FREE_KEYS = ("progress", "plots", "out", "device", "tensorboard", "epochs")

Log = Callable[[str], Any]


def save_checkpoint(obj: Any, path: str) -> None:
    """``torch.save`` through :func:`~deqkit.app.files.write_file`: a kill never leaves a
    torn file."""
    write_file(path, lambda fh: torch.save(obj, fh))


def _unreadable(path: str, err: Exception) -> ValueError:
    """Why a checkpoint could not be loaded, in words."""
    size = os.path.getsize(path)
    if size == 0:
        why = "it is empty (0 bytes): the file was cut off or never written"
    elif _starts_like_zip(path) and not zipfile.is_zipfile(path):
        why = f"it is truncated ({size} bytes, the end of the archive is missing)"
    else:
        why = f"it could not be loaded safely: {err}"
    return ValueError(f"checkpoint {path!r}: {why}; use another checkpoint of the run "
                      f"({BEST} or {CHECKPOINT}) or start a new run (another --out).")


def _starts_like_zip(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: tensors and plain containers only).

    Raises ValueError naming the reason: no such file, empty, truncated, not a checkpoint.
    """
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise _unreadable(path, err) from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path!r} is not a deqkit checkpoint (not a dict).")
    for key in ("config", "model", "epoch"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {path!r} is not a deqkit checkpoint (no {key!r}).")
    return ckpt


def checkpoint_path(path: str, log: Log = print) -> str:
    """``path`` itself, or for a run folder its ``best.pt`` (else ``last.pt``), saying which."""
    if not os.path.isdir(path):
        return path
    for name in (BEST, CHECKPOINT):
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            log(f"evaluating {candidate}" + (" (the best validation accuracy)" if name == BEST
                                             else f" (no {BEST} in the run)"))
            return candidate
    raise ValueError(f"run folder {path!r} holds no checkpoint ({BEST} or {CHECKPOINT}): no "
                     "epoch has finished yet.")


def best_of(ckpt: dict[str, Any]) -> tuple[float, int]:
    """``(best validation accuracy, its epoch)`` recorded in ``last.pt`` (0: none yet).

    Checkpoints of older versions have no ``best_epoch``: the first epoch of the history
    that reached ``best_val``."""
    best_val = float(ckpt.get("best_val", -1.0))
    if "best_epoch" in ckpt:
        return best_val, int(ckpt["best_epoch"])
    hits = [int(h["epoch"]) for h in ckpt.get("history", []) if h.get("val_acc") == best_val]
    return best_val, (hits[0] if hits else 0)


def repair_best(run_dir: str, ckpt: dict[str, Any], log: Log) -> tuple[float, int]:
    """Make ``best.pt`` agree with ``last.pt`` after an interruption; the best to track.

    ``last.pt`` is written first, then ``best.pt`` if the epoch is the new best. A kill in
    between leaves a ``best.pt`` behind (or none at all) while ``last.pt`` *is* the best
    state, so ``best.pt`` is rewritten from it, exactly as the uninterrupted run wrote it.
    """
    best_val, best_epoch = best_of(ckpt)
    path = os.path.join(run_dir, BEST)
    try:
        have = int(load_checkpoint(path)["epoch"]) if os.path.exists(path) else None
    except ValueError:
        have = None
    if best_epoch == 0 or have == best_epoch:
        return best_val, best_epoch
    if best_epoch == int(ckpt["epoch"]):
        save_checkpoint({k: v for k, v in ckpt.items()
                         if k not in ("warm_start", "adjoint_cache")}, path)
        log(f"rewrote {path} from {CHECKPOINT} (epoch {best_epoch}): the run was interrupted "
            "before it was written")
        return best_val, best_epoch
    # a run of an older deqkit killed between writing last.pt and best.pt: those weights
    # are gone; best.pt goes on from the epoch it holds
    accs = {int(h["epoch"]): float(h["val_acc"]) for h in ckpt.get("history", [])}
    log(f"warning: {path} holds epoch {have} but the best validation accuracy "
        f"({best_val:.4f}) was reached at epoch {best_epoch}, whose weights were not saved; "
        "best.pt keeps the best of the epochs that were")
    if have is None or have not in accs:
        return -1.0, 0
    return accs[have], have


def read_run_config(run_dir: str) -> dict[str, Any]:
    """The config a run was started with: ``last.pt``'s, or ``config.json`` before the first
    epoch finished (for ``--resume``)."""
    ckpt_path = os.path.join(run_dir, CHECKPOINT)
    if os.path.isfile(ckpt_path):
        return dict(load_checkpoint(ckpt_path)["config"])
    path = os.path.join(run_dir, CONFIG)
    if not os.path.isfile(path):
        raise ValueError(f"--resume: {run_dir!r} holds no run to resume (no {CHECKPOINT}, no "
                         f"{CONFIG}); start it without --resume.")
    try:
        with open(path) as fh:
            values = json.load(fh)
    except (OSError, ValueError) as err:
        raise ValueError(f"--resume: {path!r} could not be read: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--resume: {path!r} does not hold a config (a JSON object).")
    return values


def check_same_config(saved: dict[str, Any], config: dict[str, Any], defaults: dict[str, Any],
                      where: str, done: int = 0) -> None:
    """Refuse a resume whose settings change the run; ``epochs`` may grow (not below the
    ``done`` epochs)."""
    diff = {k for k, v in config.items()
            if k not in FREE_KEYS and saved.get(k, defaults.get(k)) != v}
    if diff:
        raise ValueError(
            f"--resume: the config differs from the checkpoint's ({where}) for {sorted(diff)}; "
            "resume with the same settings (or omit them: they are read from the run)."
        )
    if config["epochs"] < done:
        raise ValueError(f"--resume: the run has finished {done} epochs, more than --epochs "
                         f"{config['epochs']}; give --epochs {done} or more.")


def prepare_run_dir(run_dir: str, config: dict[str, Any], defaults: dict[str, Any],
                    resume: bool, lock: RunLock, log: Log) -> dict[str, Any] | None:
    """Rank 0: lock the run folder, remove the temporary files of interrupted writes, check
    the folder; the checkpoint to resume from (None: start at epoch 1)."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock.acquire(log)
        removed = clean_temp_files(run_dir)
    except OSError as err:
        raise RunError(os_error_message(getattr(err, "filename", None) or run_dir, err)) \
            from None
    if removed:
        log(f"removed {len(removed)} temporary file(s) of interrupted writes: {removed}")
    ckpt_path = os.path.join(run_dir, CHECKPOINT)
    if not resume:
        if os.path.isfile(ckpt_path):
            raise ValueError(
                f"{run_dir!r} already holds a run ({CHECKPOINT}); pass --resume to continue it "
                "or choose another --out."
            )
        return None
    if not os.path.isfile(ckpt_path):
        config_path = os.path.join(run_dir, CONFIG)
        if not os.path.isfile(config_path):
            raise ValueError(f"--resume: {run_dir!r} holds no run to resume (no {CHECKPOINT}, "
                             f"no {CONFIG}); start it without --resume.")
        check_same_config(read_run_config(run_dir), config, defaults, config_path)
        log(f"resuming {run_dir}: no epoch had finished, starting from epoch 1")
        return None
    ckpt = load_checkpoint(ckpt_path)
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise ValueError(
            f"checkpoint {ckpt_path!r} lacks {missing}, so the run cannot be resumed from it "
            "(`deqkit eval` can still score it); start a new run with another --out."
        )
    check_same_config(ckpt["config"], config, defaults, ckpt_path, int(ckpt["epoch"]))
    return ckpt


def restore(ckpt: dict[str, Any], path: str, parts: dict[str, Any]) -> None:
    """Load a checkpoint's states into ``parts`` (name -> object with ``load_state_dict``);
    a mismatch is a ValueError naming the part."""
    for key, obj in parts.items():
        try:
            obj.load_state_dict(ckpt[key])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            what = "is missing" if key not in ckpt else f"does not fit this run: {err}"
            raise ValueError(f"checkpoint {path!r}: {key!r} {what}".replace("\n", " ")) \
                from None


def write_config(run_dir: str, config: dict[str, Any]) -> None:
    """``config.json``: the run's settings (durable)."""
    write_file(os.path.join(run_dir, CONFIG), json.dumps(config, indent=2).encode())


__all__ = ["BEST", "CHECKPOINT", "CONFIG", "best_of", "check_same_config", "checkpoint_path",
           "load_checkpoint", "prepare_run_dir", "read_run_config", "repair_best", "restore",
           "save_checkpoint", "write_config"]
