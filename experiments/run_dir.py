"""The run directory: what a training run leaves in ``--output-dir``.

``config.json``; ``metrics.jsonl`` and ``metrics.csv`` (one row per epoch; TensorBoard too when
``tensorboardX`` is installed); orbax checkpoints under ``checkpoints/<epoch>``;
``summary.json``; a ``.lock`` naming the run that holds the folder. Also the policy that guards
the directory (no silent reuse; ``--resume`` only with the same numbers and device count;
``--overwrite`` deletes only a run of this program, and only once the new run's checks have
passed), checkpoints that fall back to the newest readable one, and the console lines a run
prints. Only the main process writes; every JSON/CSV file is replaced atomically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax

from experiments import config as config_lib
from experiments import optimizer_registry, reporting
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
# The directory, its lock and its config.
# --------------------------------------------------------------------------------------------


class RunError(RuntimeError):
    """The run cannot go on for a reason outside its flags (a checkpoint that cannot be
    written, say); the message says what to do."""


# What a run of this program leaves in its directory, and nothing else: how --overwrite
# recognises a folder it may delete.
LOCK_FILE = ".lock"
TENSORBOARD_DIR = "tensorboard"
RUN_ENTRIES = frozenset(
    {CONFIG_FILE, METRICS_JSONL, METRICS_CSV, SUMMARY_FILE, CHECKPOINT_DIR, TENSORBOARD_DIR}
)
DEVICE_COUNT_KEY = "device_count"  # Written into config.json next to the flags.
# The repository checkout, which --overwrite never deletes (nor any folder above it).
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_leftover(name: str) -> bool:
    """The lock, or a temporary file of an atomic write that a kill interrupted."""
    return name == LOCK_FILE or (name.startswith(".") and name.endswith(reporting.TEMP_SUFFIX))


def _run_entries(path: str) -> tuple[set[str], set[str]]:
    """(run files, foreign files) in `path`; the lock and write leftovers count as neither."""
    names = {name for name in os.listdir(path) if not _is_leftover(name)}
    return names & RUN_ENTRIES, names - RUN_ENTRIES


def _within(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _protected(path: str) -> str | None:
    """Why --overwrite must never delete `path`, or None."""
    real = os.path.realpath(path)
    if real == os.path.realpath(os.sep):
        return "it is the root folder"
    if real == os.path.realpath(os.path.expanduser("~")):
        return "it is the home folder"
    if _within(os.path.realpath(os.getcwd()), real):
        return "it is the current directory or a folder above it"
    if _within(os.path.realpath(_CHECKOUT), real):
        return "it holds the repository checkout"
    return None


def read_saved_config(output_dir: str) -> dict[str, Any] | None:
    """The run's saved ``config.json`` (None when there is none); a clear error when garbled."""
    path = os.path.join(output_dir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
        if not isinstance(saved, dict):
            raise ValueError(f"expected a JSON object, found {type(saved).__name__}")
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise config_lib.ConfigError(
            f"{path} is empty or garbled ({e}), so the flags of that run are unknown. Restore "
            "it, or start afresh with --overwrite or another --output-dir."
        ) from None
    return saved


def config_differences(saved: Mapping[str, Any], config: TrainConfig) -> list[str]:
    """The fields that change the numbers where `saved` (a config.json) and `config` differ.

    Through JSON, so that tuples and lists compare as config.json has them; keys of `saved`
    that are not fields (e.g. the device count) do not count.
    """
    current = json.loads(json.dumps(config.to_dict()))
    if "optimizer" in saved:  # a run saved under an old spelling is the same optimizer
        saved = {
            **saved,
            "optimizer": optimizer_registry.canonical_name(saved["optimizer"], warn=False),
        }
    return [
        f"{name}: saved {saved.get(name)!r}, now {current[name]!r}"
        for name in current
        if name not in config_lib.RESUME_INDEPENDENT_FIELDS and saved.get(name) != current[name]
    ]


def finished_summary(config: TrainConfig) -> dict[str, Any] | None:
    """The one rule for "this run is finished and identical", shared by ``--resume``'s callers,
    the sweep and the papers' scripts.

    Returns the summary of the run in ``config.output_dir`` (`config` resolved) if it finished
    with the same numbers; None when it has not finished (no summary, or one that cannot be
    read: resuming it rewrites it). A finished run made with other numbers is refused, naming
    the fields that differ: the folder's name does not say, and retraining would erase it.
    """
    path = os.path.join(config.output_dir, SUMMARY_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            summary = json.load(f)
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        log(f"{path} cannot be read ({e}): the run is not done, resuming it.")
        return None
    saved = read_saved_config(config.output_dir)
    differences = config_differences(saved, config) if saved else []
    if differences:
        raise config_lib.ConfigError(
            f"The finished run in {config.output_dir!r} was made with another configuration "
            "than the one asked for:\n  "
            + "\n  ".join(differences)
            + "\nAsk for the configuration of that run, or choose another --output-dir."
        )
    return summary


class DirLock:
    """An advisory lock on a run directory: a ``.lock`` file naming its holder (pid, host).

    Created with ``O_CREAT | O_EXCL``, so of two runs on one directory the second fails at once.
    A lock left by a killed process on this host is taken over; one from another host is not
    (its process cannot be checked from here).
    """

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LOCK_FILE)
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.ctime()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not _is_stale(holder):
                    raise config_lib.ConfigError(_lock_message(self.path, holder)) from None
                log(
                    f"Took over the lock of process {holder['pid']} on {holder['host']}, "
                    f"which is no longer running ({self.path})."
                )
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
                continue
            except OSError as e:  # read-only folder, no permission
                raise config_lib.ConfigError(
                    f"Cannot write to --output-dir {os.path.dirname(self.path)!r} ({e.strerror}):"
                    " choose a folder you can write to."
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise config_lib.ConfigError(_lock_message(self.path, self._holder()))

    def _holder(self) -> dict[str, Any]:
        try:
            with open(self.path) as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.held and self._holder().get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        self.held = False


def _is_stale(holder: Mapping[str, Any]) -> bool:
    """Whether the lock's process is gone: only decidable for a process of this host."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or holder.get("host") != socket.gethostname():
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


def _lock_message(path: str, holder: Mapping[str, Any]) -> str:
    who = (
        f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"
        if holder
        else "an unknown process (the lock file is unreadable)"
    )
    return (
        f"{os.path.dirname(path)!r} is in use by another run: {who} holds {path}. Wait for it "
        f"to finish or choose another --output-dir; if no run uses the folder, delete {path}."
    )


class OutputDir:
    """The run's ``--output-dir``: checked before anything is written, locked while the run
    writes, emptied for ``--overwrite`` only just before the new run's first write.

    ``check()`` (no writes, but the lock where the folder exists) -> load the data, build the
    model -> ``open(num_devices)`` (creates, locks, deletes the earlier run, writes
    ``config.json``) -> ``close()`` (releases the lock, also on error). Only the main process
    touches the files.
    """

    def __init__(self, config: TrainConfig):
        self.config = config
        self.path = config.output_dir
        self.lock = DirLock(self.path)
        self.saved: dict[str, Any] | None = None  # config.json of the run being resumed

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def check(self) -> None:
        """Refuses a file, an unwritable folder, a folder holding another run without
        ``--resume``/``--overwrite``, a resume with other numbers and an unsafe overwrite."""
        config, path = self.config, self.path
        if os.path.exists(path) and not os.path.isdir(path):
            raise config_lib.ConfigError(
                f"--output-dir {path!r} is a file, not a folder: pass a folder (it is created "
                "when missing)."
            )
        if not os.path.isdir(path):
            return
        if config.overwrite and _protected(path):
            self._check_deletable(set(), set())  # raises, before even a lock file is written
        if is_main_process():
            self.lock.acquire()  # before reading: a running run may be rewriting the files
        run_files, foreign = _run_entries(path)
        if not (run_files or foreign):
            return
        if config.resume:
            self.saved = read_saved_config(path)
            differences = config_differences(self.saved, config) if self.saved else []
            if differences:
                raise config_lib.ConfigError(
                    f"--resume: the run in {path!r} was started with a different "
                    "configuration, so it cannot continue exactly:\n  "
                    + "\n  ".join(differences)
                    + "\nPass the same flags as the original run, or --overwrite to start afresh."
                )
        elif config.overwrite:
            self._check_deletable(run_files, foreign)
        else:
            raise FileExistsError(
                f"Output directory {path!r} is not empty (it holds an earlier run). Pass "
                "--resume to continue that run from its last checkpoint, --overwrite to delete "
                "it and start afresh, or choose another --output-dir."
            )

    def _check_deletable(self, run_files: set[str], foreign: set[str]) -> None:
        reason = _protected(self.path)
        if reason is None and (CONFIG_FILE not in run_files or foreign):
            shown = ", ".join(sorted(foreign)[:5]) or "no config.json"
            reason = f"it holds files that are not a run of this program ({shown})"
        if reason:
            raise config_lib.ConfigError(
                f"--overwrite refuses to delete {self.path!r}: {reason}. Choose another "
                "--output-dir (runs/<name> is the default), or delete the folder yourself."
            )

    def open(self, num_devices: int) -> None:
        """Creates and locks the folder, deletes the earlier run on ``--overwrite`` and writes
        ``config.json``: call it once every check of the new run has passed."""
        self._check_device_count(num_devices)
        # Every process has looked at the folder before the main process changes it.
        sync("output_dir_checked")
        if is_main_process():
            try:
                os.makedirs(self.path, exist_ok=True)
            except OSError as e:
                raise config_lib.ConfigError(
                    f"Cannot create --output-dir {self.path!r} ({e.strerror}): choose a folder "
                    "you can write to."
                ) from None
            if not self.lock.held:
                self.lock.acquire()
            run_files, foreign = _run_entries(self.path)
            if self.config.overwrite and run_files:
                self._check_deletable(run_files, foreign)  # again, now under the lock
                leftovers = [n for n in os.listdir(self.path) if _is_leftover(n)]
                for name in sorted(run_files) + [n for n in leftovers if n != LOCK_FILE]:
                    entry = os.path.join(self.path, name)
                    if os.path.isdir(entry):
                        shutil.rmtree(entry)
                    else:
                        os.remove(entry)
                log(f"--overwrite: deleted the earlier run in {self.path}.")
            config_dict = self.config.to_dict() | {DEVICE_COUNT_KEY: num_devices}
            reporting.write_json(os.path.join(self.path, CONFIG_FILE), config_dict)
        sync("output_dir_open")

    def _check_device_count(self, num_devices: int) -> None:
        saved_count = (self.saved or {}).get(DEVICE_COUNT_KEY)
        if saved_count is None or saved_count == num_devices:
            return
        if not self.config.allow_device_change:
            raise config_lib.ConfigError(
                f"--resume: the run in {self.path!r} trained on {saved_count} device(s), this "
                f"one has {num_devices}. Each device's SAM ascent uses its share of the batch, "
                f"so the numbers would change. Resume on {saved_count} devices (--num-devices), "
                "or pass --allow-device-change to accept the change."
            )
        log(
            f"--allow-device-change: continuing a run of {saved_count} device(s) on "
            f"{num_devices}; the numbers differ from an uninterrupted run."
        )

    def close(self) -> None:
        if is_main_process():
            self.lock.release()


# --------------------------------------------------------------------------------------------
# Metrics.
# --------------------------------------------------------------------------------------------


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
        reporting.write_jsonl(os.path.join(self.output_dir, METRICS_JSONL), self.rows)
        reporting.write_csv(os.path.join(self.output_dir, METRICS_CSV), self.rows)

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
    mid-write by an older version) are dropped with a warning."""
    rows, dropped = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                dropped += 1
    if dropped:
        log(f"Warning: dropped {dropped} unreadable line(s) of {path} (a partial last row).")
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


# --------------------------------------------------------------------------------------------
# Checkpoints.
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def checkpoints(config: TrainConfig) -> Iterator[Any]:
    """The run's checkpoint manager, closed at the end; on error the error in flight is the
    one reported (closing waits for pending writes, which may fail too)."""
    manager = checkpoint_manager(config)
    try:
        yield manager
    except BaseException:
        with contextlib.suppress(Exception), quiet_absl():
            manager.close()
        raise
    manager.close()


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


@contextlib.contextmanager
def quiet_absl():
    """Silences absl logging (orbax logs a failed save or restore with a traceback there)
    while the failure is reported as a message instead."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def save_checkpoint(manager, epoch: int, state: TrainState) -> None:
    """Saves and waits for the background write, so a failure surfaces in this epoch."""
    import orbax.checkpoint as ocp

    # The save copies the arrays to host memory before it returns, then writes in the
    # background; waiting costs the write time of one checkpoint, small next to an epoch.
    try:
        with quiet_absl():
            manager.save(epoch, args=ocp.args.StandardSave(state))
            manager.wait_until_finished()
    except Exception as e:  # orbax raises what the file system raised, wrapped or not
        raise RunError(
            f"Could not write the checkpoint of epoch {epoch} to {manager.directory} "
            f"({type(e).__name__}: {_first_line(e)}). Check free disk space and permissions, "
            "then continue with --resume."
        ) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no details"


def restore_checkpoint(manager, epoch: int, like: TrainState) -> TrainState:
    """Restores the state saved at `epoch` with the shapes, dtypes and shardings of `like`."""
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like
    )
    return manager.restore(epoch, args=ocp.args.StandardRestore(abstract))


def restore_latest(manager, config: TrainConfig, like: TrainState) -> tuple[TrainState, int]:
    """With ``--resume``, the newest intact checkpoint's state and epoch; otherwise `like`, 0.

    A checkpoint that cannot be read (corrupt or truncated files) is skipped with a message and
    moved aside to ``checkpoints/<epoch>.corrupt`` (kept, not deleted), so that the run saves
    that epoch afresh.
    """
    steps = sorted(manager.all_steps(), reverse=True) if config.resume else []
    if config.resume and not steps:
        log(f"--resume: no checkpoint in {config.output_dir}; starting from scratch.")
    for step in steps:
        try:
            with quiet_absl():
                state = restore_checkpoint(manager, step, like=like)
        except Exception as e:  # orbax and TensorStore raise many types for damaged files
            log(
                f"Warning: skipped the checkpoint of epoch {step}: it cannot be read "
                f"({type(e).__name__}: {_first_line(e)}); moved it to {step}.corrupt."
            )
            _set_aside(manager, step)
            continue
        log(f"Resumed from the checkpoint of epoch {int(step)} in {config.output_dir}.")
        return state, int(step)
    if steps:
        raise config_lib.ConfigError(
            f"--resume: none of the checkpoints in {manager.directory} can be read (epochs "
            f"{sorted(steps)}, now *.corrupt). Start afresh with --overwrite."
        )
    return like, 0


def _set_aside(manager, step: int) -> None:
    if is_main_process():
        path = os.path.join(str(manager.directory), str(step))
        target, n = f"{path}.corrupt", 1
        while os.path.exists(target):
            target, n = f"{path}.corrupt{n}", n + 1
        os.replace(path, target)
    sync("checkpoint_set_aside")
    manager.reload()


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
    diverged_epoch: int | None = None,
) -> dict[str, Any]:
    """The run's summary from its per-epoch rows (which span resumed runs too).

    A run that diverged at `diverged_epoch` is not completed; its rows end before that epoch.
    """
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
