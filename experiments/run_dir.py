"""The run directory: what a training run leaves in ``--output-dir``.

The names of its files (``config.json``, ``metrics.jsonl``/``.csv``, ``checkpoints/``,
``summary.json``, a ``.lock`` naming the run that holds the folder), the lock, and the policy
that guards the folder: no silent reuse; ``--resume`` only with the same numbers and device
count; ``--overwrite`` deletes only a run of this program, and only once the new run's checks
have passed; :func:`finished_summary`, the one rule for "finished and identical". The files'
contents live in :mod:`experiments.metrics_log`, :mod:`experiments.checkpoints` and
:mod:`experiments.run_summary`. Only the main process writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import time
from collections.abc import Mapping
from typing import Any

from experiments import config as config_lib
from experiments import optimizer_registry, reporting
from experiments.config import TrainConfig
from experiments.parallel import is_main_process, sync
from experiments.runtime import log

CONFIG_FILE = "config.json"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"


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


def read_json_object(path: str) -> dict[str, Any] | None:
    """The JSON object in the file `path`, None when there is no such file.

    Raises OSError when it cannot be read and ValueError when it is not a JSON object (garbled
    JSON and undecodable bytes are ValueErrors too)."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        value = json.load(f)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, found {type(value).__name__}")
    return value


def read_saved_config(output_dir: str) -> dict[str, Any] | None:
    """The run's saved ``config.json`` (None when there is none); a clear error when garbled."""
    path = os.path.join(output_dir, CONFIG_FILE)
    try:
        saved = read_json_object(path)
    except ValueError as e:
        raise config_lib.ConfigError(
            f"{path} is empty or garbled ({e}), so the flags of that run are unknown. Restore "
            "it, or start afresh with --overwrite or another --output-dir."
        ) from None
    return saved


def _field_defaults() -> dict[str, Any]:
    """Every ``TrainConfig`` field's default, as config.json would hold it."""
    fields = dataclasses.fields(config_lib.TrainConfig)
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    return json.loads(json.dumps(defaults))


def config_differences(saved: Mapping[str, Any], config: TrainConfig) -> list[str]:
    """The fields that change the numbers where `saved` (a config.json) and `config` differ.

    Through JSON, so that tuples and lists compare as config.json has them; keys of `saved`
    that are not fields (e.g. the device count) do not count, and a field that `saved` lacks
    (a run made before the field existed) counts as its default, the behaviour it had then.
    """
    current = json.loads(json.dumps(config.to_dict()))
    saved = {**_field_defaults(), **saved}
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
    try:
        summary = read_json_object(path)
    except (OSError, ValueError) as e:
        log(f"{path} cannot be read ({e}): the run is not done, resuming it.")
        return None
    if summary is None:
        return None
    saved = read_saved_config(config.output_dir)
    differences = config_differences(saved, config) if saved else []
    if differences:
        raise config_lib.ConfigError(
            f"The finished run in {config.output_dir!r} was made with another configuration "
            f"than the one asked for ({'; '.join(differences)}): ask for the configuration of "
            "that run, or choose another --output-dir."
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
            return read_json_object(self.path) or {}
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
                    f"configuration, so it cannot continue exactly ({'; '.join(differences)}): "
                    "pass the same flags as the original run, or --overwrite to start afresh."
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
