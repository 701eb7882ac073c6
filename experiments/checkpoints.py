"""A run's orbax checkpoints under ``checkpoints/<epoch>``: saving, restoring, and falling back
to the newest readable checkpoint when the latest cannot be read."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
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
        with contextlib.suppress(Exception), quiet_storage_logs():
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


# The loggers through which orbax's background writer reports a failure with a traceback: absl's,
# and asyncio's ("Future exception was never retrieved", "Task exception was never retrieved").
_STORAGE_LOGGERS = ("absl", "asyncio")


@contextlib.contextmanager
def quiet_storage_logs():
    """Silences the loggers of orbax and its background writer while a failed save or restore
    is reported as a message instead."""
    loggers = [logging.getLogger(name) for name in _STORAGE_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def save_checkpoint(manager, epoch: int, state: TrainState) -> None:
    """Saves and waits for the background write, so a failure surfaces in this epoch. A stop
    signal (Ctrl-C, SIGTERM) that arrives meanwhile stops the run once the write completed."""
    import orbax.checkpoint as ocp

    # The save copies the arrays to host memory before it returns, then writes in the
    # background; waiting costs the write time of one checkpoint, small next to an epoch.
    try:
        with stop_signals_deferred(), quiet_storage_logs():
            manager.save(epoch, args=ocp.args.StandardSave(state))
            manager.wait_until_finished()
    except Exception as e:  # orbax raises what the file system raised, wrapped or not
        raise RunError(
            f"Could not write the checkpoint of epoch {epoch} to {manager.directory}: "
            f"{storage_cause(e)}. Check free disk space and permissions, then continue with "
            "--resume."
        ) from None


# The file-system errors a write meets, as the OS words them.
_WRITE_ERRNOS = (
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOENT,
    errno.EFBIG,
    errno.EIO,
)
_MAX_CAUSE = 160


def storage_cause(error: BaseException) -> str:
    """The cause of a failed read or write in a few words, e.g. "No space left on device":
    the OS error inside `error` (raised, chained, or quoted by TensorStore as
    ``os_error_code=28`` or by its text), else the first line of its message, shortened (never
    TensorStore's spec of the array)."""
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        if isinstance(error, OSError) and error.errno and error.strerror:
            return os.strerror(error.errno)
        error = error.__cause__ or error.__context__
    text = " ".join(str(e) for e in seen)
    code = re.search(r"os_error_code\W*(\d+)", text)
    if code:
        return os.strerror(int(code.group(1)))
    for number in _WRITE_ERRNOS:
        if os.strerror(number) in text:
            return os.strerror(number)
    return _short(seen[0]) if seen else "no details"


def _short(error: BaseException) -> str:
    """`error`'s type and the first line of its message, cut before a JSON spec and shortened."""
    lines = str(error).strip().splitlines()
    text = re.split(r"\s*[{\[]\s*\"", lines[0])[0] if lines else "no details"
    if len(text) > _MAX_CAUSE:
        text = text[: _MAX_CAUSE - 3].rstrip() + "..."
    return f"{type(error).__name__}: {text}"


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
            with quiet_storage_logs():
                state = restore_checkpoint(manager, step, like=like)
        except Exception as e:  # orbax and TensorStore raise many types for damaged files
            log(
                f"Warning: skipped the checkpoint of epoch {step}: it cannot be read "
                f"({storage_cause(e)}); moved it to {step}.corrupt."
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
