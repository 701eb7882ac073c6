"""What the per-step host sync of a multi-device CPU run costs (``parallel.needs_step_sync``).

    python -m experiments.benchmarks.step_sync_cost              # 4 simulated CPU devices
    python -m experiments.benchmarks.step_sync_cost --devices 1 --rounds 5

One process, the training step of ``tests/test_multihost.py`` (StableSAM, the small CNN with 8
features on scikit-learn's digits, batch 32, 38 steps per epoch) compiled once. Each timed unit
is one epoch of steps with the host waiting for the result

* ``every_step``: after each step (what ``trainer.train_epoch`` does on a multi-device CPU);
* ``every_8_steps``: after every 8th step, so at most 8 steps are queued (a full epoch queued
  at once deadlocks XLA:CPU's collectives, see ``cpu_collective_stall.py``; with one device it
  is safe and is measured as ``epoch_end``).

The configurations run round-robin in a random order per round after one warm-up round; the
images/s are of the median epoch. Prints a Markdown table and the machine line.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["JAX_NUM_CPU_DEVICES"] = str(args.devices)  # before JAX starts its backend

    import jax

    from experiments import config as config_lib
    from experiments import runtime, trainer

    config = config_lib.resolve(
        config_lib.TrainConfig(
            dataset="digits",
            model="small_cnn",
            model_kwargs='{"features": [8]}',
            optimizer="stable_sam",
            batch_size=32,
            progress=False,
            output_dir="/tmp/unused",
        )
    )
    experiment = trainer.create_experiment(config, trainer.load_dataset(config))
    train = experiment.splits["train"]
    indices = experiment.epoch_indices(0)
    compiled = experiment.train_step.lower(
        experiment.state, train.images, train.labels, indices
    ).compile()
    num_steps = experiment.steps_per_epoch

    def epoch(state, sync_every: int):
        for i in range(num_steps):
            state, metrics = compiled(state, train.images, train.labels, indices)
            if sync_every and (i + 1) % sync_every == 0:
                jax.block_until_ready(metrics)
        return jax.block_until_ready(state)

    modes = {"every_step": 1, "every_8_steps": 8}
    if args.devices == 1:
        modes["epoch_end"] = 0
    states = {name: jax.tree.map(lambda x: x.copy(), experiment.state) for name in modes}
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    order = random.Random(0)
    for r in range(args.rounds + 1):
        for name in order.sample(list(modes), len(modes)):
            t0 = time.perf_counter()
            states[name] = epoch(states[name], modes[name])
            if r:  # round 0 warms up
                seconds[name].append(time.perf_counter() - t0)
    images = num_steps * config.batch_size
    base = images / statistics.median(seconds["every_step"])
    print(f"{runtime.machine_line()}; load {runtime.load_average()}")
    print(
        f"{args.devices} device(s), {num_steps} steps of {config.batch_size} images per epoch, "
        f"median of {args.rounds} epochs\n"
    )
    print("| host waits | images/s | relative to every step |")
    print("|---|---|---|")
    for name in modes:
        rate = images / statistics.median(seconds[name])
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
