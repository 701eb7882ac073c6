"""A run's orbax checkpoints under ``checkpoints/<epoch>``: saving, restoring, and falling back
to the newest readable checkpoint when the latest cannot be read."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import jax

from experiments import config as config_lib
from experiments.parallel import is_main_process, sync
from experiments.run_dir import CHECKPOINT_DIR, RunError
from experiments.runtime import log, stop_signals_deferred
from experiments.steps import TrainState


@contextlib.contextmanager
def checkpoints(output_dir: str, *, keep: int) -> Iterator[Any]:
    """The run's checkpoint manager, closed at the end; on error the error in flight is the
    one reported (closing waits for pending writes, which may fail too)."""
    manager = checkpoint_manager(output_dir, keep=keep)
    try:
        yield manager
    except BaseException:
        with contextlib.suppress(Exception), quiet_absl():
            manager.close()
        raise
    manager.close()


def checkpoint_manager(output_dir: str, *, keep: int = 1):
    """An orbax ``CheckpointManager`` in ``<output_dir>/checkpoints`` keeping the last `keep`.

    Checkpoints are written atomically (to a temporary directory, then renamed), so a run killed
    mid-save resumes from the previous one. The step number of a checkpoint is the epoch.
    """
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        # Leftovers of a save that a kill interrupted (never read as checkpoints) are removed.
        cleanup_tmp_directories=True,
    )
    directory = os.path.abspath(os.path.join(output_dir, CHECKPOINT_DIR))
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
    """Saves and waits for the background write, so a failure surfaces in this epoch. A stop
    signal (Ctrl-C, SIGTERM) that arrives meanwhile stops the run once the write completed."""
    import orbax.checkpoint as ocp

    # The save copies the arrays to host memory before it returns, then writes in the
    # background; waiting costs the write time of one checkpoint, small next to an epoch.
    try:
        with stop_signals_deferred(), quiet_absl():
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


def restore_latest(manager, like: TrainState, *, resume: bool) -> tuple[TrainState, int]:
    """With `resume`, the newest intact checkpoint's state and epoch; otherwise `like`, 0.

    A checkpoint that cannot be read (corrupt or truncated files) is skipped with a message and
    moved aside to ``checkpoints/<epoch>.corrupt`` (kept, not deleted), so that the run saves
    that epoch afresh.
    """
    steps = sorted(manager.all_steps(), reverse=True) if resume else []
    if resume and not steps:
        log(f"--resume: no checkpoint in {manager.directory}; starting from scratch.")
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
        log(f"Resumed from the checkpoint of epoch {int(step)} in {manager.directory}.")
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
