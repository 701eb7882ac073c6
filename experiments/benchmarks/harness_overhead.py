"""The training harness's overhead: ``trainer.train_epoch`` (what ``experiments.train`` runs
for each epoch) against the bare compiled step called back to back, in one process.

    python -m experiments.benchmarks.harness_overhead             # the demo and a ResNet-18
    python -m experiments.benchmarks.harness_overhead --settings demo --rounds 20
    python -m experiments.benchmarks.harness_overhead --quick     # smoke run, seconds

For each setting (model, data, batch, optimizer) one ``trainer.create_experiment`` is built and
its train step compiled once. Each timed unit is one epoch of steps:

* ``bare``: the compiled ``experiment.train_step`` called ``steps_per_epoch`` times back to back
  on the epoch's index matrix, ``jax.block_until_ready`` at the end only -- the floor;
* ``harness``: ``trainer.train_epoch`` with the progress bar on (as ``experiments.train`` runs
  by default), metrics collected and the epoch's row computed;
* ``harness_no_bar``: the same with ``--no-progress``.

Each configuration trains its own copy of the state (the step donates it). The units run
round-robin in a random order per round after warm-up; the ratio harness / bare is of the median
images/s (goal: at least 0.95).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax

from experiments import config as config_lib
from experiments import trainer
from experiments.benchmarks import common, timing

GOAL = 0.95

# name -> TrainConfig fields and, for synthetic CIFAR-shaped data, the training-set size.
SETTINGS: dict[str, dict[str, Any]] = {
    # The README's first command: small CNN on the embedded MNIST subset, batch 32, StableSAM.
    "demo": dict(dataset="mnist5k", model="small_cnn", optimizer="stable_sam", batch_size=32),
    # A larger step: a narrow ResNet-18 on random CIFAR-shaped images, batch 128.
    "resnet18": dict(
        dataset="synthetic_cifar",
        model="resnet18",
        model_kwargs='{"num_filters": 8}',
        optimizer="stable_sam",
        batch_size=128,
        train_size=128 * 8,
    ),
    # A step of a few milliseconds, where the host's per-step work shows (as on an accelerator).
    "tiny": dict(
        dataset="mnist5k",
        model="small_cnn",
        model_kwargs=common.QUICK_SMALL_CNN,
        optimizer="stable_sam",
        batch_size=8,
    ),
}
# --quick: the tiny setting on 48 random CIFAR-shaped images (no data set is read).
QUICK_SETTINGS: dict[str, dict[str, Any]] = {
    "quick": dict(SETTINGS["tiny"], dataset="synthetic_cifar", train_size=8 * 6)
}


def build(setting: dict[str, Any], seed: int) -> trainer.Experiment:
    """The experiment of a setting (progress bar on; the config of ``experiments.train``)."""
    fields = dict(setting)
    train_size = fields.pop("train_size", 0)
    synthetic = fields["dataset"] == "synthetic_cifar"
    if synthetic:
        fields["dataset"] = "cifar10"
    config = config_lib.resolve(
        config_lib.TrainConfig(output_dir="/tmp/unused", seed=seed, progress=True, **fields)
    )
    if synthetic:
        dataset = common.synthetic_dataset(train_size, num_test=0, seed=seed)
    else:
        dataset = trainer.load_dataset(config)
    return trainer.create_experiment(config, dataset)


def copy_state(state: Any) -> Any:
    """A fresh copy of the state's buffers (each configuration donates its own)."""
    return jax.tree.map(lambda x: x.copy(), state)


class EpochRunner:
    """One configuration: its own state, advanced by one epoch per call."""

    def __init__(self, name: str, run_epoch: Callable[[Any, int], Any], state: Any):
        self.name, self.run_epoch, self.state, self.epoch = name, run_epoch, state, 0

    def bench(self) -> timing.Bench:
        def epoch():
            self.state = self.run_epoch(self.state, self.epoch)
            self.epoch += 1
            return self.state

        return timing.Bench(self.name, epoch)


def runners(experiment: trainer.Experiment, compiled: Callable) -> list[EpochRunner]:
    """bare, harness (bar on) and harness_no_bar for one experiment and its compiled step."""
    train = experiment.splits["train"]
    num_steps = experiment.steps_per_epoch
    # The bare loop reuses one index matrix: building it is part of what the harness does.
    indices = experiment.epoch_indices(0)

    def bare(state, epoch):
        del epoch
        for _ in range(num_steps):
            state, _ = compiled(state, train.images, train.labels, indices)
        return state  # Bench blocks on it

    def harness(exp: trainer.Experiment) -> Callable[[Any, int], Any]:
        def run(state, epoch):
            state, _, _ = trainer.train_epoch(exp, {"main": compiled}, state, epoch)
            return state

        return run

    no_bar = dataclasses.replace(experiment, config=experiment.config.replace(progress=False))
    return [
        EpochRunner("bare", bare, copy_state(experiment.state)),
        EpochRunner("harness", harness(experiment), copy_state(experiment.state)),
        EpochRunner("harness_no_bar", harness(no_bar), copy_state(experiment.state)),
    ]


def run_setting(
    name: str, setting: dict[str, Any], args: argparse.Namespace
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Times the three configurations of one setting; its result rows and raw samples."""
    experiment = build(setting, args.seed)
    config = experiment.config
    compiled, compile_s = timing.compile_timed(
        experiment.train_step,
        experiment.state,
        experiment.splits["train"].images,
        experiment.splits["train"].labels,
        experiment.epoch_indices(0),
    )
    print(
        f"{name}: {config.model} on {config.dataset} ({experiment.splits['train'].size} images), "
        f"batch {config.batch_size}, {config.optimizer}: {experiment.steps_per_epoch} steps per "
        f"epoch; compiled in {compile_s:.1f} s",
        flush=True,
    )
    benches = [r.bench() for r in runners(experiment, compiled)]
    samples = timing.interleave_with_args(benches, args)
    images = experiment.steps_per_epoch * config.batch_size
    stats = {n: timing.summarize(v) for n, v in samples.items()}
    rate = {n: images / s["median_ms"] * 1e3 for n, s in stats.items()}
    rows = []
    for config_name, s in stats.items():
        ratio = rate[config_name] / rate["bare"]
        rows.append(
            {
                "setting": name,
                "model": config.model,
                "dataset": setting["dataset"],
                "batch": config.batch_size,
                "optimizer": config.optimizer,
                "steps_per_epoch": experiment.steps_per_epoch,
                "config": config_name,
                "n": s["n"],
                "epoch_median_ms": s["median_ms"],
                "epoch_min_ms": s["min_ms"],
                "step_median_ms": s["median_ms"] / experiment.steps_per_epoch,
                "cpu_median_ms": s["cpu_median_ms"],
                "images_per_s": rate[config_name],
                "ratio_to_bare": ratio,
                "ratio_to_bare_cpu": stats["bare"]["cpu_median_ms"] / s["cpu_median_ms"],
                "goal_met": "-" if config_name == "bare" else ("yes" if ratio >= GOAL else "NO"),
                "compile_s": compile_s,
                "load_1min": common.load_average()[0],
            }
        )
    return rows, timing.samples_rows(samples, setting=name)


COLUMNS = [
    "setting",
    "model",
    "batch",
    "optimizer",
    "steps_per_epoch",
    "config",
    "n",
    "epoch_median_ms",
    "step_median_ms",
    "images_per_s",
    "ratio_to_bare",
    "ratio_to_bare_cpu",
    "goal_met",
    "load_1min",
]


def parse_args(argv=None) -> tuple[argparse.Namespace, dict[str, Mapping[str, Any]]]:
    """The command line and the settings it selects."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--settings",
        default="demo,resnet18",
        help=f"Comma-separated, from {sorted(SETTINGS)}; ignored when --model is given.",
    )
    parser.add_argument("--model", default="", help="A custom setting instead of --settings.")
    parser.add_argument("--model-kwargs", default="{}", help="JSON, with --model.")
    parser.add_argument(
        "--dataset", default="mnist5k", help="With --model: a data set or synthetic_cifar."
    )
    parser.add_argument("--batch-size", type=int, default=32, help="With --model.")
    parser.add_argument("--optimizer", default="stable_sam", help="With --model.")
    parser.add_argument(
        "--train-size", type=int, default=0, help="With --model: training images (0: all)."
    )
    common.add_common_arguments(parser, rounds=10, warmup=1)
    args = parser.parse_args(argv)
    if args.quick:
        settings, args.rounds, args.warmup = QUICK_SETTINGS, 3, 1
    elif args.model:
        settings = {
            "custom": dict(
                dataset=args.dataset,
                model=args.model,
                model_kwargs=args.model_kwargs,
                optimizer=args.optimizer,
                batch_size=args.batch_size,
                train_size=args.train_size
                or (args.batch_size * 16 if args.dataset == "synthetic_cifar" else 0),
            )
        }
    else:
        names = args.settings.split(",")
        unknown = sorted(set(names) - set(SETTINGS))
        if unknown:
            parser.error(f"unknown --settings {unknown}; choose from {sorted(SETTINGS)}")
        settings = {n: SETTINGS[n] for n in names}
    return args, settings


def main(argv=None) -> None:
    args, settings = parse_args(argv)
    loads = {"start": common.load_average()}
    rows, raw = [], []
    # The progress bar writes to stderr; keep it off this script's output (it still renders).
    stderr, sys.stderr = sys.stderr, io.StringIO()
    try:
        for name, setting in settings.items():
            setting_rows, setting_samples = run_setting(name, setting, args)
            rows += setting_rows
            raw += setting_samples
            loads[f"after {name}"] = common.load_average()
    finally:
        sys.stderr = stderr

    notes = [
        "One sample = one epoch of training steps. bare: the compiled step back to back, "
        "blocked at the end; harness: trainer.train_epoch (progress bar on, as "
        "experiments.train runs); harness_no_bar: the same with --no-progress. Round-robin in "
        "a random order per round, after warm-up; medians.",
        f"ratio_to_bare = images/s of the row / images/s of bare (goal: at least {GOAL}); "
        "ratio_to_bare_cpu: the same from process CPU time.",
        "The progress bar renders into a buffer (a terminal costs about the same).",
    ]
    common.write_results(
        "harness_overhead",
        args,
        title="Harness overhead: trainer.train_epoch against the bare step",
        tables=[("", rows, COLUMNS)],
        loads=loads,
        notes=notes,
        extra={"samples": raw, "settings": {n: dict(s) for n, s in settings.items()}},
    )


if __name__ == "__main__":
    main()
