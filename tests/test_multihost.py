"""Multi-process training for real, on one machine.

Two processes on localhost, each with 2 simulated CPU devices, talk through
``jax.distributed`` (coordinator on 127.0.0.1, gloo CPU collectives) and train one 4-device data
parallel run of ``python -m experiments.train --distributed``. The run is killed with SIGKILL
right after its first checkpoint (a preemption of every host) and resumed with ``--resume``;
its final checkpoint must match a one-process run on 4 devices.

The match is to float rounding, not bit for bit: the cross-device gradient mean adds the four
device values in another order (one process: ((a + b) + c) + d; two processes: each process
first sums its own devices, then gloo adds the two partial sums), which changes the last bit of
some sums, and training carries those differences on.
"""

from __future__ import annotations

import json
import os
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
# On a heavily loaded 2-core machine, a 2-process CPU run has been seen to stall in its first epoch
# (both processes idle after gloo connected; cause not found yet). Such an attempt is killed and
# the multi-process part starts over in a fresh folder, at most this many times in all.
ATTEMPTS = 2


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


def _killed_and_resumed(tmp_path: Path, multi_dir: Path, launches: list) -> list[str]:
    """2 processes x 2 devices, SIGKILLed as soon as the checkpoint of epoch 1 is committed
    (orbax renames it into place last), then resumed; the logs of the resumed launch.

    --stop-after-epoch 2 bounds how far a slow kill can get, so the resumed launch always has
    epochs left to train. Raises TimeoutError where a launch stalls.
    """
    name = multi_dir.name
    first = Launch(
        tmp_path, f"{name}-first", [f"--output-dir={multi_dir}", "--stop-after-epoch=2"], 2, 2
    )
    launches.append(first)
    checkpoint = multi_dir / run_dir.CHECKPOINT_DIR / "1"
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not checkpoint.is_dir():
        assert all(p.poll() in (None, 0) for p in first.procs), first.logs[0].read_text()
        if time.monotonic() > deadline:
            raise TimeoutError(f"no checkpoint within {LAUNCH_TIMEOUT_S} s")
        time.sleep(0.02)
    first.kill()
    resumed = Launch(tmp_path, f"{name}-resumed", [f"--output-dir={multi_dir}", "--resume"], 2, 2)
    launches.append(resumed)
    try:
        return resumed.wait()
    except subprocess.TimeoutExpired as stalled:
        raise TimeoutError(str(stalled)) from None


def _single_process_reference(tmp_path: Path, launches: list) -> Path:
    """One process on 4 devices, run straight through; its output folder.

    On 2 busy cores, XLA's in-process all-reduce of the 4 simulated devices was once seen to
    abort ("Expected 4 threads to join the rendezvous"); such an attempt starts over once.
    """
    for attempt in range(1, ATTEMPTS + 1):
        single_dir = tmp_path / f"single{attempt}"
        single = Launch(tmp_path, single_dir.name, [f"--output-dir={single_dir}"], 1, 4)
        launches.append(single)
        try:
            single.wait()
            return single_dir
        except subprocess.TimeoutExpired:
            single.kill()
            if attempt == ATTEMPTS:
                raise
        except AssertionError:
            if attempt == ATTEMPTS or "rendezvous" not in single.logs[0].read_text():
                raise
    raise AssertionError("unreachable")


def _rows(output_dir: Path) -> list[dict]:
    with open(output_dir / run_dir.METRICS_JSONL) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_processes_killed_and_resumed_match_one_process(tmp_path):
    launches: list[Launch] = []
    try:
        # The reference: one process with 4 devices, run straight through.
        single_dir = _single_process_reference(tmp_path, launches)

        for attempt in range(1, ATTEMPTS + 1):
            multi_dir = tmp_path / f"multi{attempt}"
            try:
                main_log, other_log = _killed_and_resumed(tmp_path, multi_dir, launches)
                break
            except TimeoutError:
                for launch in launches:
                    launch.kill()
                if attempt == ATTEMPTS:
                    raise
    finally:
        for launch in launches:
            launch.kill()

    assert "4 device(s), 2 process(es)" in main_log
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
    assert summary["completed"] and summary["num_devices"] == 4


def test_initialize_gets_the_flags_and_failures_are_messages(monkeypatch):
    calls = []
    monkeypatch.setattr(parallel, "_DISTRIBUTED_INITIALIZED", False)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    parallel.maybe_initialize_distributed(TrainConfig())  # a one-process run
    assert calls == []

    # Unset values go to JAX as None (it detects them); any multi-host flag turns it on.
    parallel.maybe_initialize_distributed(TrainConfig(num_processes=4))
    assert calls == [dict(coordinator_address=None, num_processes=4, process_id=None)]
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
