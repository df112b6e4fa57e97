"""The run's metrics: ``metrics.jsonl`` (durable appends) and optional TensorBoard scalars."""

from __future__ import annotations

import json
import os
from typing import Any

from ..files import write_file

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def check_tensorboard() -> None:
    """Raise ValueError with the install command when TensorBoard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except (ImportError, ModuleNotFoundError):
        raise ValueError("tensorboard: the `tensorboard` package is not installed; "
                         "`pip install 'deqkit[tensorboard]'` (or drop tensorboard = true)."
                         ) from None


class RunMetrics:
    """Rank 0's writer of a run's records: every record goes to ``RUN/metrics.jsonl``; with
    ``tensorboard`` the numbers also go to ``RUN/tensorboard/`` as scalars (``epoch/KEY`` per
    epoch, ``step/KEY`` per ``log_every`` step). On other ranks it writes nothing."""

    def __init__(self, run_dir: str, *, tensorboard: bool, enabled: bool) -> None:
        self.path = os.path.join(run_dir, METRICS)
        self.enabled = enabled
        self.writer: Any = None
        if enabled and tensorboard:
            check_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, TENSORBOARD))

    def write(self, record: dict[str, Any], *, global_step: int | None = None) -> None:
        """Append ``record``; a per-step record (with ``step``) goes to TensorBoard at
        ``global_step``, an epoch record at its epoch."""
        if not self.enabled:
            return
        write_file(self.path, (json.dumps(record) + "\n").encode(), append=True)
        if self.writer is None:
            return
        prefix, x = ("step", global_step) if "step" in record else ("epoch", record["epoch"])
        for key, value in record.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{prefix}/{key}", value, x)
        if prefix == "epoch":
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


__all__ = ["METRICS", "TENSORBOARD", "RunMetrics", "check_tensorboard"]
