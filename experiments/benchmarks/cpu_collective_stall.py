"""Reproducer: many data-parallel steps with an all-reduce in flight on XLA:CPU, JAX alone.

    # one process, 4 simulated CPU devices (XLA's in-process collectives):
    python -m experiments.benchmarks.cpu_collective_stall --devices 4 --steps 2000
    # two processes on localhost, 2 devices each (gloo collectives between them):
    python -m experiments.benchmarks.cpu_collective_stall --processes 2 --devices 2 --steps 2000
    # the same with a host sync after every step:
    python -m experiments.benchmarks.cpu_collective_stall --devices 4 --sync-every-step
    # without buffer donation, or with steps that do not depend on each other:
    python -m experiments.benchmarks.cpu_collective_stall --devices 4 --no-donate
    python -m experiments.benchmarks.cpu_collective_stall --devices 4 --independent
    # only on some cores (starve the device threads), and with a short rendezvous timeout:
    taskset -c 0 python -m experiments.benchmarks.cpu_collective_stall --devices 4 \
        --terminate-timeout 5

Each step is a ``jax.shard_map`` over a 1-D mesh: a small matmul per device, then
``lax.pmean`` of the result (what a data-parallel training step's gradient mean does), carried
from step to step like a training state. The host dispatches `--steps` steps without waiting
(or waits after each one, `--sync-every-step`), then checks the result against the same
recursion computed with NumPy. It prints one line per process: steps/s, and ``ok`` or the
failure. A process that does not finish within `--timeout` seconds is reported as stalled and
killed (exit status 124), so the script always ends.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

MODULE = "experiments.benchmarks.cpu_collective_stall"


def _worker(args: argparse.Namespace) -> int:
    flags = [f"--xla_force_host_platform_device_count={args.devices}"]
    if args.terminate_timeout:
        flags += [
            f"--xla_cpu_collective_call_warn_stuck_timeout_seconds={args.terminate_timeout // 2}",
            f"--xla_cpu_collective_call_terminate_timeout_seconds={args.terminate_timeout}",
        ]
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags])
    os.environ["JAX_PLATFORMS"] = "cpu"

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    if args.processes > 1:
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.processes,
            process_id=args.process_id,
        )
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    num_devices = len(jax.devices())
    width = args.width

    def device_step(state, weights):
        # state: [width] replicated; weights: this device's [1, width, width] block.
        local = jnp.tanh(weights[0] @ state)
        return jax.lax.pmean(local, "data")

    step = jax.jit(
        jax.shard_map(device_step, mesh=mesh, in_specs=(P(), P("data")), out_specs=P()),
        donate_argnums=() if args.no_donate or args.independent else (0,),
    )
    rng = np.random.default_rng(0)
    weights_host = rng.normal(size=(num_devices, width, width)).astype(np.float32) / width**0.5
    state_host = rng.normal(size=(width,)).astype(np.float32)
    weights = jax.make_array_from_callback(
        weights_host.shape, NamedSharding(mesh, P("data")), lambda i: weights_host[i]
    )
    state = jax.make_array_from_callback(
        state_host.shape, NamedSharding(mesh, P()), lambda i: state_host[i]
    )
    state = jax.block_until_ready(step(state, weights))  # compile and warm up
    first = state
    steps = args.steps
    t0 = time.perf_counter()
    for _ in range(steps):
        if args.independent:  # every step from the same input: no step waits for another
            step(first, weights)
            continue
        state = step(state, weights)
        if args.sync_every_step:
            jax.block_until_ready(state)
    jax.block_until_ready(step(state, weights) if args.independent else state)
    seconds = time.perf_counter() - t0

    want = state_host
    for _ in range(2 if args.independent else steps + 1):
        want = np.mean(np.tanh(weights_host @ want), axis=0)
    got = np.asarray(state.addressable_shards[0].data)
    ok = np.allclose(got, want, rtol=1e-3, atol=1e-4)
    print(
        f"process {jax.process_index()}: {steps} steps in {seconds:.2f} s "
        f"({steps / seconds:.0f} steps/s), {num_devices} devices, "
        f"{'sync every step' if args.sync_every_step else 'async dispatch'}: "
        f"{'ok' if ok else 'WRONG RESULT'}",
        flush=True,
    )
    return 0 if ok else 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                MODULE,
                *argv,
                "--worker",
                f"--process-id={pid}",
                f"--port={port}",
            ],
        )
        for pid in range(args.processes)
    ]
    deadline = time.monotonic() + args.timeout
    status = 0
    for pid, proc in enumerate(procs):
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            if proc.returncode:
                print(f"process {pid}: exit status {proc.returncode}", flush=True)
                status = status or 1
        except subprocess.TimeoutExpired:
            print(f"process {pid}: STALLED (no result within {args.timeout} s)", flush=True)
            status = 124
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return status


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--devices", type=int, default=4, help="CPU devices per process")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--sync-every-step", action="store_true")
    parser.add_argument("--no-donate", action="store_true", help="keep each step's input state")
    parser.add_argument(
        "--independent", action="store_true", help="every step from the same input (no donation)"
    )
    parser.add_argument(
        "--terminate-timeout",
        type=int,
        default=0,
        help="XLA:CPU's collective rendezvous timeout in seconds (0: XLA's default)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before 'stalled'")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)
    return _launch(args, argv)


if __name__ == "__main__":
    sys.exit(main())
