"""The files of a ``deqkit train`` run folder: durable writes, the run lock, recovery.

Every file of a run is written by :func:`write_file`: whole files atomically (a temporary
``NAME.tmp-PID`` in the same folder, fsynced, renamed over ``NAME``, then the folder fsynced),
``metrics.jsonl`` records by fsynced appends. So a kill at any instant leaves each file either
as it was or as it is meant to be, plus at most a temporary file or a torn last line of
``metrics.jsonl``, which the next start removes (:func:`clean_temp_files`,
:func:`rewrite_metrics`). :class:`RunLock` keeps a second ``deqkit train`` out of a folder in
use. The trainer's write order and resume repair (``deqkit.app.train.run`` and
``deqkit.app.train.checkpoint``) build on these.

Testing hook: with ``DEQKIT_FAULT_INJECT="N:INSTANT"`` in the environment the process ends
with ``os._exit(137)`` (as SIGKILL would end it) at ``INSTANT`` of the ``N``-th write (from 0)
of a :func:`~deqkit.app.train.train` call; ``INSTANT`` is one of :data:`INSTANTS` for the
write's kind. ``DEQKIT_FAULT_INJECT=log`` only records the writes in ``FAULTS.log``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Callable
from typing import IO, Any

try:
    import fcntl
except ModuleNotFoundError:  # not POSIX
    fcntl = None  # type: ignore[assignment]

FAULT_ENV = "DEQKIT_FAULT_INJECT"
LOCK = "train.lock"
# the instants of a write at which the fault hook can end the process
INSTANTS = {
    "replace": ("before", "tmp", "renamed", "synced"),  # tmp written / renamed / folder fsynced
    "append": ("before", "torn", "synced"),  # half the record written / all of it fsynced
}
_TMP = re.compile(r".+\.tmp-\d+")


class RunError(RuntimeError):
    """A run cannot start or go on (its folder is locked or not writable, the loss diverged).
    ``deqkit train`` prints the message as one line and exits with status 1."""


class _Faults:
    """The fault-injection hook (see the module docstring); off unless the variable is set."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Read the environment and start counting writes from 0 (called by ``train``)."""
        spec = os.environ.get(FAULT_ENV, "")
        self.log: list[tuple[str, str]] = []
        self.count = 0
        self.enabled = bool(spec)
        self.target: tuple[int, str] | None = None
        if spec and spec != "log":
            index, _, instant = spec.partition(":")
            known = {i for kind in INSTANTS.values() for i in kind}
            if not index.isdigit() or instant not in known:
                raise ValueError(f"{FAULT_ENV}={spec!r}: expected 'log' or 'N:INSTANT' with "
                                 f"INSTANT one of {sorted(known)}.")
            self.target = (int(index), instant)

    def start(self, kind: str, path: str) -> None:
        if self.enabled:
            self.log.append((kind, os.path.basename(path)))
        self.count += 1

    def point(self, instant: str) -> None:
        if self.target is not None and self.target == (self.count - 1, instant):
            os._exit(137)


FAULTS = _Faults()


def os_error_message(path: str, err: OSError) -> str:
    """One line for a failed write: the file, the cause in words and what to do."""
    cause = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
             errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
             errno.EPERM: "permission denied"}.get(err.errno or 0, "")
    full = err.errno in (errno.ENOSPC, errno.EDQUOT)
    fix = ("free some space, then continue with --resume (the files already written stay "
           "valid)" if full else "choose a writable folder with --out")
    detail = err.strerror or str(err)
    return f"cannot write {path!r}: {cause + ' (' + detail + ')' if cause else detail}; {fix}."


def write_file(path: str, data: bytes | Callable[[IO[bytes]], Any], *,
               append: bool = False) -> None:
    """Write ``data`` (bytes, or a function writing to a binary file) durably to ``path``.

    ``append=False``: atomic replace (temporary file, fsync, rename, folder fsync).
    ``append=True``: append the bytes and fsync. Raises :class:`RunError` with one clear line
    when the disk is full or the folder is not writable; a failed replace leaves no
    temporary file behind.
    """
    FAULTS.start("append" if append else "replace", path)
    FAULTS.point("before")
    try:
        if append:
            _append(path, data)
        else:
            _replace(path, data)
    except OSError as err:
        raise RunError(os_error_message(path, err)) from None
    FAULTS.point("synced")


def _append(path: str, data: Any) -> None:
    assert isinstance(data, bytes)
    with open(path, "ab") as fh:
        if FAULTS.target is not None:  # the hook's torn record: half of it reached the disk
            fh.write(data[: len(data) // 2])
            fh.flush()
            FAULTS.point("torn")
            data = data[len(data) // 2:]
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _replace(path: str, data: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            data(fh) if callable(data) else fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        FAULTS.point("tmp")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    FAULTS.point("renamed")
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def clean_temp_files(run_dir: str) -> list[str]:
    """Remove the ``*.tmp-PID`` files of writes that a kill interrupted; their names."""
    removed = sorted(n for n in os.listdir(run_dir) if _TMP.fullmatch(n))
    for name in removed:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run_dir, name))
    return removed


def rewrite_metrics(path: str, history: list[dict[str, Any]]) -> None:
    """On resume: ``metrics.jsonl`` becomes the records of the finished epochs, each once.

    Epoch records come from the checkpoint's ``history`` (the records that were appended);
    the per-step records of ``--log-every`` of those epochs are kept from the file. Records
    of an interrupted epoch and torn lines go. Written atomically, so a kill meanwhile loses
    nothing.
    """
    steps: dict[int, dict[Any, str]] = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line
                if isinstance(rec, dict) and "step" in rec:
                    steps.setdefault(rec.get("epoch"), {})[rec["step"]] = line.rstrip("\n")
    lines = []
    for rec in history:
        lines += steps.get(rec["epoch"], {}).values()
        lines.append(json.dumps(rec))
    write_file(path, "".join(ln + "\n" for ln in lines).encode())


class RunLock:
    """Exclusive use of a run folder by one ``deqkit train`` process, for the run's lifetime.

    An ``flock`` on ``RUN/train.lock``, which holds the owner's PID. The kernel drops the lock
    when its process dies however it dies, so a lock file left by a killed run is stale: it
    is taken over (with a message). :meth:`release` removes the file.
    """

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, LOCK)
        self.fd: int | None = None

    def acquire(self, log: Callable[[str], Any] = print) -> None:
        """Take the lock or raise :class:`RunError` naming the process that holds it."""
        if fcntl is None:  # no flock: an exclusive create; a leftover file must be removed
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise RunError(self._held(_read_pid(self.path)) + f" (if no run is active, "
                               f"delete {self.path!r})") from None
        else:
            self.fd = self._flock()
        previous = _read_pid(self.path)
        if previous is not None and previous != os.getpid():
            log(f"taking over the stale lock of process {previous} (no longer running) in "
                f"{os.path.dirname(self.path)!r}")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def _flock(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunError(self._held(_read_pid(self.path))) from None
            try:  # the owner may have removed the file between our open and flock
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def _held(self, pid: int | None) -> str:
        who = f"process {pid}" if pid is not None else "another process"
        return (f"run folder {os.path.dirname(self.path)!r} is in use by {who} (another "
                "`deqkit train`); wait for it to finish or choose another --out")

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.remove(self.path)
        os.close(self.fd)
        self.fd = None


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
