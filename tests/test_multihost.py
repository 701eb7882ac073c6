"""Multi-process training for real, on one machine.

Two processes on localhost, one CPU device each, talk through ``jax.distributed`` (coordinator
on 127.0.0.1, gloo CPU collectives) and train one 2-device data parallel run of
``python -m experiments.train --distributed``. Process 1 is killed with SIGKILL in the middle of
an epoch (a host that dies); process 0 must then stop by itself, with exit status 1 and a
one-line message, within the ``--distributed-timeout``. Resumed with ``--resume``, the run's
final checkpoint must match a one-process run on 2 devices, to float rounding (XLA's
in-process all-reduce and gloo may round the gradient mean differently, and training carries
such differences on).

One process per device: with several devices per process, gloo itself aborts the survivor
(``std::terminate`` on a collective mismatch between its own devices) when a peer dies, which
still ends it, with a non-zero status, but without a message of ours.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import config as config_lib
from experiments import parallel, run_dir
from experiments.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3
# The tiny small_cnn on scikit-learn's digits (offline): 38 steps of 32 images per epoch.
TRAIN_ARGS = [
    "--dataset=digits",
    "--model=small_cnn",
    '--model-kwargs={"features": [8]}',
    f"--epochs={EPOCHS}",
    "--batch-size=32",
    "--eval-batch-size=64",
    "--optimizer=ssam",
    "--no-progress",
]
LAUNCH_TIMEOUT_S = 150  # per launch; a healthy one takes under a minute, 45 s on 2 busy cores
DISTRIBUTED_TIMEOUT_S = 10  # --distributed-timeout of the multi-process launches


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices_per_process: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    # Read by JAX at start-up; wins over --xla_force_host_platform_device_count in XLA_FLAGS.
    env["JAX_NUM_CPU_DEVICES"] = str(devices_per_process)
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


class Launch:
    """The processes of one multi-process (or single-process) ``experiments.train`` run."""

    def __init__(self, log_dir: Path, name: str, args: list[str], processes: int, devices: int):
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        port = _free_port()
        for pid in range(processes):
            command = [sys.executable, "-m", "experiments.train", *TRAIN_ARGS, *args]
            if processes > 1:
                command += [
                    "--distributed",
                    f"--distributed-timeout={DISTRIBUTED_TIMEOUT_S}",
                    f"--coordinator-address=127.0.0.1:{port}",
                    f"--num-processes={processes}",
                    f"--process-id={pid}",
                ]
            env = _env(devices)
            # Process 0's coordinator listens on the loopback interface only (JAX's default is
            # every interface).
            env["JAX_COORDINATOR_BIND_ADDRESS"] = f"127.0.0.1:{port}"
            log = log_dir / f"{name}.{pid}.log"
            self.logs.append(log)
            with open(log, "w") as out:
                self.procs.append(
                    subprocess.Popen(
                        command,
                        cwd=ROOT,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )

    def wait(self, timeout: float = LAUNCH_TIMEOUT_S) -> list[str]:
        """Waits for every process to exit 0; returns their logs."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        outputs = [log.read_text() for log in self.logs]
        for proc, out in zip(self.procs, outputs, strict=True):
            assert proc.returncode == 0, f"exit status {proc.returncode}:\n{out[-3000:]}"
        return outputs

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.procs:
            proc.wait(timeout=30)


def _restore(output_dir: Path, epoch: int) -> dict:
    """A checkpoint's arrays on one local device, whatever topology saved it."""
    import orbax.checkpoint as ocp

    path = (output_dir / run_dir.CHECKPOINT_DIR / str(epoch) / "default").resolve()
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(path)
    metadata = getattr(metadata, "item_metadata", metadata)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata
    )
    return jax.device_get(checkpointer.restore(path, target))


def _survivor_of_a_dead_peer(tmp_path: Path, multi_dir: Path, launches: list) -> str:
    """2 processes x 1 device; process 1 is SIGKILLed in the middle of epoch 2, once process 0's
    progress bar shows a step of it done (so both are past the checkpoint of epoch 1 and in the
    epoch's collectives). Returns process 0's log once it has exited.

    --stop-after-epoch 2 bounds how far a slow kill can get, so a resumed launch always has
    epochs left to train.
    """
    args = [f"--output-dir={multi_dir}", "--stop-after-epoch=2", "--progress"]
    first = Launch(tmp_path, "first", args, 2, 1)
    launches.append(first)
    in_epoch_2 = re.compile(rf"epoch 2/{EPOCHS}:[^\r\n]*?\| *[1-9]\d*/")
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not in_epoch_2.search(first.logs[0].read_text()):
        assert all(p.poll() is None for p in first.procs), first.logs[0].read_text()[-3000:]
        assert time.monotonic() < deadline, f"not in epoch 2 within {LAUNCH_TIMEOUT_S} s"
        time.sleep(0.01)
    survivor, victim = first.procs
    victim.send_signal(signal.SIGKILL)
    # A dead peer fails the survivor's next collective, at the latest when its heartbeats stop.
    survivor.wait(timeout=DISTRIBUTED_TIMEOUT_S + 30)
    log = first.logs[0].read_text()
    assert survivor.returncode == 1, f"exit status {survivor.returncode}:\n{log[-3000:]}"
    return log


def _rows(output_dir: Path) -> list[dict]:
    with open(output_dir / run_dir.METRICS_JSONL) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_processes_killed_and_resumed_match_one_process(tmp_path):
    launches: list[Launch] = []
    single_dir, multi_dir = tmp_path / "single", tmp_path / "multi"
    try:
        # The reference: one process with 2 devices, run straight through.
        single = Launch(tmp_path, "single", [f"--output-dir={single_dir}"], 1, 2)
        launches.append(single)
        single.wait()

        survivor_log = _survivor_of_a_dead_peer(tmp_path, multi_dir, launches)
        resumed = Launch(tmp_path, "resumed", [f"--output-dir={multi_dir}", "--resume"], 2, 1)
        launches.append(resumed)
        main_log, other_log = resumed.wait()
    finally:
        for launch in launches:
            launch.kill()

    errors = re.findall(r"error: [^\r\n]*", survivor_log)  # may follow the progress bar
    assert len(errors) == 1 and "another process stopped" in errors[0], survivor_log[-3000:]
    assert "--resume" in errors[0] and "Traceback" not in survivor_log
    assert "2 device(s), 2 process(es)" in main_log
    assert "Resumed from the checkpoint of epoch" in main_log
    resumed_from = int(main_log.split("Resumed from the checkpoint of epoch ")[1].split()[0])
    assert 1 <= resumed_from < EPOCHS
    # Only process 0 prints (and writes the run's files).
    assert "final test accuracy" in main_log and "final test accuracy" not in other_log

    # Parameters, optimizer state and BatchNorm statistics: equal to float rounding.
    want, got = _restore(single_dir, EPOCHS), _restore(multi_dir, EPOCHS)
    assert jax.tree.structure(want) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    assert int(got["step"]) == int(want["step"])

    # One metrics row per epoch, the same numbers up to rounding; the same summary.
    want_rows, got_rows = _rows(single_dir), _rows(multi_dir)
    assert [r["epoch"] for r in got_rows] == list(range(1, EPOCHS + 1))
    for a, b in zip(want_rows, got_rows, strict=True):
        for key in ("train_loss", "val_loss", "test_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5)
        for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
            assert b[key] == pytest.approx(a[key], abs=1e-2)  # at most a flipped example
    with open(multi_dir / run_dir.SUMMARY_FILE) as f:
        summary = json.load(f)
    assert summary["completed"] and summary["num_devices"] == 2


def test_initialize_gets_the_flags_and_failures_are_messages(monkeypatch):
    calls = []
    real_initialize = jax.distributed.initialize
    monkeypatch.setattr(parallel, "_DISTRIBUTED_INITIALIZED", False)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    parallel.maybe_initialize_distributed(TrainConfig())  # a one-process run
    assert calls == []

    # Unset values go to JAX as None (it detects them); any multi-host flag turns it on.
    parallel.maybe_initialize_distributed(TrainConfig(num_processes=4))
    assert calls == [dict(coordinator_address=None, num_processes=4, process_id=None)]
    # --distributed-timeout bounds the start-up, a dead peer's detection and the shutdown.
    monkeypatch.setattr(parallel, "_DISTRIBUTED_INITIALIZED", False)
    parallel.maybe_initialize_distributed(TrainConfig(num_processes=2, distributed_timeout=7))
    timeouts = dict(
        initialization_timeout=7, heartbeat_timeout_seconds=7, shutdown_timeout_seconds=7
    )
    assert set(timeouts) <= set(inspect.signature(real_initialize).parameters)
    assert calls.pop() == dict(
        coordinator_address=None, num_processes=2, process_id=None, **timeouts
    )
    parallel.maybe_initialize_distributed(TrainConfig(distributed=True))  # once only
    monkeypatch.setattr(parallel, "_DISTRIBUTED_INITIALIZED", False)
    parallel.maybe_initialize_distributed(
        TrainConfig(coordinator_address="node0:1234", num_processes=4, process_id=0)
    )
    assert calls[1:] == [dict(coordinator_address="node0:1234", num_processes=4, process_id=0)]

    def no_cluster(**kwargs):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(parallel, "_DISTRIBUTED_INITIALIZED", False)
    monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
    with pytest.raises(config_lib.ConfigError, match="--coordinator-address HOST:PORT"):
        parallel.maybe_initialize_distributed(TrainConfig(distributed=True))

    with pytest.raises(config_lib.ConfigError, match="--process-id 2 must lie in"):
        config_lib.resolve(TrainConfig(num_processes=2, process_id=2))


@pytest.mark.parametrize(
    "backend, process_count, device_count, wait",
    [
        ("cpu", 1, 1, False),
        ("cpu", 1, 4, True),  # XLA:CPU's in-process collectives
        ("cpu", 2, 4, True),
        ("cpu", 2, 2, False),  # one device per process: gloo only
        ("gpu", 1, 8, False),
        ("gpu", 4, 32, False),
        ("tpu", 1, 8, False),
        ("tpu", 16, 64, False),
    ],
)
def test_only_multi_device_cpu_processes_wait_for_each_step(
    backend, process_count, device_count, wait
):
    assert parallel.needs_step_sync(backend, process_count, device_count) is wait


def test_the_stall_reproducer_runs_with_a_sync_per_step():
    # The synced variant only: queued without syncs, the same steps deadlock on XLA:CPU.
    command = [
        sys.executable,
        "-m",
        "experiments.benchmarks.cpu_collective_stall",
        "--devices=2",
        "--steps=50",
        "--sync-every-step",
        "--timeout=120",
    ]
    result = subprocess.run(
        command, cwd=ROOT, env=_env(2), capture_output=True, text=True, timeout=150
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sync every step: ok" in result.stdout
