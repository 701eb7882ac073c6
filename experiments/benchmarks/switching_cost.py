"""Whether SAM on some steps costs what its pass count says: training time against gradient
evaluations, for the rho schedules the host switches and the variants that switch inside the step.

    python -m experiments.benchmarks.switching_cost                  # mlp and small_cnn
    python -m experiments.benchmarks.switching_cost --models mlp --rounds 3

Each method is a training configuration of the harness (:func:`trainer.create_experiment`) on
synthetic 28x28 images, batch 128, 25 epochs of 39 steps. A timed unit is 39 steps, each
running the program of a run step drawn at random (seeded, the same for every method), so that
its mix of steps with and without the ascent is about the run's; the gradient evaluations are
counted over those same steps (AE-SAM's from its state, whose threshold stays near its start
value over the few steps timed). ``every5_in_step`` is SAM
every 5 steps as one program whose rho schedule skips the second pass behind a ``lax.cond``
(what the harness does not do): on XLA:CPU a convolution inside a conditional runs much slower
(https://github.com/jax-ml/jax/issues/12868), which the host switch avoids. The methods run
round-robin; each row is the median unit relative to SGD's, next to the gradient evaluations
per step (AE-SAM's from its state).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import jax

from experiments import config as config_lib
from experiments import optimizer_registry, optimizers, parallel, steps, trainer
from experiments.benchmarks import common, timing

EPOCHS, STEPS_PER_EPOCH, BATCH = 25, 39, 128
# name -> (optimizer, flags, whether the host switches between two programs)
METHODS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "sgd": ("sgd", {}, True),
    "sam": ("sam", {}, True),
    "every5": ("sam", dict(sam_every=5), True),
    "every5_in_step": ("sam", dict(sam_every=5), False),
    "rst20": ("sam", dict(sam_probability=0.2), True),
    "late25": ("sam", dict(sam_last_fraction=0.25), True),
    "looksam5": ("looksam", dict(looksam_k=5), True),
    "ae_sam": ("ae_sam", {}, True),
    "momentum_sam": ("momentum_sam", {}, True),
}
MODELS = {"mlp": '{"hidden": [512, 512]}', "small_cnn": "{}"}


def in_step_schedule(experiment: trainer.Experiment, dataset: Any) -> trainer.Experiment:
    """`experiment` with one program whose rho schedule decides inside the step."""
    config = experiment.config
    tx = optimizers.build_optimizer(config, experiment.steps_per_epoch, axis_name=steps.AXIS)
    step_fn = steps.make_train_step(
        experiment.model,
        tx,
        trainer._preprocess(config, dataset, jax.numpy.float32),
        num_classes=dataset.num_classes,
        axis_name=steps.AXIS,
    )
    program = parallel.shard_train_step(
        step_fn, experiment.mesh, seed=config.seed, steps_per_epoch=experiment.steps_per_epoch
    )
    return dataclasses.replace(experiment, train_step=program, ascends=None)


def method_bench(
    name: str, model: str, dataset: Any, model_kwargs: str
) -> tuple[timing.Bench, Any]:
    """One unit of 39 steps of method `name`, and a function of its pass count per step."""
    optimizer, flags, on_host = METHODS[name]
    config = config_lib.resolve(
        config_lib.TrainConfig(
            dataset="cifar10", model=model, model_kwargs=model_kwargs, optimizer=optimizer,
            batch_size=BATCH, epochs=EPOCHS, validation_size=0, crop_padding=0, flip=False,
            num_devices=1, progress=False, output_dir="unused", **flags,
        )
    )  # fmt: skip
    experiment = trainer.create_experiment(config, dataset)
    if not on_host:
        experiment = in_step_schedule(experiment, dataset)
    train = experiment.splits["train"]
    indices = experiment.epoch_indices(0)
    args = (train.images, train.labels, indices)
    run_steps = sorted(random.Random(0).sample(range(EPOCHS * STEPS_PER_EPOCH), STEPS_PER_EPOCH))
    compiled = {
        program: experiment.train_step_of(program).lower(experiment.state, *args).compile()
        for program in {experiment.program_at(s) for s in run_steps}
    }
    holder = {"state": experiment.state}

    def unit():
        state = holder["state"]
        for s in run_steps:
            state, _ = compiled[experiment.program_at(s)](state, *args)
        holder["state"] = state
        return state

    def passes_per_step() -> float:
        if optimizer == "ae_sam":
            sam_state = jax.device_get(holder["state"].opt_state[0])
            return 1 + int(sam_state.ascents) / int(sam_state.count)
        ascends = optimizers.ascending_steps(config, STEPS_PER_EPOCH)[run_steps]
        evaluations = optimizer_registry.gradient_evaluations(optimizer, ascends, config, None)
        return evaluations / len(ascends)

    return timing.Bench(name, unit), passes_per_step


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    common.add_common_arguments(parser, rounds=5)
    args = parser.parse_args(argv)
    model_kwargs = dict(MODELS)
    if args.quick:  # a tiny MLP, one round: checks that the script runs
        args.models, args.rounds, args.warmup = ["mlp"], 1, 0
        model_kwargs["mlp"] = '{"hidden": [32]}'
    loads = {"start": common.load_average()}
    rows = []
    for model in args.models:
        dataset = common.synthetic_dataset(STEPS_PER_EPOCH * BATCH, image_shape=(28, 28, 1))
        benches, passes = [], {}
        for name in METHODS:
            bench, passes[name] = method_bench(name, model, dataset, model_kwargs[model])
            benches.append(bench)
        samples = timing.interleave_with_args(benches, args)
        base = statistics.median(s.wall_s for s in samples["sgd"])
        for name in METHODS:
            median = statistics.median(s.wall_s for s in samples[name])
            rows.append(
                dict(
                    model=model,
                    method=name,
                    gradients_vs_sgd=passes[name](),
                    time_vs_sgd=median / base,
                    unit_ms=1e3 * median,
                )
            )
        loads[f"after {model}"] = common.load_average()
    common.write_results(
        "switching_cost",
        args,
        title="SAM on some steps: training time against gradient evaluations",
        tables=[("", rows, list(rows[0]))],
        loads=loads,
        notes=[
            "unit_ms: the median of the timed units, each 39 training steps drawn from the run's "
            "schedule; time_vs_sgd: that relative to SGD's; gradients_vs_sgd: the gradient "
            "evaluations per step of those steps.",
            "every5_in_step: the same schedule as every5, decided by a lax.cond inside one "
            "program instead of by the host between two.",
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
