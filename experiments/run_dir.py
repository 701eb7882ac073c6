"""The run directory: what a training run leaves in ``--output-dir``.

``config.json``; ``metrics.jsonl`` and ``metrics.csv`` (one row per epoch; TensorBoard too when
``tensorboardX`` is installed); orbax checkpoints under ``checkpoints/<epoch>``;
``summary.json``. Also the policy that guards the directory (no silent reuse; ``--resume`` only
with the same numbers) and the console lines a run prints. Only the main process writes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from experiments import config as config_lib
from experiments import reporting, variants
from experiments.config import TrainConfig
from experiments.parallel import is_main_process, sync
from experiments.steps import TrainState

CONFIG_FILE = "config.json"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"


def log(*args: Any) -> None:
    """Prints on the main process, above any progress bar."""
    if is_main_process():
        from tqdm.auto import tqdm

        tqdm.write(" ".join(str(a) for a in args), file=sys.stdout)


# --------------------------------------------------------------------------------------------
# The directory and its config.
# --------------------------------------------------------------------------------------------


def prepare_output_dir(config: TrainConfig) -> None:
    """Refuses to reuse a non-empty output dir unless ``resume`` or ``overwrite`` says so.

    With ``overwrite`` the directory is emptied; with ``resume`` its saved config must match
    `config` in every field that changes the numbers.
    """
    path = config.output_dir
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"--output-dir {path!r} exists and is not a directory.")
    non_empty = os.path.isdir(path) and any(os.scandir(path))
    if non_empty and not (config.resume or config.overwrite):
        raise FileExistsError(
            f"Output directory {path!r} is not empty (it holds an earlier run). Pass --resume to "
            "continue that run from its last checkpoint, --overwrite to delete it and start "
            "afresh, or choose another --output-dir."
        )
    # Every process has looked at the directory before the main process deletes it.
    sync("output_dir_checked")
    if non_empty and config.overwrite and is_main_process():
        shutil.rmtree(path)
    if non_empty and config.resume:
        _check_resumable(config)
    if is_main_process():
        os.makedirs(path, exist_ok=True)
    sync("prepare_output_dir")


def _check_resumable(config: TrainConfig) -> None:
    saved_path = os.path.join(config.output_dir, CONFIG_FILE)
    if not os.path.exists(saved_path):
        return
    with open(saved_path) as f:
        saved = json.load(f)
    current = config.to_dict()
    differences = [
        f"{name}: saved {saved.get(name)!r}, now {current[name]!r}"
        for name in current
        if name not in config_lib.RESUME_INDEPENDENT_FIELDS and saved.get(name) != current[name]
    ]
    if differences:
        raise config_lib.ConfigError(
            f"--resume: the run in {config.output_dir!r} was started with a different "
            "configuration, so it cannot continue exactly:\n  "
            + "\n  ".join(differences)
            + "\nPass the same flags as the original run, or --overwrite to start afresh."
        )


def write_config(config: TrainConfig) -> None:
    if is_main_process():
        reporting.write_text(os.path.join(config.output_dir, CONFIG_FILE), config.to_json())


# --------------------------------------------------------------------------------------------
# Metrics.
# --------------------------------------------------------------------------------------------


class MetricsLog:
    """Per-epoch rows appended to ``metrics.jsonl``, mirrored in ``metrics.csv`` (and
    TensorBoard when ``tensorboardX`` is installed). Only the main process writes.

    On resume, rows of epochs after the restored checkpoint are dropped (the run died between
    writing them and checkpointing), so the files always match the checkpointed state.
    """

    def __init__(self, output_dir: str, *, keep_until_epoch: int, enabled: bool = True):
        self.output_dir = output_dir
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        jsonl = os.path.join(output_dir, METRICS_JSONL)
        if keep_until_epoch > 0 and os.path.exists(jsonl):
            with open(jsonl) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            self.rows = [r for r in rows if r.get("epoch", 0) <= keep_until_epoch]
        # Every process reads the rows before the main process rewrites the file.
        sync("metrics_log_read")
        if enabled:
            self._rewrite()
        self._tensorboard = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter  # optional

                self._tensorboard = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError:
                pass

    def _rewrite(self) -> None:
        with open(os.path.join(self.output_dir, METRICS_JSONL), "w") as f:
            for row in self.rows:
                f.write(json.dumps(row) + "\n")
        reporting.write_csv(os.path.join(self.output_dir, METRICS_CSV), self.rows)

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        with open(os.path.join(self.output_dir, METRICS_JSONL), "a") as f:
            f.write(json.dumps(row) + "\n")
        reporting.write_csv(os.path.join(self.output_dir, METRICS_CSV), self.rows)
        if self._tensorboard is not None:
            for key, value in row.items():
                if key not in ("epoch", "step") and isinstance(value, int | float):
                    self._tensorboard.add_scalar(key, value, row["step"])
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


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


# --------------------------------------------------------------------------------------------
# Checkpoints.
# --------------------------------------------------------------------------------------------


def checkpoint_manager(config: TrainConfig):
    """An orbax ``CheckpointManager`` in ``<output_dir>/checkpoints`` keeping the last N.

    Checkpoints are written atomically (to a temporary directory, then renamed), so a run killed
    mid-save resumes from the previous one. The step number of a checkpoint is the epoch.
    """
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints,
        create=True,
        # Leftovers of a save that a kill interrupted (never read as checkpoints) are removed.
        cleanup_tmp_directories=True,
    )
    directory = os.path.abspath(os.path.join(config.output_dir, CHECKPOINT_DIR))
    return ocp.CheckpointManager(directory, options=options)


def save_checkpoint(manager, epoch: int, state: TrainState) -> None:
    import orbax.checkpoint as ocp

    # The save copies the arrays to host memory before it returns (then writes in the
    # background), so the next step may donate the state's buffers.
    manager.save(epoch, args=ocp.args.StandardSave(state))


def restore_checkpoint(manager, epoch: int, like: TrainState) -> TrainState:
    """Restores the state saved at `epoch` with the shapes, dtypes and shardings of `like`."""
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like
    )
    return manager.restore(epoch, args=ocp.args.StandardRestore(abstract))


def restore_latest(manager, config: TrainConfig, like: TrainState) -> tuple[TrainState, int]:
    """With ``--resume``, the last checkpoint's state and epoch; otherwise `like` and 0."""
    latest = manager.latest_step() if config.resume else None
    if latest is None:
        if config.resume:
            log(f"--resume: no checkpoint in {config.output_dir}; starting from scratch.")
        return like, 0
    state = restore_checkpoint(manager, latest, like=like)
    log(f"Resumed from the checkpoint of epoch {int(latest)} in {config.output_dir}.")
    return state, int(latest)


# --------------------------------------------------------------------------------------------
# Summary.
# --------------------------------------------------------------------------------------------


def summarize(
    config: TrainConfig,
    rows: Sequence[Mapping[str, Any]],
    *,
    steps_per_epoch: int,
    num_params: int,
    num_devices: int,
    wall_time: float,
    noisy_labels: int = 0,
) -> dict[str, Any]:
    """The run's summary from its per-epoch rows (which span resumed runs too)."""
    val_rows = [r for r in rows if "val_accuracy" in r]
    test_rows = [r for r in rows if "test_accuracy" in r]
    best = max(val_rows, key=lambda r: r["val_accuracy"]) if val_rows else None
    train_time = sum(r["epoch_time_s"] for r in rows)
    trained_images = len(rows) * steps_per_epoch * config.batch_size
    return {
        "completed": True,
        "name": config_lib.run_name(config),
        "output_dir": config.output_dir,
        "dataset": config.dataset,
        "model": config.model,
        "optimizer": config.optimizer,
        "rho": config.rho if config.optimizer != variants.BASELINE else 0.0,
        "learning_rate": config.learning_rate,
        "weight_decay": config.weight_decay,
        "seed": config.seed,
        "train_size": config.train_size,
        "label_noise": config.label_noise,
        "label_noise_mode": config.label_noise_mode,
        "noisy_labels": noisy_labels,
        "epochs": config.epochs,
        "steps": config.epochs * steps_per_epoch,
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
    }


def write_summary(config: TrainConfig, summary: Mapping[str, Any]) -> None:
    if is_main_process():
        reporting.write_json(os.path.join(config.output_dir, SUMMARY_FILE), summary)


def print_summary(summary: Mapping[str, Any]) -> None:
    def pct(key):
        value = summary.get(key)
        return "-" if value is None else f"{100 * value:.2f}%"

    rate = summary.get("images_per_s")
    log(
        "\n".join(
            [
                f"== {summary['name']} ({summary['output_dir']}) ==",
                f"  parameters           {summary['num_params']:,}",
                f"  best val accuracy    {pct('best_val_accuracy')}"
                f" (epoch {summary.get('best_val_epoch')})",
                f"  final val accuracy   {pct('final_val_accuracy')}",
                f"  final test accuracy  {pct('final_test_accuracy')}",
                f"  training time        {summary['train_time_s']:.1f} s"
                f" (+ {summary['compile_time_s']:.1f} s compiling,"
                f" {summary['wall_time_s']:.1f} s wall)",
                f"  throughput           {'-' if rate is None else f'{rate:,.0f}'} images/s"
                f" on {summary['num_devices']} device(s)",
            ]
        )
    )
