"""The papers' experiments on real data run through the training harness: one run per config
under a folder of its own, skipped when it is already done with the same configuration.

* :func:`run_or_load` -- trains a run with :func:`experiments.trainer.train_and_evaluate`
  unless its folder already holds a ``summary.json`` and a ``config.json`` equal to the
  requested one (so an interrupted sweep resumes where it stopped, and a changed flag retrains);
* :func:`final_state` -- the trained parameters and BatchNorm statistics of a finished run,
  restored from its last checkpoint (``train_and_evaluate`` returns only the summary);
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from experiments import config as config_lib
from experiments import input_pipeline, run_dir, trainer
from experiments.config import TrainConfig
from experiments.steps import TrainState

# Fields that do not change a run's numbers nor where its data comes from: a finished run whose
# saved config differs only in these is reused.
IGNORED_FIELDS: frozenset[str] = frozenset(
    {"output_dir", "resume", "overwrite", "progress", "log_every_steps", "keep_checkpoints"}
)


def _comparable(values: Mapping[str, Any]) -> dict[str, Any]:
    # Through JSON, so that tuples and lists (or ints and floats) compare as config.json has them.
    values = json.loads(json.dumps(dict(values)))
    return {k: v for k, v in values.items() if k not in IGNORED_FIELDS}


def is_done(config: TrainConfig) -> bool:
    """Whether `config.output_dir` holds a finished run of exactly `config` (resolved)."""
    summary = os.path.join(config.output_dir, run_dir.SUMMARY_FILE)
    saved = os.path.join(config.output_dir, run_dir.CONFIG_FILE)
    if not (os.path.exists(summary) and os.path.exists(saved)):
        return False
    with open(saved) as f:
        try:
            saved_values = json.load(f)
        except json.JSONDecodeError:
            return False
    requested = config.to_dict()
    # Only the config's own fields: config.json may carry more (e.g. the device count).
    saved_fields = {k: saved_values.get(k) for k in requested}
    return _comparable(saved_fields) == _comparable(requested)


def read_summary(output_dir: str) -> dict[str, Any]:
    with open(os.path.join(output_dir, run_dir.SUMMARY_FILE)) as f:
        return json.load(f)


def read_metrics(output_dir: str) -> list[dict[str, Any]]:
    """The run's per-epoch rows (``metrics.jsonl``)."""
    return run_dir.read_metrics(os.path.join(output_dir, run_dir.METRICS_JSONL))


def run_or_load(
    config: TrainConfig, dataset: input_pipeline.Dataset | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]], bool]:
    """Trains `config` unless it is done already; returns (summary, per-epoch rows, trained).

    A folder holding anything else (another config, an unfinished run) is emptied and the run
    starts afresh.
    """
    config = config_lib.resolve(config)
    if is_done(config):
        trained = False
        summary = read_summary(config.output_dir)
    else:
        trained = True
        summary = trainer.train_and_evaluate(config.replace(overwrite=True), dataset)
    return summary, read_metrics(config.output_dir), trained


def final_state(
    config: TrainConfig, dataset: input_pipeline.Dataset
) -> tuple[trainer.Experiment, TrainState]:
    """The experiment of a finished run and its state at the last checkpoint (final epoch)."""
    config = config_lib.resolve(config)
    experiment = trainer.create_experiment(config, dataset)
    manager = run_dir.checkpoint_manager(config)
    try:
        latest = manager.latest_step()
        if latest is None or int(latest) != config.epochs:
            raise FileNotFoundError(
                f"No checkpoint of the final epoch {config.epochs} in {config.output_dir} "
                f"(latest: {latest}); rerun it."
            )
        state = run_dir.restore_checkpoint(manager, latest, like=experiment.state)
    finally:
        manager.close()
    return experiment, state
