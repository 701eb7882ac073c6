"""A run's ``summary.json``: what it reached, the divergence message, and the printed summary."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from experiments import config as config_lib
from experiments import optimizer_registry, reporting
from experiments.config import TrainConfig
from experiments.parallel import is_main_process
from experiments.run_dir import SUMMARY_FILE
from experiments.runtime import log


def summarize(
    config: TrainConfig,
    rows: Sequence[Mapping[str, Any]],
    *,
    steps_per_epoch: int,
    num_params: int,
    num_devices: int,
    wall_time: float,
    gradient_evaluations: int | None = None,
    noisy_labels: int = 0,
    diverged_epoch: int | None = None,
    resumed_from_epoch: int = 0,
) -> dict[str, Any]:
    """The run's summary from its per-epoch rows (which span resumed runs too).

    A run that diverged at `diverged_epoch` is not completed; its rows end before that epoch.
    `gradient_evaluations`: the run's full-batch gradient evaluations (SGD: one per step).
    The training and compile times add up every process that trained the run; `wall_time` and
    `resumed_from_epoch` (0: it started afresh) are this process's.
    """
    num_steps = config.epochs * steps_per_epoch
    val_rows = [r for r in rows if "val_accuracy" in r]
    test_rows = [r for r in rows if "test_accuracy" in r]
    best = max(val_rows, key=lambda r: r["val_accuracy"]) if val_rows else None
    train_time = sum(r["epoch_time_s"] for r in rows)
    trained_images = len(rows) * steps_per_epoch * config.batch_size
    return {
        "completed": diverged_epoch is None,
        "diverged": diverged_epoch is not None,
        "diverged_epoch": diverged_epoch,
        "name": config_lib.run_name(config),
        "output_dir": config.output_dir,
        "dataset": config.dataset,
        "model": config.model,
        "optimizer": config.optimizer,
        "rho": config.rho if config.optimizer != optimizer_registry.BASELINE else 0.0,
        "learning_rate": config.learning_rate,
        "weight_decay": config.weight_decay,
        "seed": config.seed,
        "train_size": config.train_size,
        "label_noise": config.label_noise,
        "label_noise_mode": config.label_noise_mode,
        "noisy_labels": noisy_labels,
        "epochs": config.epochs,
        "steps": num_steps,
        "gradient_evaluations": gradient_evaluations,
        # The cost counted in passes: 1 for SGD, 2 for SAM on every step.
        "gradient_evaluations_vs_sgd": (
            gradient_evaluations / num_steps if gradient_evaluations is not None else None
        ),
        "num_params": num_params,
        "num_devices": num_devices,
        "best_val_accuracy": best["val_accuracy"] if best else None,
        "best_val_epoch": best["epoch"] if best else None,
        # The test accuracy of the epoch that the validation split picks (early stopping), the
        # number to report where the final epoch has memorized noisy labels.
        "test_accuracy_at_best_val": best.get("test_accuracy") if best else None,
        "final_val_accuracy": val_rows[-1]["val_accuracy"] if val_rows else None,
        "final_test_accuracy": test_rows[-1]["test_accuracy"] if test_rows else None,
        "final_test_loss": test_rows[-1]["test_loss"] if test_rows else None,
        "final_train_loss": rows[-1]["train_loss"] if rows else None,
        "final_train_accuracy": rows[-1]["train_accuracy"] if rows else None,
        "train_time_s": train_time,
        "compile_time_s": sum(r.get("compile_time_s", 0.0) for r in rows),
        "images_per_s": trained_images / train_time if train_time else None,
        "wall_time_s": wall_time,
        "resumed_from_epoch": resumed_from_epoch,
    }


def divergence_message(config: TrainConfig, epoch: int, last_checkpoint: int | None) -> str:
    """What to tell the user when the loss or the parameters became NaN or infinite."""
    if last_checkpoint:
        kept = f"The last good checkpoint is that of epoch {last_checkpoint} in {config.output_dir}"
    else:
        kept = "No checkpoint was saved before"
    rho = (
        f" or --rho (now {config.rho:g})" if config.optimizer != optimizer_registry.BASELINE else ""
    )
    return (
        f"Training diverged in epoch {epoch}: the loss or the parameters became NaN or "
        f"infinite. {kept}; nothing of epoch {epoch} was saved. Try a lower --learning-rate "
        f"(now {config.learning_rate:g}){rho}, or a learning-rate warm-up (--warmup-epochs)."
    )


def write_summary(output_dir: str, summary: Mapping[str, Any]) -> None:
    if is_main_process():
        reporting.write_json(os.path.join(output_dir, SUMMARY_FILE), summary)


def print_summary(summary: Mapping[str, Any]) -> None:
    def pct(key):
        value = summary.get(key)
        return "-" if value is None else f"{100 * value:.2f}%"

    rate = summary.get("images_per_s")
    resumed = summary.get("resumed_from_epoch") or 0
    if resumed:
        # The training time spans the earlier processes; the wall time is this one's alone.
        epochs_now = max(summary["epochs"] - resumed, 0)
        times = [
            f"  training time        {summary['train_time_s']:.1f} s"
            f" (+ {summary['compile_time_s']:.1f} s compiling) over every run of it",
            f"  this run             resumed after epoch {resumed}: {epochs_now} epoch(s) in"
            f" {summary['wall_time_s']:.1f} s wall",
        ]
    else:
        times = [
            f"  training time        {summary['train_time_s']:.1f} s"
            f" (+ {summary['compile_time_s']:.1f} s compiling,"
            f" {summary['wall_time_s']:.1f} s wall)"
        ]
    log(
        "\n".join(
            [
                f"== {summary['name']} ({summary['output_dir']}) ==",
                f"  parameters           {summary['num_params']:,}",
                f"  best val accuracy    {pct('best_val_accuracy')}"
                f" (epoch {summary.get('best_val_epoch')})",
                f"  final val accuracy   {pct('final_val_accuracy')}",
                f"  final test accuracy  {pct('final_test_accuracy')}",
                *times,
                f"  throughput           {'-' if rate is None else f'{rate:,.0f}'} images/s"
                f" on {summary['num_devices']} device(s)",
            ]
        )
    )
