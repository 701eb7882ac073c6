"""A run's per-epoch metrics: ``metrics.jsonl`` and ``metrics.csv`` (TensorBoard too when
``tensorboardX`` is installed), the one tolerant reader of ``metrics.jsonl`` and the console line
of an epoch. Only the main process writes; each file is replaced atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from experiments import reporting
from experiments.parallel import sync
from experiments.run_dir import METRICS_CSV, METRICS_JSONL, TENSORBOARD_DIR, RunError
from experiments.runtime import log


class MetricsLog:
    """Per-epoch rows appended to ``metrics.jsonl``, mirrored in ``metrics.csv`` (and
    TensorBoard when ``tensorboardX`` is installed). Only the main process writes.

    On resume, rows of epochs after the restored checkpoint are dropped (the run died between
    writing them and checkpointing), so the files always match the checkpointed state. Both
    files are rewritten whole (atomically) at every row, so a kill never leaves half a row.
    """

    def __init__(self, output_dir: str, *, keep_until_epoch: int, enabled: bool = True):
        self.output_dir = output_dir
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        jsonl = os.path.join(output_dir, METRICS_JSONL)
        if keep_until_epoch > 0 and os.path.exists(jsonl):
            rows = read_metrics(jsonl)
            self.rows = [r for r in rows if r.get("epoch", 0) <= keep_until_epoch]
        # Every process reads the rows before the main process rewrites the file.
        sync("metrics_log_read")
        if enabled:
            self._rewrite()
        self._tensorboard = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter  # optional

                self._tensorboard = SummaryWriter(os.path.join(output_dir, TENSORBOARD_DIR))
            except ImportError:
                pass

    def _rewrite(self) -> None:
        """Replaces both files; a failed write (a full disk, a folder made read-only or removed
        under the run) leaves the previous files whole and ends the run with a message."""
        try:
            reporting.write_jsonl(os.path.join(self.output_dir, METRICS_JSONL), self.rows)
            reporting.write_csv(os.path.join(self.output_dir, METRICS_CSV), self.rows)
        except OSError as e:
            epoch = self.rows[-1].get("epoch", "?") if self.rows else 0
            raise RunError(
                f"Could not write the metrics of epoch {epoch} to {self.output_dir} "
                f"({type(e).__name__}: {e.strerror or e}). Check free disk space, permissions "
                "and that the folder still exists, then continue with --resume."
            ) from None

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        self._rewrite()
        if self._tensorboard is not None:
            for key, value in row.items():
                if key not in ("epoch", "step") and isinstance(value, int | float):
                    self._tensorboard.add_scalar(key, value, row["step"])
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``; unreadable lines (the partial last row of a run killed
    mid-write by an older version, a hand-edited line that is no row with an epoch) are dropped
    with a warning."""
    rows, dropped = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("epoch"), int):
                rows.append(row)
            else:
                dropped += 1
    if dropped:
        log(
            f"Warning: dropped {dropped} unreadable line(s) of {path} (a partial last row, or "
            "a line that is not a metrics row)."
        )
    return rows


def _pct(value: float | None) -> str:
    return "   -  " if value is None else f"{100 * value:6.2f}%"


def epoch_line(row: Mapping[str, Any], epochs: int) -> str:
    """The console line of one epoch's metrics row."""
    return (
        f"epoch {row['epoch']:>3}/{epochs}  loss {row['train_loss']:.4f}  "
        f"train {_pct(row['train_accuracy'])}  "
        f"val {_pct(row.get('val_accuracy'))}  "
        f"test {_pct(row.get('test_accuracy'))}  "
        f"lr {row['learning_rate']:.4g}  {row['train_images_per_s']:,.0f} img/s"
    )
