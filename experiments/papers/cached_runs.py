"""The papers' training runs, each under a folder of its own and read back instead of retrained
once finished (by the rule of :func:`experiments.run_dir.finished_summary`).

* :func:`run_or_load` -- trains a run with :func:`experiments.trainer.train_and_evaluate`
  unless its folder already holds it, finished (:func:`experiments.run_dir.finished_summary`:
  an interrupted sweep resumes where it stopped, a changed flag is refused);
* :func:`final_state` -- the trained parameters and BatchNorm statistics of a finished run,
  restored from its last checkpoint (``train_and_evaluate`` returns only the summary);
"""

from __future__ import annotations

import os
from typing import Any

from experiments import checkpoints, data, metrics_log, run_dir, trainer
from experiments.config import TrainConfig
from experiments.steps import TrainState


def is_done(config: TrainConfig) -> bool:
    """Whether `config.output_dir` holds a finished run of exactly `config` (resolved); a
    finished run of another configuration is refused (:func:`run_dir.finished_summary`)."""
    return run_dir.finished_summary(config) is not None


def read_metrics(output_dir: str) -> list[dict[str, Any]]:
    """The run's per-epoch rows (``metrics.jsonl``)."""
    return metrics_log.read_metrics(os.path.join(output_dir, run_dir.METRICS_JSONL))


def run_or_load(
    config: TrainConfig, dataset: data.Dataset | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]], bool]:
    """Trains `config` (resolved) unless it is done already; returns (summary, per-epoch rows,
    trained).

    An unfinished run continues from its last checkpoint; a finished run of another
    configuration is refused with the fields that differ (:func:`run_dir.finished_summary`).
    """
    summary, trained = trainer.train_unless_finished(config, dataset)
    return summary, read_metrics(config.output_dir), trained


def final_state(
    config: TrainConfig, dataset: data.Dataset
) -> tuple[trainer.Experiment, TrainState]:
    """The experiment of a finished run (`config` resolved) and its state at the last checkpoint
    (final epoch)."""
    experiment = trainer.create_experiment(config, dataset)
    manager = checkpoints.checkpoint_manager(config.output_dir)
    try:
        latest = manager.latest_step()
        if latest is None or int(latest) != config.epochs:
            raise FileNotFoundError(
                f"No checkpoint of the final epoch {config.epochs} in {config.output_dir} "
                f"(latest: {latest}); rerun it."
            )
        state = checkpoints.restore_checkpoint(manager, latest, like=experiment.state)
    finally:
        manager.close()
    return experiment, state
