"""Runs every benchmark script, one after the other, each in its own process.

    python -m experiments.benchmarks.run_all                 # the CPU defaults (about an hour)
    python -m experiments.benchmarks.run_all --quick         # every script at a tiny size
    python -m experiments.benchmarks.run_all --only overhead,vs_torch
    python -m experiments.benchmarks.run_all --gpu           # GPU settings: bf16, bigger batches

Results land in ``runs/benchmarks/`` (or ``--out-dir``; ``--out-dir
experiments/benchmarks/results`` refreshes the recorded ones).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

# Each script's arguments on a CPU and on a GPU (None: not run on that kind of machine).
GPU_STEP = ["--dtype", "bfloat16", "--batch-size", "512", "--rounds", "30", "--warmup", "3"]
SCRIPTS: dict[str, dict[str, list[str] | None]] = {
    "overhead": {"cpu": [], "gpu": GPU_STEP},
    "vs_optax_contrib": {"cpu": [], "gpu": GPU_STEP},
    "vs_torch": {"cpu": [], "gpu": GPU_STEP},
    "gpu_throughput": {"cpu": None, "gpu": []},
    "scaling": {"cpu": [], "gpu": None},
    "conv_probe": {"cpu": [], "gpu": None},
    "harness_overhead": {"cpu": [], "gpu": []},
    "switching_cost": {"cpu": [], "gpu": []},
    "per_example": {"cpu": [], "gpu": ["--batch-size", "512", "--rounds", "30", "--warmup", "3"]},
}


def commands(
    *, quick: bool, gpu: bool, only: list[str] | None, out_dir: str | None
) -> list[list[str]]:
    """The command lines to run, in order."""
    result = []
    for name, settings in SCRIPTS.items():
        if only and name not in only:
            continue
        extra = ["--quick"] if quick else settings["gpu" if gpu else "cpu"]
        if extra is None:
            continue
        command = [sys.executable, "-m", f"experiments.benchmarks.{name}", *extra]
        if out_dir:
            command += ["--out-dir", out_dir]
        result.append(command)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Every script with --quick.")
    parser.add_argument("--gpu", action="store_true", help="The GPU settings.")
    parser.add_argument("--only", default="", help=f"Comma-separated subset of {list(SCRIPTS)}.")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--dry-run", action="store_true", help="Print the commands only.")
    args = parser.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SCRIPTS)
    if unknown:
        parser.error(f"unknown scripts {sorted(unknown)}; choose from {list(SCRIPTS)}")
    failed = []
    for command in commands(quick=args.quick, gpu=args.gpu, only=only, out_dir=args.out_dir):
        print("$ python " + " ".join(command[1:]), flush=True)
        if not args.dry_run and subprocess.run(command).returncode:
            failed.append(command[2])
    if failed:
        sys.exit(f"Failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
