"""Fault injection: the training harness under bad input, kills, corrupt files and divergence.

Each test drives the command line (``experiments.train.main``, which raises SystemExit on
error) on a tiny model and 64 training images of scikit-learn's digits (offline, 2 steps per
epoch on one device), and checks the message, the exit status and that no file was lost or
left half-written.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from tiny_run import flags

from experiments import config as config_lib
from experiments import reporting, run_dir, steps
from experiments import sweep as sweep_lib
from experiments import train as train_cli


def fails(argv: list[str], capsys, status: int = 2) -> str:
    """Runs the command line, expects `status`; returns stderr (one message, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(argv)
    assert exit_info.value.code == status
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def snapshot(folder) -> dict[str, str]:
    """Relative path -> content hash of every file under `folder`."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return files


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def metrics_epochs(output_dir) -> list[int]:
    with open(os.path.join(output_dir, run_dir.METRICS_JSONL)) as f:
        return [json.loads(line)["epoch"] for line in f]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for this module: its runs compile the same few programs
    again and again (each run builds its own jitted step), which dominates their time."""
    import jax

    try:
        from jax._src import compilation_cache as cache
    except ImportError:  # a private module: without it the tests only take longer
        yield
        return
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in names}
    jax.config.update(names[0], str(tmp_path_factory.mktemp("jax-cache")))
    jax.config.update(names[1], 0)
    cache.reset_cache()
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    cache.reset_cache()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> str:
    """A finished 2-epoch run, copied by the tests that damage or overwrite one."""
    output_dir = str(tmp_path_factory.mktemp("finished") / "run")
    train_cli.main(flags(output_dir))
    return output_dir


@pytest.fixture
def run_copy(finished_run, tmp_path) -> str:
    import shutil

    target = str(tmp_path / "run")
    shutil.copytree(finished_run, target)
    return target


# --------------------------------------------------------------------------------------------
# 1, 2. --overwrite.
# --------------------------------------------------------------------------------------------


def test_overwrite_refuses_what_is_not_a_run(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for target, reason in [
        (".", "current directory"),
        (str(tmp_path), "current directory or a folder above it"),
        (os.path.dirname(os.path.dirname(os.path.abspath(run_dir.__file__))), "checkout"),
        ("/", "root folder"),
    ]:
        err = fails(flags(target, "--overwrite"), capsys)
        assert "--overwrite refuses to delete" in err and reason in err
    home = tmp_path / "home"
    home.mkdir()
    (home / run_dir.CONFIG_FILE).write_text("{}")
    monkeypatch.setenv("HOME", str(home))
    assert "home folder" in fails(flags(str(home), "--overwrite"), capsys)
    # A folder with files of its own, or without a run's config.json, is not a run.
    other = tmp_path / "other"
    other.mkdir()
    (other / run_dir.CONFIG_FILE).write_text("{}")
    (other / "thesis.tex").write_text("years of work")
    assert "thesis.tex" in fails(flags(str(other), "--overwrite"), capsys)
    (other / run_dir.CONFIG_FILE).unlink()
    (other / "thesis.tex").unlink()
    (other / "metrics.csv").write_text("not ours without config.json")
    assert "no config.json" in fails(flags(str(other), "--overwrite"), capsys)
    assert (work / "notes.txt").read_text() == "mine" and (other / "metrics.csv").exists()
    assert not list(tmp_path.rglob(run_dir.LOCK_FILE))


def test_overwrite_deletes_only_after_every_check_passed(run_copy, capsys):
    before = snapshot(run_copy)
    err = fails(flags(run_copy, "--overwrite", "--batch-size=100000"), capsys)
    assert "--batch-size 100000 exceeds" in err
    err = fails(flags(run_copy, "--overwrite", "--validation-size=5000"), capsys)
    assert "leaves no training images" in err
    assert snapshot(run_copy) == before
    # All checks pass: the earlier run goes, the new one takes its place.
    summary = train_cli.main(flags(run_copy, "--overwrite", "--epochs=1"))
    assert (
        summary["completed"] and "--overwrite: deleted the earlier run" in capsys.readouterr().out
    )
    assert metrics_epochs(run_copy) == [1]
    assert sorted(os.listdir(os.path.join(run_copy, run_dir.CHECKPOINT_DIR))) == ["1"]


# --------------------------------------------------------------------------------------------
# 3. Divergence and non-finite flags.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rho=inf"], "--rho must be a finite number, got inf"),
        (["--rho=nan"], "--rho must be a finite number, got nan"),
        (["--weight-decay=nan"], "--weight-decay must be a finite number"),
        (["--learning-rate=inf"], "--learning-rate must be a finite number"),
        (["--optimizer=asam", "--eta=-1"], "--eta must be >= 0"),
    ],
)
def test_non_finite_and_negative_flags_are_refused(tmp_path, capsys, extra, message):
    assert message in fails(flags(tmp_path / "run", *extra), capsys)
    assert not (tmp_path / "run").exists()


def test_divergence_stops_the_run_with_status_3(tmp_path, capsys):
    output_dir = tmp_path / "run"
    err = fails(flags(output_dir, "--learning-rate=1e30"), capsys, status=3)
    assert "diverged in epoch 1" in err and "lower --learning-rate (now 1e+30)" in err
    assert "--rho" in err and "No checkpoint was saved" in err
    summary = read_json(output_dir / run_dir.SUMMARY_FILE)
    assert summary["completed"] is False and summary["diverged"] is True
    assert summary["diverged_epoch"] == 1
    assert os.listdir(output_dir / run_dir.CHECKPOINT_DIR) == []
    assert metrics_epochs(output_dir) == []


def test_divergence_after_a_good_epoch_keeps_its_checkpoint(tmp_path, capsys, monkeypatch):
    from experiments import trainer

    # The second epoch's parameters become NaN, as a too-large step would make them.
    real_epoch = trainer.train_epoch

    def nan_in_epoch_two(experiment, step_fn, state, epoch):
        state, row, seconds = real_epoch(experiment, step_fn, state, epoch)
        if epoch == 1:
            state = state.replace(params=jax_tree_nan(state.params))
        return state, row, seconds

    monkeypatch.setattr(trainer, "train_epoch", nan_in_epoch_two)
    output_dir = tmp_path / "run"
    err = fails(flags(output_dir), capsys, status=3)
    assert "diverged in epoch 2" in err and "last good checkpoint is that of epoch 1" in err
    assert sorted(os.listdir(output_dir / run_dir.CHECKPOINT_DIR)) == ["1"]
    assert metrics_epochs(output_dir) == [1]
    summary = read_json(output_dir / run_dir.SUMMARY_FILE)
    assert (summary["completed"], summary["diverged"], summary["diverged_epoch"]) == (
        False,
        True,
        2,
    )


def jax_tree_nan(tree):
    import jax

    return jax.tree.map(lambda x: x * np.float32("nan"), tree)


def test_all_finite_checks_every_float_leaf():
    import jax.numpy as jnp

    tree = {"w": jnp.ones(3), "step": jnp.array(1, jnp.int32)}
    assert bool(steps.all_finite(tree))
    assert not bool(steps.all_finite({**tree, "b": jnp.array([1.0, jnp.inf])}))


def test_sweep_records_diverged_runs(tmp_path, capsys):
    def train(config):
        config = config_lib.resolve(config)
        diverged = config.learning_rate == 0.1 or (config.optimizer != "sgd" and config.seed == 1)
        summary = {"final_val_accuracy": 0.5, "best_val_accuracy": 0.5, "final_test_accuracy": 0.4}
        if diverged:
            summary = {k: None for k in summary} | {"diverged": True, "error": "diverged"}
        os.makedirs(config.output_dir, exist_ok=True)
        reporting.write_jsonl(os.path.join(config.output_dir, "metrics.jsonl"), [])
        reporting.write_json(os.path.join(config.output_dir, "summary.json"), summary)
        return summary

    sweep = sweep_lib.parse_args(
        [f"--output-dir={tmp_path}", "--lrs=0.1,0.05", "--wds=5e-4"]
        + ["--optimizers=sam", "--rhos=0.05", "--seeds=2"]
    )
    table = sweep_lib.run_sweep(sweep, train_fn=train)
    assert [(r["optimizer"], r["learning_rate"], r["diverged"]) for r in table] == [
        ("sgd", 0.05, 0),
        ("sam", 0.05, 1),
    ]
    assert "| 2 (1 diverged) |" in (tmp_path / "table.md").read_text()
    assert "diverged" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# 4. A restarted sweep checks the flags of the runs it finds.
# --------------------------------------------------------------------------------------------


def test_sweep_refuses_finished_runs_made_with_other_flags(tmp_path, capsys):
    calls = []

    def train(config):
        config = config_lib.resolve(config)
        calls.append(config)
        os.makedirs(config.output_dir, exist_ok=True)
        reporting.write_text(os.path.join(config.output_dir, "config.json"), config.to_json())
        summary = {"final_val_accuracy": 0.5, "best_val_accuracy": 0.5, "final_test_accuracy": 0.4}
        reporting.write_json(os.path.join(config.output_dir, "summary.json"), summary)
        reporting.write_jsonl(os.path.join(config.output_dir, "metrics.jsonl"), [])
        return summary

    base = [f"--output-dir={tmp_path}", "--lrs=0.05", "--wds=5e-4", "--optimizers=sam"]
    base += ["--rhos=0.05", "--seeds=1"]
    sweep_lib.run_sweep(sweep_lib.parse_args([*base, "--epochs=2"]), train_fn=train)
    assert len(calls) == 2
    results = (tmp_path / "results.csv").read_bytes()
    with pytest.raises(config_lib.ConfigError, match="epochs: saved 2, now 50"):
        sweep_lib.run_sweep(sweep_lib.parse_args([*base, "--epochs=50"]), train_fn=train)
    assert len(calls) == 2 and (tmp_path / "results.csv").read_bytes() == results
    # An empty summary.json (a full disk) means "not done": the run is resumed, not a crash.
    (tmp_path / "runs" / "sam-lr0.05-wd0.0005-rho0.05-s0" / "summary.json").write_text("")
    sweep_lib.run_sweep(sweep_lib.parse_args([*base, "--epochs=2"]), train_fn=train)
    assert [c.optimizer for c in calls[2:]] == ["sam"]
    assert "cannot be read" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# 5. The lock.
# --------------------------------------------------------------------------------------------


def write_lock(folder, pid: int) -> None:
    holder = {"pid": pid, "host": socket.gethostname(), "since": "earlier"}
    with open(os.path.join(folder, run_dir.LOCK_FILE), "w") as f:
        json.dump(holder, f)


def test_a_second_run_on_a_locked_dir_fails_at_once(run_copy, capsys):
    # The holder: a live process of this host (the test's parent).
    write_lock(run_copy, os.getppid())
    before = snapshot(run_copy)
    err = fails(flags(run_copy, "--resume"), capsys)
    assert f"process {os.getppid()} on {socket.gethostname()}" in err and "in use" in err
    assert snapshot(run_copy) == before


def test_a_lock_held_by_another_process_blocks_until_released(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        write_lock(folder, holder.pid)
        assert f"process {holder.pid}" in fails(flags(folder), capsys)
    finally:
        holder.communicate(b"")  # the holder exits: its lock is stale now
    summary = train_cli.main(flags(folder, "--epochs=1"))
    assert summary["completed"] and "Took over the lock" in capsys.readouterr().out
    assert not (folder / run_dir.LOCK_FILE).exists()  # released at the end


def _train_until_first_checkpoint(output_dir, log, timeout: float) -> subprocess.Popen:
    """Starts a long ``experiments.train`` process; returns it once a first checkpoint is
    committed. A process that gets nowhere within `timeout` fails the test with every thread's
    stack (PYTHONFAULTHANDLER dumps them on SIGABRT).

    Any committed checkpoint will do: epochs take milliseconds and only the last 2 are kept,
    so ``checkpoints/1`` may be gone before a poll sees it."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(run_dir.__file__)))
    env = os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": checkout, "PYTHONFAULTHANDLER": "1"}
    argv = flags(output_dir, "--epochs=10000", "--optimizer=sgd", "--eval-every=10000")
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "experiments.train", *argv],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout
    checkpoints = output_dir / run_dir.CHECKPOINT_DIR
    while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
        if process.poll() is not None:
            pytest.fail(f"exit status {process.returncode}:\n{log.read_text()[-6000:]}")
        if time.monotonic() > deadline:
            process.send_signal(signal.SIGABRT)
            process.wait(timeout=60)
            # The stacks, without faulthandler's long list of loaded extension modules.
            lines = [x for x in log.read_text().splitlines() if not x.startswith("Extension")]
            pytest.fail(f"no checkpoint in {timeout} s:\n" + "\n".join(lines)[-6000:])
        time.sleep(0.2)
    return process


def test_sigterm_releases_the_lock_and_keeps_the_checkpoints(tmp_path):
    # A real process, stopped as a scheduler preempts a job.
    output_dir, log = tmp_path / "run", tmp_path / "train.log"
    process = _train_until_first_checkpoint(output_dir, log, timeout=200)
    try:
        assert (output_dir / run_dir.LOCK_FILE).exists()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        process.kill()
    out = log.read_text()
    assert process.returncode == 128 + signal.SIGTERM, out
    assert "stopped by SIGTERM" in out and "Traceback" not in out
    assert not (output_dir / run_dir.LOCK_FILE).exists()
    assert read_json(output_dir / run_dir.CONFIG_FILE)["epochs"] == 10000


def test_ctrl_c_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys):
    # A real SIGINT, as a terminal's Ctrl-C sends it, once the run printed its second epoch
    # (so the checkpoint of the first is committed; the signal may hit the second's write).
    import threading

    output_dir, err_log = tmp_path / "run", tmp_path / "stderr.log"
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(run_dir.__file__)))
    env = os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": checkout, "PYTHONUNBUFFERED": "1"}
    long_run = ["--epochs=10000", "--optimizer=sgd", "--eval-every=10000"]
    # `python -m experiments.train` as a terminal runs it: a foreground job whose SIGINT is not
    # ignored (a test runner's worker may pass it on ignored).
    script = (
        "import runpy, signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        f"sys.argv = ['experiments.train', *{flags(output_dir, *long_run)!r}]\n"
        "runpy.run_module('experiments.train', run_name='__main__', alter_sys=True)\n"
    )
    with open(err_log, "w") as err:
        process = subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    watchdog = threading.Timer(300, process.kill)  # a hung run fails the test, never blocks it
    watchdog.start()
    try:
        out = []
        for line in process.stdout:
            out.append(line)
            if line.startswith("epoch   2/"):
                process.send_signal(signal.SIGINT)
                break
        out.append(process.stdout.read())
        process.wait()
    finally:
        watchdog.cancel()
        process.kill()
    out, err = "".join(out), err_log.read_text()
    assert process.returncode == 128 + signal.SIGINT, out + err
    assert err == "error: stopped by SIGINT (Ctrl-C); continue with --resume.\n", err
    assert "Traceback" not in out and not (output_dir / run_dir.LOCK_FILE).exists()
    saved = [
        int(p.name) for p in (output_dir / run_dir.CHECKPOINT_DIR).iterdir() if p.name.isdigit()
    ]
    assert saved, out
    # The newest checkpoint reads back: the run continues from it.
    last = max(saved)
    summary = train_cli.main(
        flags(output_dir, *long_run, "--resume", f"--stop-after-epoch={last + 1}")
    )
    assert summary["epoch"] == last + 1
    assert f"Resumed from the checkpoint of epoch {last} " in capsys.readouterr().out


def test_a_stop_signal_lets_the_checkpoint_write_complete(capsys):
    from experiments import runtime

    written = []
    with pytest.raises(SystemExit) as exit_info:
        with runtime.stop_signals_deferred():
            runtime.stop(signal.SIGINT)  # what the handler calls when Ctrl-C arrives
            written.append("checkpoint")
    assert written and exit_info.value.code == 128 + signal.SIGINT
    assert capsys.readouterr().err == runtime.stop_message(signal.SIGINT) + "\n"
    # A write that fails reports its own error; the signal is dropped.
    with pytest.raises(OSError, match="No space"):
        with runtime.stop_signals_deferred():
            runtime.stop(signal.SIGTERM)
            raise OSError(28, "No space left on device")
    with runtime.stop_signals_deferred():
        pass  # nothing left pending


def test_resuming_a_finished_run_keeps_its_times_apart(run_copy, capsys):
    first = read_json(os.path.join(run_copy, run_dir.SUMMARY_FILE))
    capsys.readouterr()
    summary = train_cli.main(flags(run_copy, "--resume"))
    out = capsys.readouterr().out
    assert summary["completed"] and summary["resumed_from_epoch"] == 2
    assert summary["train_time_s"] == first["train_time_s"]  # the first run's epochs
    assert "over every run of it" in out and "resumed after epoch 2: 0 epoch(s) in" in out
    assert " s wall)" not in out  # no training time of one process beside another's wall time


def test_the_lock_is_released_on_error(run_copy, capsys):
    fails(flags(run_copy, "--resume", "--batch-size=100000"), capsys)
    assert not os.path.exists(os.path.join(run_copy, run_dir.LOCK_FILE))


# --------------------------------------------------------------------------------------------
# 6. A corrupt latest checkpoint.
# --------------------------------------------------------------------------------------------


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, capsys):
    output_dir = str(tmp_path / "run")
    train_cli.main(flags(output_dir, "--epochs=3", "--stop-after-epoch=2"))
    latest = os.path.join(output_dir, run_dir.CHECKPOINT_DIR, "2")
    for root, _, names in os.walk(latest):
        for name in names:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(max(0, os.path.getsize(f.name) // 3))
    capsys.readouterr()
    summary = train_cli.main(flags(output_dir, "--epochs=3", "--resume"))
    out = capsys.readouterr().out
    assert "skipped the checkpoint of epoch 2" in out and "2.corrupt" in out
    assert "Resumed from the checkpoint of epoch 1" in out
    assert summary["completed"] and metrics_epochs(output_dir) == [1, 2, 3]
    assert sorted(os.listdir(os.path.join(output_dir, run_dir.CHECKPOINT_DIR))) == [
        "2",
        "2.corrupt",
        "3",
    ]


# --------------------------------------------------------------------------------------------
# 7. Atomic writes and damaged files.
# --------------------------------------------------------------------------------------------


def test_writers_leave_the_old_file_when_the_disk_is_full(tmp_path, monkeypatch):
    path = str(tmp_path / "summary.json")
    reporting.write_json(path, {"old": 1})

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    for write in (
        lambda: reporting.write_json(path, {"new": 2}),
        lambda: reporting.write_csv(str(tmp_path / "summary.json"), [{"new": 2}]),
        lambda: reporting.write_text(path, "new"),
    ):
        with pytest.raises(OSError, match="No space"):
            write()
        assert read_json(path) == {"old": 1}
    assert os.listdir(tmp_path) == ["summary.json"]  # no temporary file left


def test_empty_config_json_on_resume_is_a_message(run_copy, capsys):
    with open(os.path.join(run_copy, run_dir.CONFIG_FILE), "w"):
        pass
    err = fails(flags(run_copy, "--resume"), capsys)
    assert "config.json is empty or garbled" in err and "--overwrite" in err


def test_a_partial_last_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    output_dir = str(tmp_path / "run")
    train_cli.main(flags(output_dir, "--stop-after-epoch=1"))
    with open(os.path.join(output_dir, run_dir.METRICS_JSONL), "a") as f:
        f.write('{"epoch": 2, "train_lo')
    capsys.readouterr()
    assert train_cli.main(flags(output_dir, "--resume"))["completed"]
    assert "dropped 1 unreadable line(s)" in capsys.readouterr().out
    assert metrics_epochs(output_dir) == [1, 2]


# --------------------------------------------------------------------------------------------
# 8. A failed background checkpoint write.
# --------------------------------------------------------------------------------------------


def test_a_failed_checkpoint_write_surfaces_in_the_same_epoch(tmp_path, capsys, monkeypatch):
    import orbax.checkpoint as ocp

    def disk_full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", disk_full)
    output_dir = tmp_path / "run"
    err = fails(flags(output_dir), capsys, status=1)
    assert "Could not write the checkpoint of epoch 1" in err and "--resume" in err
    assert metrics_epochs(output_dir) == [1]  # stopped in epoch 1, not one epoch later
    assert not (output_dir / run_dir.LOCK_FILE).exists()


# --------------------------------------------------------------------------------------------
# 9. Messages instead of tracebacks.
# --------------------------------------------------------------------------------------------


def test_output_dir_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("keep")
    assert "is a file, not a folder" in fails(flags(path), capsys)
    assert path.read_text() == "keep"


def test_read_only_output_folder(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    real_open = os.open

    def read_only(path, *args, **kwargs):  # root ignores the mode: refuse as a read-only mount
        if str(path).startswith(str(folder)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    assert "Cannot write to --output-dir" in fails(flags(folder), capsys)
    assert list(folder.iterdir()) == []


def test_validation_split_larger_than_the_data(tmp_path, capsys):
    # digits has 1,438 training images (mnist5k's 4,000 take seconds to parse: same path).
    argv = ["--dataset=digits", "--validation-size=1438", f"--output-dir={tmp_path / 'run'}"]
    assert "leaves no training images" in fails(argv, capsys)
    assert not (tmp_path / "run").exists()


def cifar_argv(tmp_path, data_dir) -> list[str]:
    return ["--dataset=cifar10", f"--data-dir={data_dir}", f"--output-dir={tmp_path / 'run'}"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"this is not gzip", "is not a readable CIFAR archive"),
        (gzip.compress(b"x" * 1000)[:50], "is not a readable CIFAR archive"),
    ],
    ids=["not-gzip", "truncated"],
)
def test_damaged_cifar_archive(tmp_path, capsys, content, message):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "cifar-10-python.tar.gz").write_bytes(content)
    err = fails(cifar_argv(tmp_path, data_dir), capsys)
    assert message in err and "cifar-10-python.tar.gz" in err and "Download it again" in err
    assert not (tmp_path / "run").exists()


def test_garbage_cifar_pickles(tmp_path, capsys):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(b"\x80\x04garbage")
    err = fails(cifar_argv(tmp_path, tmp_path / "data"), capsys)
    assert "data_batch_1: not a CIFAR python-version pickle" in err


def test_garbage_pickle_inside_an_archive(tmp_path, capsys):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tarfile.open(data_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
    assert "not a CIFAR python-version pickle" in fails(cifar_argv(tmp_path, data_dir), capsys)


# --------------------------------------------------------------------------------------------
# 10. Resume on another device count.
# --------------------------------------------------------------------------------------------


def test_resume_on_another_device_count_needs_a_flag(tmp_path, capsys):
    output_dir = str(tmp_path / "run")
    train_cli.main(flags(output_dir, "--stop-after-epoch=1"))
    config_path = os.path.join(output_dir, run_dir.CONFIG_FILE)
    saved = read_json(config_path)
    assert saved[run_dir.DEVICE_COUNT_KEY] == 1
    # As if the run had started on a machine with 4 devices (with the default --num-devices 0,
    # all of them).
    reporting.write_json(config_path, saved | {run_dir.DEVICE_COUNT_KEY: 4})
    err = fails(flags(output_dir, "--resume"), capsys)
    assert "trained on 4 device(s), this one has 1" in err and "--allow-device-change" in err
    summary = train_cli.main(flags(output_dir, "--resume", "--allow-device-change"))
    assert summary["completed"] and metrics_epochs(output_dir) == [1, 2]


# --------------------------------------------------------------------------------------------
# 11. Out-of-range labels (checked where the data set loads).
# --------------------------------------------------------------------------------------------


def test_out_of_range_labels_stop_before_training(tmp_path, capsys, monkeypatch):
    from experiments.data import embedded

    real_load = embedded.load_digits

    def label_99():
        splits = real_load()
        labels = splits.train_labels.copy()
        labels[3] = 99
        return splits._replace(train_labels=labels)

    monkeypatch.setattr(embedded, "load_digits", label_99)
    err = fails(flags(tmp_path / "run"), capsys)
    assert "label 99 at index 3 lies outside [0, 10)" in err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# 12. CIFAR not there.
# --------------------------------------------------------------------------------------------


def test_missing_cifar_is_one_clean_message(tmp_path, capfd):
    data_dir = tmp_path / "nothing"
    data_dir.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(cifar_argv(tmp_path, data_dir))
    assert exit_info.value.code == 2
    captured = capfd.readouterr()
    assert "absl" not in captured.err and "WARNING" not in captured.err
    assert 'pip install -e ".[prepare]"' in captured.err and "sam-optax[" not in captured.err
    assert not (tmp_path / "run").exists()
