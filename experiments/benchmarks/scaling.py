"""Data-parallel scaling of the sharded SAM step on 1, 2, 4, 8 simulated CPU devices.

    python -m experiments.benchmarks.scaling                 # ResNet-18 (16 filters), 16/device
    python -m experiments.benchmarks.scaling --model-kwargs ''   # ResNet-18 at full width
    python -m experiments.benchmarks.scaling --quick

For each device count n (one subprocess each: the number of simulated devices is fixed before JAX
starts, with ``jax.config.update("jax_num_cpu_devices", n)``), the training loop's SAM step
(``trainer.create_experiment``: ``jax.shard_map`` over a 1-D mesh, per-device ascent, uint8 data on
the devices) runs at a fixed per-device batch on n devices, interleaved with the same step on one
device doing the same total work (batch n x per-device). The ratio sharded / one device shows what
sharding adds; the dispatch column is the host time until the call returns.

Simulated devices share the machine's cores (2 here): n devices do not compute n times faster,
so this measures overhead, not speed-up. The one-device step ascends with the whole batch's
gradient while the sharded one ascends per device (m-sharpness): the same FLOPs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax

# Importing these runs no JAX computation, so the worker can still set the device count.
from experiments import parallel, trainer
from experiments.benchmarks import common, timing

RESULT_PREFIX = "SCALING_RESULT "


def worker(args: argparse.Namespace) -> None:
    """Runs in a subprocess that simulates `args.worker` CPU devices; prints one JSON line."""
    # Before any JAX computation: the number of simulated devices is fixed when JAX starts.
    jax.config.update("jax_num_cpu_devices", args.worker)
    if len(jax.devices()) < args.worker:
        raise RuntimeError(f"Asked for {args.worker} CPU devices, JAX sees {jax.devices()}.")

    n = args.worker
    batch = n * args.per_device_batch
    model_kwargs = common.model_kwargs(args.model_kwargs)
    dataset = common.synthetic_dataset(batch * 2, num_test=0, seed=args.seed)
    steps = {}
    for name, devices in ((f"{n} devices", n), ("1 device", 1)):
        config = common.benchmark_config(
            args.model,
            args.optimizer,
            batch_size=batch,
            model_kwargs=model_kwargs,
            num_devices=devices,
        )
        mesh = parallel.create_mesh(devices)
        steps[name] = common.TrainerStep(name, trainer.create_experiment(config, dataset, mesh))
        print(f"[{n} devices] {name}: compiled in {steps[name].compile_s:.1f} s", flush=True)
    samples = timing.interleave_with_args(
        [s.bench() for s in steps.values()],
        args,
        log=lambda line: print(f"[{n} devices]{line}", flush=True),
    )
    sharded, single = (timing.summarize(samples[name]) for name in steps)
    sharded_step, single_step = steps.values()
    row = {
        "devices": n,
        "per_device_batch": args.per_device_batch,
        "global_batch": batch,
        "sharded_median_ms": sharded["median_ms"],
        "one_device_median_ms": single["median_ms"],
        "ratio_wall": sharded["median_ms"] / single["median_ms"],
        "ratio_cpu": sharded["cpu_median_ms"] / single["cpu_median_ms"],
        "sharded_min_ms": sharded["min_ms"],
        "one_device_min_ms": single["min_ms"],
        "sharded_dispatch_ms": sharded["dispatch_median_ms"],
        "one_device_dispatch_ms": single["dispatch_median_ms"],
        "n_samples": sharded["n"],
        "sharded_compile_s": steps[f"{n} devices"].compile_s,
        "one_device_compile_s": steps["1 device"].compile_s,
        "sharded_xla_gflops_per_device": timing.cost(steps[f"{n} devices"].executable)[
            "xla_gflops"
        ],
        "one_device_xla_gflops_per_device": timing.cost(steps["1 device"].executable)["xla_gflops"],
        "load_1min": common.load_average()[0],
    }
    print(RESULT_PREFIX + json.dumps(row), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="1,2,4,8", help="Device counts to simulate.")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument(
        "--model-kwargs",
        default='{"num_filters": 16}',
        help="JSON; the default narrows ResNet-18 to 16 base filters so that 8 x 16 images fit "
        "the time on 2 cores ('' for the full width).",
    )
    parser.add_argument("--optimizer", default="sam")
    parser.add_argument("--per-device-batch", type=int, default=16)
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    common.add_common_arguments(parser, rounds=10, warmup=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.model_kwargs = "small_cnn", common.QUICK_SMALL_CNN
        args.per_device_batch, args.rounds, args.warmup = 2, 3, 1
        if args.devices == "1,2,4,8":
            args.devices = "1,2"
    if args.worker:
        worker(args)
        return

    loads = {"start": common.load_average()}
    rows = []
    for n in common.positive_ints(args.devices, "--devices"):
        command = [sys.executable, "-m", "experiments.benchmarks.scaling", "--worker", str(n)]
        command += [a for a in (argv if argv is not None else sys.argv[1:])]
        if args.quick and "--devices" not in command:
            command += ["--devices", args.devices]
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        process = subprocess.run(command, env=env, capture_output=True, text=True)
        sys.stdout.write(process.stdout)
        if process.returncode:
            sys.stderr.write(process.stderr)
            raise RuntimeError(f"The {n}-device worker failed (exit {process.returncode}).")
        result = [line for line in process.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        rows.append(json.loads(result[-1][len(RESULT_PREFIX) :]))
        loads[f"after {n} devices"] = common.load_average()
    model = args.model + (f" {args.model_kwargs}" if args.model_kwargs else "")
    notes = [
        f"Model {model}, optimizer {args.optimizer}, each device count in its own process; "
        "ratio = sharded step / one device doing the same global batch (medians, interleaved).",
        "Simulated CPU devices share the same cores: the ratio shows overhead, not speed-up.",
        common.NO_GPU_ROWS,
    ]
    common.write_results(
        "scaling",
        args,
        title="Sharded SAM step on simulated CPU devices vs one device, same work",
        tables=[("", rows, list(rows[0]))],
        loads=loads,
        notes=notes,
    )


if __name__ == "__main__":
    main()
