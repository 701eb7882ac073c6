"""A training run: the experiment built from a config, and the loop that trains and evaluates it.

* :func:`create_experiment` -- model, optimizer, replicated initial state, the data on the
  devices and the jitted data-parallel steps, for one resolved
  :class:`~experiments.config.TrainConfig`;
* :func:`evaluate` -- loss and accuracy over a whole split;
* :func:`train_and_evaluate` -- the loop: resolves the config, trains (or resumes), evaluates
  each epoch and hands logging, checkpoints and the summary to :mod:`experiments.run_dir`.

Randomness is a function of (seed, step) and the data order a function of (seed, epoch), so a
resumed run is bit-identical to an uninterrupted one on the same device count.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from experiments import (
    checkpoints,
    data,
    metrics_log,
    models,
    optimizer_registry,
    optimizers,
    parallel,
    run_dir,
    run_summary,
    runtime,
    steps,
)
from experiments import config as config_lib
from experiments.config import TrainConfig
from experiments.parallel import put_global
from experiments.steps import TrainState


@dataclasses.dataclass
class DeviceSplit:
    """One split of the data set on the devices, with its evaluation batches."""

    images: jax.Array
    labels: jax.Array
    size: int
    eval_indices: jax.Array | None = None
    eval_masks: jax.Array | None = None


@dataclasses.dataclass
class Experiment:
    """Everything a run needs for one configuration, built by :func:`create_experiment`."""

    config: TrainConfig
    mesh: Mesh
    model: Any
    tx: optax.GradientTransformationExtraArgs
    state: TrainState
    train_step: Callable  # (state, images, labels, epoch_indices) -> (state, metrics)
    evaluate: Callable  # (state, images, labels, indices, masks) -> sums
    splits: dict[str, DeviceSplit]
    steps_per_epoch: int
    learning_rate: optax.Schedule
    rho: float | optax.Schedule
    num_params: int
    noisy_labels: int = 0  # training labels that label noise changed
    # With a rho schedule (see :func:`_switch_on_host`): whether each step ascends, and the
    # program of the steps that do not (the main one then ascends on every step it runs).
    ascends: np.ndarray | None = None
    train_step_without_ascent: Callable | None = None

    def program_at(self, step: int) -> str:
        """Which train step the global `step` runs: ``"main"`` or ``"without_ascent"``."""
        if self.ascends is not None and not self.ascends[step]:
            return "without_ascent"
        return "main"

    def train_step_of(self, program: str) -> Callable:
        """The train step called `program` (:meth:`program_at`)."""
        return self.train_step if program == "main" else self.train_step_without_ascent

    @property
    def num_devices(self) -> int:
        return int(self.mesh.devices.size)

    def epoch_indices(self, epoch: int) -> jax.Array:
        """The epoch's batch indices on the devices: a function of (seed, epoch) only."""
        indices = data.train_batch_indices(
            self.config.seed, epoch, self.splits["train"].size, self.config.batch_size
        )
        return put_global(indices, parallel.batch_sharded(self.mesh))

    def rho_at(self, step: int) -> float:
        """rho at a step (0 before ``sam_start_epoch`` and for SGD)."""
        if not optimizers.uses_sam(self.config):
            return 0.0
        if callable(self.rho):
            return self.config.rho if float(self.rho(step)) > 0 else 0.0
        return float(self.rho)


@functools.lru_cache(maxsize=16)
def _initial_variables(model: Any, seed: int, image_shape: tuple[int, ...]) -> dict:
    """The model's initial variables as host arrays; cached, so runs that differ only in the
    optimizer (a sweep, the tests) skip the compilation of the initializer."""
    variables = models.init_variables(model, steps.init_key(seed), (1, *image_shape))
    return jax.device_get(variables)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _check_batch_size(
    batch_size: int, num_devices: int, num_train: int, micro_batch: int = 0
) -> None:
    if batch_size % num_devices:
        raise config_lib.ConfigError(
            f"--batch-size {batch_size} does not divide by the {num_devices} devices: "
            f"pass a multiple of {num_devices} (e.g. {_round_up(batch_size, num_devices)})"
            " or use fewer devices with --num-devices."
        )
    per_device = batch_size // num_devices
    if micro_batch and per_device % micro_batch:
        raise config_lib.ConfigError(
            f"--sam-micro-batch {micro_batch} does not divide the {per_device} images per device "
            f"(--batch-size {batch_size} on {num_devices} devices): pass a divisor of {per_device}."
        )
    if batch_size > num_train:
        raise config_lib.ConfigError(
            f"--batch-size {batch_size} exceeds the {num_train} training images."
        )


def _device_splits(
    dataset: data.Dataset, mesh: Mesh, eval_batch_size: int
) -> dict[str, DeviceSplit]:
    """Every split replicated on the devices; val and test with their evaluation batches."""
    num_devices = mesh.devices.size
    rep = parallel.replicated(mesh)
    eval_batch = _round_up(eval_batch_size, num_devices)
    splits = {}
    for name, images, labels in (
        ("train", dataset.train_images, dataset.train_labels),
        ("val", dataset.val_images, dataset.val_labels),
        ("test", dataset.test_images, dataset.test_labels),
    ):
        split = DeviceSplit(
            images=put_global(images, rep),
            labels=put_global(labels.astype(np.int32), rep),
            size=len(labels),
        )
        if name != "train" and split.size:
            indices, masks = parallel.eval_index_arrays(
                split.size, min(eval_batch, _round_up(split.size, num_devices))
            )
            split.eval_indices = put_global(indices, parallel.batch_sharded(mesh))
            split.eval_masks = put_global(masks, parallel.batch_sharded(mesh))
        splits[name] = split
    return splits


def create_experiment(
    config: TrainConfig,
    dataset: data.Dataset,
    mesh: Mesh | None = None,
) -> Experiment:
    """Builds model, optimizer, replicated initial state and the data-parallel steps.

    `config` must be resolved (:func:`experiments.config.resolve`). For a benchmark::

        experiment = create_experiment(config, dataset, parallel.create_mesh())
        train = experiment.splits["train"]
        state, metrics = experiment.train_step(
            experiment.state, train.images, train.labels, experiment.epoch_indices(0))

    The step donates its `state` argument: carry on with the state it returns.
    """
    mesh = mesh if mesh is not None else parallel.create_mesh(config.num_devices)
    _check_batch_size(
        config.batch_size, mesh.devices.size, len(dataset.train_labels), config.sam_micro_batch
    )
    steps_per_epoch = len(dataset.train_labels) // config.batch_size
    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32

    model = models.create_model(
        config.model,
        num_classes=dataset.num_classes,
        dtype=dtype,
        **config_lib.model_kwargs(config.model_kwargs),
    )
    learning_rate = optimizers.learning_rate_schedule(config, steps_per_epoch)
    tx = optimizers.build_optimizer(
        config, steps_per_epoch, axis_name=steps.AXIS, learning_rate=learning_rate
    )
    preprocess = _preprocess(config, dataset, dtype)
    state = _initial_state(model, tx, config.seed, dataset, mesh)
    _check_examples_apart(config, state)

    uses_sam = optimizers.uses_sam(config)

    def sharded_train_step(tx: optax.GradientTransformationExtraArgs) -> Callable:
        step_fn = steps.make_train_step(
            model,
            tx,
            preprocess,
            num_classes=dataset.num_classes,
            label_smoothing=config.label_smoothing,
            axis_name=steps.AXIS,
            micro_batch=config.sam_micro_batch,
            **optimizer_registry.train_step_options(
                config.optimizer, config, optimizers.rho_schedule(config, steps_per_epoch)
            ),
        )
        return parallel.shard_train_step(
            step_fn, mesh, seed=config.seed, steps_per_epoch=steps_per_epoch
        )

    ascends, train_step_without_ascent = None, None
    if _switch_on_host(config):
        ascends = optimizers.ascending_steps(config, steps_per_epoch)
        every_step = config.replace(**config_lib.ASCENT_ON_EVERY_STEP)
        tx = optimizers.build_optimizer(
            every_step, steps_per_epoch, axis_name=steps.AXIS, learning_rate=learning_rate
        )
        tx_without_ascent = optimizers.build_optimizer(
            every_step.replace(rho=0.0),
            steps_per_epoch,
            axis_name=steps.AXIS,
            learning_rate=learning_rate,
        )
        train_step_without_ascent = sharded_train_step(tx_without_ascent)
    eval_fn = steps.make_eval_step(
        model, preprocess, num_classes=dataset.num_classes, axis_name=steps.AXIS
    )
    return Experiment(
        config=config,
        mesh=mesh,
        model=model,
        tx=tx,
        state=state,
        train_step=sharded_train_step(tx),
        evaluate=parallel.shard_evaluate(eval_fn, mesh),
        splits=_device_splits(dataset, mesh, config.eval_batch_size),
        steps_per_epoch=steps_per_epoch,
        learning_rate=learning_rate,
        rho=optimizers.rho_schedule(config, steps_per_epoch) if uses_sam else 0.0,
        num_params=models.count_params(state.params),
        noisy_labels=dataset.noisy_labels,
        ascends=ascends,
        train_step_without_ascent=train_step_without_ascent,
    )


def _preprocess(config: TrainConfig, dataset: data.Dataset, dtype: Any) -> steps.Preprocess:
    return steps.Preprocess(
        mean=tuple(float(m) for m in dataset.mean),
        std=tuple(float(s) for s in dataset.std),
        dtype=dtype,
        crop_padding=config.crop_padding,
        flip=dataset.random_flip if config.flip is None else config.flip,
        cutout=config.cutout,
    )


def _initial_state(
    model: Any,
    tx: optax.GradientTransformationExtraArgs,
    seed: int,
    dataset: data.Dataset,
    mesh: Mesh,
) -> TrainState:
    """The state at step 0, replicated over `mesh`."""
    rep = parallel.replicated(mesh)
    variables = _initial_variables(model, seed, tuple(dataset.train_images.shape[1:]))
    params = jax.tree.map(lambda x: put_global(x, rep), variables["params"])
    return TrainState(
        step=put_global(np.zeros([], np.int32), rep),
        params=params,
        batch_stats=jax.tree.map(lambda x: put_global(x, rep), variables["batch_stats"]),
        opt_state=jax.jit(tx.init, out_shardings=rep)(params),
    )


def _check_examples_apart(config: TrainConfig, state: TrainState) -> None:
    """The per-example ascents need a model whose layers keep the examples apart: BatchNorm in
    training mode mixes them, so the shifted pass would not be each example's own."""
    if not optimizers.uses_sam(config) or not jax.tree.leaves(state.batch_stats):
        return
    if optimizer_registry.get(config.optimizer).gradient != "grad_fn" and config.rho:
        raise config_lib.ConfigError(
            f"--optimizer {config.optimizer} ascends per example and needs a model without "
            f"BatchNorm (--model {config.model} has it): use --model mlp, or --optimizer sam "
            "--sam-micro-batch 1 for the exact per-example ascent of any model."
        )


def _switch_on_host(config: TrainConfig) -> bool:
    """Whether the host picks, step by step, between two compiled programs (the variant at
    constant rho, and at rho = 0: same state, same numbers) rather than one program whose rho
    schedule skips the second pass behind a ``lax.cond``: the schedule is a function of the
    step alone, so the host knows it ahead, and XLA:CPU runs convolutions inside a conditional
    much slower (https://github.com/jax-ml/jax/issues/12868)."""
    if not optimizers.uses_sam(config):
        return False
    if optimizer_registry.get(config.optimizer).gradient == "objective":
        return False  # a loss-level method: one pass whatever rho is
    return callable(optimizers.rho_schedule(config, steps_per_epoch=1))


def evaluate(experiment: Experiment, state: TrainState, name: str) -> dict[str, float]:
    """Loss and accuracy over every example of a split, each counted exactly once."""
    split = experiment.splits[name]
    sums = experiment.evaluate(
        state, split.images, split.labels, split.eval_indices, split.eval_masks
    )
    sums = {k: float(v) for k, v in jax.device_get(sums).items()}
    count = sums["count"]
    if int(round(count)) != split.size:
        raise RuntimeError(f"Evaluated {count} examples of the {split.size} in '{name}'.")
    return {"loss": sums["loss"] / count, "accuracy": sums["correct"] / count, "count": count}


# --------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------


def load_dataset(config: TrainConfig) -> data.Dataset:
    """The data set of `config`; data that cannot be used is a ConfigError (a message)."""
    try:
        return _load_dataset(config)
    except ValueError as e:  # a flag the data set cannot meet, unreadable or invalid files
        raise config_lib.ConfigError(str(e)) from None


def _load_dataset(config: TrainConfig) -> data.Dataset:
    return data.load_dataset(
        config.dataset,
        data_dir=config.data_dir,
        validation_size=config.validation_size,
        split_seed=config.split_seed,
        train_size=config.train_size or None,
        label_noise=config.label_noise,
        label_noise_mode=config.label_noise_mode,
        # The noisy labels belong to the data split, not to the training seed: every seed of a
        # comparison sees the same corrupted labels.
        label_noise_seed=config.split_seed,
    )


def _compile_programs(
    experiment: Experiment, state: TrainState, epoch: int, compiled: dict[str, Callable]
) -> float:
    """Compiles into `compiled` the train steps `epoch` runs that are not there yet, ahead of the
    epoch's steps (so that their time is reported apart); returns the seconds it took."""
    first = epoch * experiment.steps_per_epoch
    needed = {experiment.program_at(s) for s in range(first, first + experiment.steps_per_epoch)}
    train = experiment.splits["train"]
    t0 = time.perf_counter()
    for program in sorted(needed - set(compiled)):
        compiled[program] = (
            experiment.train_step_of(program)
            .lower(state, train.images, train.labels, experiment.epoch_indices(epoch))
            .compile()
        )
        runtime.log(f"Compiled the train step ({program.replace('_', ' ')}).")
    return time.perf_counter() - t0


# Gathers an epoch's per-step metrics into one array each on the devices, so that the host
# fetches two arrays per epoch rather than two scalars per step (7 ms against 0.7 ms for 437
# steps on a CPU).
_stack_metrics = jax.jit(lambda metrics: jax.tree.map(lambda *m: jnp.stack(m), *metrics))


def train_epoch(
    experiment: Experiment, programs: dict[str, Callable], state: TrainState, epoch: int
) -> tuple[TrainState, dict[str, Any], float]:
    """One epoch of steps under a progress bar; the state, the metrics row and the seconds.

    `programs` holds the compiled train step of every :meth:`Experiment.program_at` of the epoch.
    """
    from tqdm.auto import tqdm

    config, num_steps = experiment.config, experiment.steps_per_epoch
    train = experiment.splits["train"]
    epoch_indices = experiment.epoch_indices(epoch)
    bar = tqdm(
        total=num_steps,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        disable=not (config.progress and parallel.is_main_process()),
        leave=False,
        dynamic_ncols=True,
    )
    step_metrics = []
    t0 = time.perf_counter()
    serialize = parallel.needs_step_sync(
        jax.default_backend(), jax.process_count(), experiment.num_devices
    )
    first_step = epoch * num_steps
    for i in range(num_steps):
        step_fn = programs[experiment.program_at(first_step + i)]
        state, metrics = step_fn(state, train.images, train.labels, epoch_indices)
        if serialize:
            jax.block_until_ready(metrics)
        step_metrics.append(metrics)
        bar.update(1)
        if not bar.disable and ((i + 1) % config.log_every_steps == 0 or i + 1 == num_steps):
            # Show the metrics of log_every_steps steps ago: waiting for those leaves the steps
            # dispatched since queued, so the devices never idle for the bar (waiting for the
            # latest step drained the queue at every refresh). Without a bar, no waiting at all.
            done = max(i + 1 - config.log_every_steps, 1)
            latest = jax.device_get(step_metrics[done - 1])
            rate = done * config.batch_size / (time.perf_counter() - t0)
            bar.set_postfix(
                loss=f"{float(latest['loss']):.4f}",
                acc=f"{float(latest['accuracy']):.3f}",
                img_s=f"{rate:.0f}",
            )
    jax.block_until_ready(state)
    seconds = time.perf_counter() - t0
    bar.close()
    fetched = jax.device_get(_stack_metrics(step_metrics))
    row = {
        "epoch": epoch + 1,
        "step": (epoch + 1) * num_steps,
        "learning_rate": float(experiment.learning_rate(first_step)),
        "rho": experiment.rho_at(first_step),
        "train_loss": float(np.mean(fetched["loss"])),
        "train_accuracy": float(np.mean(fetched["accuracy"])),
    }
    return state, row, seconds


def _evaluation_row(experiment: Experiment, state: TrainState) -> dict[str, float]:
    row = {}
    for split in ("val", "test"):
        if experiment.splits[split].size:
            result = evaluate(experiment, state, split)
            row[f"{split}_loss"] = result["loss"]
            row[f"{split}_accuracy"] = result["accuracy"]
    return row


def train_and_evaluate(config: TrainConfig, dataset: data.Dataset | None = None) -> dict[str, Any]:
    """Trains (or resumes) the run described by `config`; returns its summary.

    Resolves `config` and starts the multi-host runtime when asked (both only here). Writes
    ``config.json``, the metrics files, orbax checkpoints and ``summary.json`` to
    ``config.output_dir``, which it locks for the run. Nothing there is created or deleted
    before the data has loaded and the model is built. When the run stops early
    (``stop_after_epoch``), the returned dict has ``completed: False`` and no ``summary.json``
    is written; when it diverges, the summary says ``diverged: True`` with an ``error``
    message. `dataset` skips loading (it must be what ``config`` would load).
    """
    wall_start = time.perf_counter()
    config = config_lib.resolve(config)
    parallel.maybe_initialize_distributed(config)
    with run_dir.OutputDir(config) as output_dir:
        output_dir.check()
        dataset = dataset if dataset is not None else load_dataset(config)
        experiment = create_experiment(config, dataset)
        output_dir.open(experiment.num_devices)  # every check passed: the first write
        runtime.log(
            f"{config.model}: {experiment.num_params:,} parameters | {dataset.describe()} | "
            f"{config.optimizer} "
            f"(rho {experiment.rho_at(experiment.steps_per_epoch * config.epochs)})"
            f" | {experiment.num_devices} device(s), {jax.process_count()} process(es), "
            f"{config.batch_size // experiment.num_devices} images per device per step"
        )
        with checkpoints.checkpoints(config.output_dir, keep=config.keep_checkpoints) as manager:
            return _train(experiment, manager, wall_start)


def train_unless_finished(
    config: TrainConfig,
    dataset: data.Dataset | None = None,
    train_fn: Callable[..., dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], bool]:
    """Trains `config` (resolved) unless its output directory holds it finished; returns the
    summary and whether it trained now.

    The rule of :func:`experiments.run_dir.finished_summary` (a finished run of another
    configuration is refused, naming the fields that differ); an unfinished run continues from
    its last checkpoint. `train_fn` stands in for :func:`train_and_evaluate` (a test's fake).
    """
    summary = run_dir.finished_summary(config)
    if summary is not None:
        return summary, False
    run = config.replace(resume=True, overwrite=False, stop_after_epoch=0)
    train_fn = train_fn or train_and_evaluate
    return dict(train_fn(run) if dataset is None else train_fn(run, dataset)), True


def count_gradient_evaluations(experiment: Experiment, state: TrainState) -> int:
    """The full-batch gradient evaluations of the whole run that ended in `state`, exact: from
    the steps that ascend (the rho schedule) and the variant's final state (for variants whose
    ascent depends on the data)."""
    config = experiment.config
    ascends = optimizers.ascending_steps(config, experiment.steps_per_epoch)
    variant_state = state.opt_state[0] if optimizers.uses_sam(config) else None
    return optimizer_registry.gradient_evaluations(
        config.optimizer, ascends, config, jax.device_get(variant_state)
    )


def _is_finite(row: dict[str, Any], state: TrainState) -> bool:
    """Whether an epoch kept every loss and parameter finite. The row's loss is the mean of the
    steps' losses, so it is finite only if each of them was; the parameters and BatchNorm
    statistics are checked in one reduction on the devices."""
    return math.isfinite(row["train_loss"]) and bool(
        steps.all_finite((state.params, state.batch_stats))
    )


def _train(experiment: Experiment, manager: Any, wall_start: float) -> dict[str, Any]:
    """The epochs of a run in its opened output directory; returns its summary."""
    config = experiment.config
    state, start_epoch = checkpoints.restore_latest(manager, experiment.state, resume=config.resume)
    log = metrics_log.MetricsLog(
        config.output_dir, keep_until_epoch=start_epoch, enabled=parallel.is_main_process()
    )
    compiled: dict[str, Callable] = {}  # Experiment.program_at(step) -> its compiled program
    stop_epoch = config.epochs
    if config.stop_after_epoch and config.stop_after_epoch < config.epochs:
        stop_epoch = max(config.stop_after_epoch, start_epoch)

    diverged_epoch = None
    try:
        for epoch in range(start_epoch, stop_epoch):
            compile_time = _compile_programs(experiment, state, epoch, compiled)
            state, row, seconds = train_epoch(experiment, compiled, state, epoch)
            if not _is_finite(row, state):
                diverged_epoch = epoch + 1  # neither logged nor checkpointed
                break
            if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
                row.update(_evaluation_row(experiment, state))
            row["epoch_time_s"] = seconds
            row["train_images_per_s"] = experiment.steps_per_epoch * config.batch_size / seconds
            row["compile_time_s"] = compile_time
            log.append(row)
            runtime.log(metrics_log.epoch_line(row, config.epochs))
            if (epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == stop_epoch:
                checkpoints.save_checkpoint(manager, epoch + 1, state)
    finally:
        log.close()

    if stop_epoch < config.epochs and diverged_epoch is None:
        runtime.log(
            f"Stopped after epoch {stop_epoch} (--stop-after-epoch). Continue with: "
            f"python -m experiments.train --output-dir {config.output_dir} --resume ..."
        )
        return {"completed": False, "epoch": stop_epoch, "output_dir": config.output_dir}

    summary = run_summary.summarize(
        config,
        log.rows,
        steps_per_epoch=experiment.steps_per_epoch,
        num_params=experiment.num_params,
        num_devices=experiment.num_devices,
        noisy_labels=experiment.noisy_labels,
        wall_time=time.perf_counter() - wall_start,
        resumed_from_epoch=start_epoch,
        gradient_evaluations=None
        if diverged_epoch
        else count_gradient_evaluations(experiment, state),
        diverged_epoch=diverged_epoch,
    )
    if diverged_epoch is not None:
        summary["error"] = run_summary.divergence_message(
            config, diverged_epoch, manager.latest_step()
        )
    run_summary.write_summary(config.output_dir, summary)
    if diverged_epoch is None:
        run_summary.print_summary(summary)
    return summary
