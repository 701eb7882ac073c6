"""A shared file system that fails under a running job: a full disk while a checkpoint or the
metrics are written, an output folder that turns read-only or is removed.

Each run is the command line (``experiments.train.main``) on a tiny model and 64 images of
scikit-learn's digits (2 steps per epoch, one device), failing in epoch 2. The run must exit 1
with one ``error:`` line, keep the checkpoint and the metrics of epoch 1 whole, and, once the
file system is healthy again, ``--resume`` must finish the run with the numbers of a run that
never failed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import tiny_run

from experiments import metrics_log, run_dir
from experiments import train as train_cli

EPOCHS = 3


def flags(output_dir, *extra: str) -> list[str]:
    return tiny_run.flags(output_dir, *extra, epochs=EPOCHS)


def rows(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, run_dir.METRICS_JSONL)) as f:
        return [json.loads(line) for line in f]


def numbers(row: dict) -> dict:
    """A metrics row without its timings."""
    return {k: v for k, v in row.items() if not k.endswith(("_s", "_per_s"))}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict]:
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert train_cli.main(flags(output_dir))["completed"]
    return [numbers(r) for r in rows(output_dir)]


def fails_in_epoch_2(output_dir, capsys) -> str:
    """Runs until the injected fault; checks the exit and what epoch 1 left; returns stderr."""
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(flags(output_dir))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "--resume" in err
    return err


def resumes_as_if_nothing_happened(output_dir, uninterrupted, capsys) -> None:
    assert not os.path.exists(os.path.join(output_dir, run_dir.LOCK_FILE))
    assert not [n for n in os.listdir(output_dir) if n.endswith(".tmp")]
    assert train_cli.main(flags(output_dir, "--resume"))["completed"]
    assert "Resumed from the checkpoint of epoch 1" in capsys.readouterr().out
    assert [numbers(r) for r in rows(output_dir)] == uninterrupted


class _Epoch2:
    """Arms a fault once the metrics of epoch 1 are written (wraps ``MetricsLog.append``)."""

    def __init__(self, monkeypatch, before_epoch_2=lambda: None):
        self.armed = False
        real_append = metrics_log.MetricsLog.append

        def append(log, row):
            if row["epoch"] == 2:
                self.armed = True
                before_epoch_2()
            return real_append(log, row)

        monkeypatch.setattr(metrics_log.MetricsLog, "append", append)


def test_full_disk_during_a_checkpoint(tmp_path, capsys, monkeypatch, uninterrupted):
    import orbax.checkpoint as ocp

    real_save = ocp.CheckpointManager.save

    def save(manager, step, *args, **kwargs):
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(manager, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    output_dir = tmp_path / "run"
    err = fails_in_epoch_2(output_dir, capsys)
    assert "Could not write the checkpoint of epoch 2" in err and "No space left" in err
    monkeypatch.undo()
    assert sorted(os.listdir(output_dir / run_dir.CHECKPOINT_DIR)) == ["1"]
    # The row of epoch 2 was written before its checkpoint failed; resuming drops it.
    assert [numbers(r) for r in rows(output_dir)] == uninterrupted[:2]
    resumes_as_if_nothing_happened(output_dir, uninterrupted, capsys)


# What TensorStore, orbax's array writer, raises: its status, the file, the OS error's code and
# the whole spec of the array (2 kB in a real run).
_SPEC = '{"driver": "zarr", "kvstore": {"driver": "file", "path": "x/"}, "metadata": {}}' * 25


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.ENOENT])
def test_a_storage_error_is_its_cause_and_the_folder(tmp_path, capsys, monkeypatch, code):
    import orbax.checkpoint as ocp

    real_save = ocp.CheckpointManager.save

    def save(manager, step, *args, **kwargs):
        if step == 2:
            raise ValueError(
                f'OUT_OF_RANGE: Error writing local file "{manager.directory}/2/_sharding": '
                f"Failed to write 3332 bytes to file 7 [os_error_code={code}] "
                f"[tensorstore_spec='{_SPEC}']"
            )
        return real_save(manager, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    output_dir = tmp_path / "run"
    err = fails_in_epoch_2(output_dir, capsys)
    folder = output_dir / run_dir.CHECKPOINT_DIR
    assert f"checkpoint of epoch 2 to {folder}: {os.strerror(code)}. Check" in err, err
    assert "driver" not in err and len(err) < 300, err


def test_a_real_write_failure_is_one_line_on_the_terminal(tmp_path, uninterrupted, capsys):
    # The command line in a process of its own whose files may not grow past 100 bytes from
    # epoch 2 on (RLIMIT_FSIZE binds root too): orbax's writer fails in its background threads.
    output_dir = tmp_path / "run"
    script = f"""
import resource, runpy, signal, sys
from experiments import metrics_log

append = metrics_log.MetricsLog.append

def append_then_limit(log, row):
    append(log, row)
    if row["epoch"] == 2:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))

metrics_log.MetricsLog.append = append_then_limit
sys.argv = ["experiments.train", *{flags(output_dir)!r}]
runpy.run_module("experiments.train", run_name="__main__", alter_sys=True)
"""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(run_dir.__file__)))
    env = os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": checkout}
    # Pipes, not files: the limit does not apply to them.
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    folder = output_dir / run_dir.CHECKPOINT_DIR
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr == (
        f"error: Could not write the checkpoint of epoch 2 to {folder}: File too large. Check "
        "free disk space and permissions, then continue with --resume.\n"
    )
    resumes_as_if_nothing_happened(output_dir, uninterrupted, capsys)


def test_full_disk_during_the_metrics(tmp_path, capsys, monkeypatch, uninterrupted):
    real_fsync = os.fsync
    epoch_2 = _Epoch2(monkeypatch)

    def fsync(fd):
        if epoch_2.armed and run_dir.METRICS_JSONL in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    output_dir = tmp_path / "run"
    err = fails_in_epoch_2(output_dir, capsys)
    assert "Could not write the metrics of epoch 2" in err and "No space left" in err
    monkeypatch.undo()
    assert [numbers(r) for r in rows(output_dir)] == uninterrupted[:1]
    assert sorted(os.listdir(output_dir / run_dir.CHECKPOINT_DIR)) == ["1"]
    resumes_as_if_nothing_happened(output_dir, uninterrupted, capsys)


def test_output_folder_turns_read_only(tmp_path, capsys, monkeypatch, uninterrupted):
    output_dir = tmp_path / "run"
    real_open = os.open
    epoch_2 = _Epoch2(monkeypatch)

    def read_only(path, *args, **kwargs):  # root ignores modes: refuse as a read-only mount
        if epoch_2.armed and str(path).startswith(str(output_dir)):
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    err = fails_in_epoch_2(output_dir, capsys)
    assert "Could not write the metrics of epoch 2" in err and "Read-only" in err
    monkeypatch.undo()
    assert [numbers(r) for r in rows(output_dir)] == uninterrupted[:1]
    resumes_as_if_nothing_happened(output_dir, uninterrupted, capsys)


def test_output_folder_removed_under_the_run(tmp_path, capsys, monkeypatch):
    output_dir = tmp_path / "run"
    _Epoch2(monkeypatch, before_epoch_2=lambda: shutil.rmtree(output_dir))
    err = fails_in_epoch_2(output_dir, capsys)
    assert "Could not write the metrics of epoch 2" in err and "still exists" in err
    assert not output_dir.exists()  # nothing recreated half-way
