"""Data-parallel Flax training with the SAM family of `sam_optax`: the pieces and the loop.

The pieces are small pure functions, in the style of the Flax examples:

* :func:`build_optimizer` -- ``optax.chain(sam_optax.sam(...), add_decayed_weights, sgd)``;
* :func:`make_train_step` -- one device's step ``(state, images_uint8, labels, key) ->
  (state, metrics)``: augmentation, normalization, the two forward-backward passes of SAM, the
  optimizer update, BatchNorm statistics from the first (unperturbed) pass only;
* :func:`make_eval_step` -- one device's masked sums of loss and correct predictions;
* :func:`shard_train_step` / :func:`shard_evaluate` -- wrap those in ``jax.shard_map`` over a
  1-D device mesh (axis ``'data'``) and ``jax.jit``: the uint8 data set lives on the devices,
  every device gathers its share of the global batch from indices, so the host feeds no pixels;
* :func:`setup` -- all of the above for one :class:`~experiments.config.TrainConfig`;
* :func:`train` -- the loop: progress bar, evaluation, metrics files, orbax checkpoints,
  exact resumption, summary.

Randomness is a function of (seed, step) and the data order a function of (seed, epoch), so a
resumed run is bit-identical to an uninterrupted one on the same device count.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax
from experiments import config as config_lib
from experiments import input_pipeline, models
from experiments.config import TrainConfig

AXIS = "data"  # Name of the data-parallel mesh axis.

Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. Replicated on every device; float32 params and opt state.

    Flax's ``TrainState.apply_gradients`` does not forward ``grad_fn`` to the optimizer, so the
    step calls ``tx.update`` itself and this state is a plain container.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


# --------------------------------------------------------------------------------------------
# Devices.
# --------------------------------------------------------------------------------------------

_DISTRIBUTED_INITIALIZED = False


def maybe_initialize_distributed(force: bool = False) -> None:
    """Calls ``jax.distributed.initialize()`` when asked or when the environment sets up a
    multi-process run (``JAX_COORDINATOR_ADDRESS``). Must come before any other JAX call."""
    global _DISTRIBUTED_INITIALIZED
    if _DISTRIBUTED_INITIALIZED:
        return
    if force or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
        _DISTRIBUTED_INITIALIZED = True


def create_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D mesh (axis ``'data'``) over the first `num_devices` devices (0: all of them)."""
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise config_lib.ConfigError(
                f"--num-devices {num_devices} asks for more devices than the {len(devices)} "
                "JAX sees. Pass a smaller number, or 0 for all of them."
            )
        if jax.process_count() > 1 and num_devices != len(devices):
            raise config_lib.ConfigError(
                "A multi-host run uses every device: pass --num-devices 0."
            )
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global jax.Array from a host array that every process holds in full (multi-host safe)."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


# --------------------------------------------------------------------------------------------
# Optimizer.
# --------------------------------------------------------------------------------------------


def learning_rate_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate as a function of the step: cosine (default), constant or multistep."""
    total = config.epochs * steps_per_epoch
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    peak = config.learning_rate
    if config.lr_schedule == "cosine":
        if warmup:
            return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total, warmup + 1))
        return optax.cosine_decay_schedule(peak, max(total, 1))
    if config.lr_schedule == "constant":
        main = optax.constant_schedule(peak)
    elif config.lr_schedule == "multistep":
        boundaries = {m * steps_per_epoch - warmup: 0.1 for m in config_lib.lr_milestones(config)}
        main = optax.piecewise_constant_schedule(peak, boundaries)
    else:
        raise ValueError(f"Unknown --lr-schedule {config.lr_schedule!r}.")
    if warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])
    return main


def rho_schedule(config: TrainConfig, steps_per_epoch: int) -> float | optax.Schedule:
    """rho, or with ``sam_start_epoch`` the schedule 0 (SGD, one pass) then rho (SAM)."""
    if not config.sam_start_epoch:
        return float(config.rho)
    start_step = config.sam_start_epoch * steps_per_epoch
    rho = float(config.rho)
    return lambda count: jnp.where(count >= start_step, rho, 0.0).astype(jnp.float32)


def uses_sam(config: TrainConfig) -> bool:
    return config.optimizer != "sgd"


def build_optimizer(
    config: TrainConfig, steps_per_epoch: int, *, axis_name: str | None = AXIS
) -> optax.GradientTransformationExtraArgs:
    """``chain(sam(...), add_decayed_weights(wd), sgd(schedule, momentum))`` for the config.

    For ``sgd`` the SAM part is left out and the caller averages the gradient over devices. For
    the SAM variants, `axis_name` makes every device ascend with its own gradient and
    the transformation return the SAM gradient averaged over the axis.
    """
    tail = [
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(
            learning_rate_schedule(config, steps_per_epoch),
            momentum=config.momentum or None,
            nesterov=config.nesterov,
        ),
    ]
    if not uses_sam(config):
        return optax.chain(*tail)
    knobs = config_lib.OPTIMIZER_KNOBS[config.optimizer]
    sam = sam_optax.sam(
        rho_schedule(config, steps_per_epoch),
        adaptive=knobs["adaptive"] or config.adaptive,
        eta=config.eta,
        normalize=knobs["normalize"],
        stable=knobs["stable"],
        ascent_norm=config.ascent_norm,
        ascent_steps=config.ascent_steps,
        axis_name=axis_name,
        sync_ascent=config.sync_ascent and axis_name is not None,
    )
    return optax.chain(sam, *tail)


# --------------------------------------------------------------------------------------------
# Steps (one device's view).
# --------------------------------------------------------------------------------------------


def cross_entropy(
    logits: jax.Array, labels: jax.Array, num_classes: int, label_smoothing: float = 0.0
) -> jax.Array:
    """Per-example cross-entropy (float32) with optional label smoothing."""
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """On-device augmentation and normalization of a uint8 batch."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    dtype: Any = jnp.float32
    crop_padding: int = 4
    flip: bool = True
    cutout: int = 0

    def train(self, key: jax.Array, images_uint8: jax.Array) -> jax.Array:
        images = input_pipeline.augment(
            key, images_uint8, pad=self.crop_padding, flip=self.flip, cutout=self.cutout
        )
        return input_pipeline.normalize(images, self.mean, self.std, self.dtype)

    def eval(self, images_uint8: jax.Array) -> jax.Array:
        return input_pipeline.normalize(images_uint8, self.mean, self.std, self.dtype)


def make_train_step(
    model: Any,
    tx: optax.GradientTransformationExtraArgs,
    preprocess: Preprocess,
    *,
    num_classes: int,
    label_smoothing: float = 0.0,
    sam: bool = True,
    axis_name: str | None = AXIS,
) -> Callable[[TrainState, jax.Array, jax.Array, jax.Array], tuple[TrainState, Metrics]]:
    """One device's training step: ``step(state, images_uint8, labels, key) -> (state, metrics)``.

    Pure and jittable. With `axis_name`, it runs inside ``shard_map``/``pmap`` on the device's
    share of the batch and returns replicated outputs: the SAM transformation averages the
    gradient (``sam=True``; each device ascends with its own gradient), or the step averages it
    itself (``sam=False``, plain SGD). BatchNorm running statistics come from the first,
    unperturbed pass only (the ascent's passes run in train mode with batch statistics but their
    statistics are dropped), averaged over devices. Metrics are averaged over devices.

    `key` drives augmentation and stochastic layers (e.g. ShakeDrop); the perturbed pass sees the
    same augmented batch and the same stochastic masks as the first.
    """

    def loss_fn(params, batch_stats, images, labels, rngs):
        logits, new_model_state = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=True,
            rngs=rngs,
            mutable=["batch_stats"],
        )
        loss = cross_entropy(logits, labels, num_classes, label_smoothing).mean()
        return loss, (logits, new_model_state.get("batch_stats", {}))

    grad_of_loss = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, images_uint8, labels, key):
        augment_key, shakedrop_key, dropout_key = jax.random.split(key, 3)
        rngs = {"shakedrop": shakedrop_key, "dropout": dropout_key}
        images = preprocess.train(augment_key, images_uint8)

        def local(params):
            # Inside shard_map, jax.grad of replicated params would sum over devices.
            return params if axis_name is None else sam_optax.per_device(params, axis_name)

        (loss, (logits, batch_stats)), grads = grad_of_loss(
            local(state.params), state.batch_stats, images, labels, rngs
        )
        if sam:

            def grad_fn(params):
                # Second pass at the perturbed weights: same batch, same rngs, stats discarded.
                grads, _ = jax.grad(loss_fn, has_aux=True)(
                    local(params), state.batch_stats, images, labels, rngs
                )
                return grads

            updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_fn=grad_fn)
        else:
            if axis_name is not None:
                grads = jax.lax.pmean(grads, axis_name)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        metrics = {"loss": loss, "accuracy": accuracy}
        if axis_name is not None:
            batch_stats = jax.lax.pmean(batch_stats, axis_name)
            metrics = jax.lax.pmean(metrics, axis_name)
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        return new_state, metrics

    return step


def make_eval_step(
    model: Any,
    preprocess: Preprocess,
    *,
    num_classes: int,
    axis_name: str | None = AXIS,
) -> Callable[[TrainState, jax.Array, jax.Array, jax.Array], Metrics]:
    """One device's evaluation: ``eval_step(state, images_uint8, labels, mask) -> sums``.

    Returns the mask-weighted sums ``loss``, ``correct`` and ``count`` (summed over devices with
    `axis_name`), so padded examples count for nothing and the caller divides at the end.
    """

    def eval_step(state: TrainState, images_uint8, labels, mask):
        logits = model.apply(
            {"params": state.params, "batch_stats": state.batch_stats},
            preprocess.eval(images_uint8),
            train=False,
        )
        loss = cross_entropy(logits, labels, num_classes)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        sums = {
            "loss": jnp.sum(loss * mask),
            "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask),
        }
        return sums if axis_name is None else jax.lax.psum(sums, axis_name)

    return eval_step


# --------------------------------------------------------------------------------------------
# Data-parallel wrappers.
# --------------------------------------------------------------------------------------------


def step_key(seed: int, step: jax.Array) -> jax.Array:
    """The PRNG key of a training step: a function of (seed, step) only."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), 0), step)


def init_key(seed: int) -> jax.Array:
    """The PRNG key of the parameter initialization (a stream apart from the steps' keys)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), 1)


def shard_train_step(
    step_fn: Callable,
    mesh: Mesh,
    *,
    seed: int,
    steps_per_epoch: int,
    donate: bool = True,
) -> Callable[[TrainState, jax.Array, jax.Array, jax.Array], tuple[TrainState, Metrics]]:
    """The jitted data-parallel step ``(state, images, labels, epoch_indices) -> (state, metrics)``.

    `images`/`labels` are the whole uint8 training set, replicated on every device;
    `epoch_indices` is the epoch's ``[steps_per_epoch, global_batch]`` index matrix sharded
    along its batch axis. The step picks row ``state.step % steps_per_epoch``, so the host sends
    nothing per step. Each device gathers its share, draws its key from (seed, step, device) and
    runs `step_fn` (from :func:`make_train_step` with ``axis_name='data'``).
    """

    def per_device(state, images, labels, epoch_indices):
        row = jax.lax.rem(state.step, steps_per_epoch)
        indices = jax.lax.dynamic_index_in_dim(epoch_indices, row, axis=0, keepdims=False)
        key = jax.random.fold_in(step_key(seed, state.step), jax.lax.axis_index(AXIS))
        return step_fn(state, jnp.take(images, indices, axis=0), labels[indices], key)

    sharded = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), P(), P(), P(None, AXIS)),
        out_specs=(P(), P()),
    )
    return jax.jit(sharded, donate_argnums=(0,) if donate else ())


def shard_evaluate(eval_fn: Callable, mesh: Mesh) -> Callable[..., Metrics]:
    """The jitted data-parallel evaluation ``(state, images, labels, indices, masks) -> sums``.

    `indices`/`masks` are ``[num_batches, batch]`` (from ``input_pipeline.eval_batches``),
    sharded along the batch axis; one call scans over all batches on the devices.
    """

    def per_device(state, images, labels, indices, masks):
        def body(totals, batch):
            idx, mask = batch
            sums = eval_fn(state, jnp.take(images, idx, axis=0), labels[idx], mask)
            return jax.tree.map(jnp.add, totals, sums), None

        zeros = {k: jnp.zeros([], jnp.float32) for k in ("loss", "correct", "count")}
        totals, _ = jax.lax.scan(body, zeros, (indices, masks))
        return totals

    sharded = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), P(), P(), P(None, AXIS), P(None, AXIS)),
        out_specs=P(),
    )
    return jax.jit(sharded)


def eval_index_arrays(num_examples: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All evaluation batches stacked: ``[num_batches, batch]`` indices and masks."""
    batches = list(input_pipeline.eval_batches(num_examples, batch_size))
    return np.stack([b[0] for b in batches]), np.stack([b[1] for b in batches])


# --------------------------------------------------------------------------------------------
# Setup.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DeviceSplit:
    """One split of the data set on the devices, with its evaluation batches."""

    images: jax.Array
    labels: jax.Array
    size: int
    eval_indices: jax.Array | None = None
    eval_masks: jax.Array | None = None


@dataclasses.dataclass
class Trainer:
    """Everything :func:`train` needs for one configuration, built by :func:`setup`."""

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

    def epoch_indices(self, epoch: int) -> jax.Array:
        """The epoch's batch indices on the devices: a function of (seed, epoch) only."""
        indices = input_pipeline.train_batch_indices(
            self.config.seed, epoch, self.splits["train"].size, self.config.batch_size
        )
        return put_global(indices, NamedSharding(self.mesh, P(None, AXIS)))

    def rho_at(self, step: int) -> float:
        """rho at a step (0 before ``sam_start_epoch`` and for SGD)."""
        if not uses_sam(self.config):
            return 0.0
        if callable(self.rho):
            return self.config.rho if float(self.rho(step)) > 0 else 0.0
        return float(self.rho)


@functools.lru_cache(maxsize=16)
def _initial_variables(model: Any, seed: int, image_shape: tuple[int, ...]) -> dict:
    """The model's initial variables as host arrays; cached, so runs that differ only in the
    optimizer (a sweep, the tests) skip the compilation of the initializer."""
    variables = models.init_variables(model, init_key(seed), (1, *image_shape))
    return jax.device_get(variables)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def setup(
    config: TrainConfig,
    dataset: input_pipeline.Dataset,
    mesh: Mesh | None = None,
) -> Trainer:
    """Builds model, optimizer, replicated initial state and the data-parallel steps.

    `config` must be resolved (:func:`experiments.config.resolve`). For a benchmark::

        trainer = setup(config, dataset, create_mesh())
        step = trainer.train_step
        images, labels = trainer.splits["train"].images, trainer.splits["train"].labels
        state, metrics = step(trainer.state, images, labels, trainer.epoch_indices(0))

    The step donates its `state` argument: carry on with the state it returns.
    """
    mesh = mesh if mesh is not None else create_mesh(config.num_devices)
    num_devices = mesh.devices.size
    if config.batch_size % num_devices:
        raise config_lib.ConfigError(
            f"--batch-size {config.batch_size} does not divide by the {num_devices} devices: "
            f"pass a multiple of {num_devices} (e.g. {_round_up(config.batch_size, num_devices)})"
            " or use fewer devices with --num-devices."
        )
    num_train = len(dataset.train_labels)
    if config.batch_size > num_train:
        raise config_lib.ConfigError(
            f"--batch-size {config.batch_size} exceeds the {num_train} training images."
        )
    steps_per_epoch = num_train // config.batch_size
    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32

    model = models.create_model(
        config.model,
        num_classes=dataset.num_classes,
        dtype=dtype,
        **config_lib.model_kwargs(config),
    )
    tx = build_optimizer(config, steps_per_epoch)
    preprocess = Preprocess(
        mean=tuple(float(m) for m in dataset.mean),
        std=tuple(float(s) for s in dataset.std),
        dtype=dtype,
        crop_padding=config.crop_padding,
        flip=dataset.random_flip if config.flip is None else config.flip,
        cutout=config.cutout,
    )

    rep = replicated(mesh)
    variables = _initial_variables(model, config.seed, tuple(dataset.train_images.shape[1:]))
    params = jax.tree.map(lambda x: put_global(x, rep), variables["params"])
    state = TrainState(
        step=put_global(np.zeros([], np.int32), rep),
        params=params,
        batch_stats=jax.tree.map(lambda x: put_global(x, rep), variables["batch_stats"]),
        opt_state=jax.jit(tx.init, out_shardings=rep)(params),
    )

    step_fn = make_train_step(
        model,
        tx,
        preprocess,
        num_classes=dataset.num_classes,
        label_smoothing=config.label_smoothing,
        sam=uses_sam(config),
    )
    eval_fn = make_eval_step(model, preprocess, num_classes=dataset.num_classes)

    eval_batch = _round_up(config.eval_batch_size, num_devices)
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
            indices, masks = eval_index_arrays(
                split.size, min(eval_batch, _round_up(split.size, num_devices))
            )
            sharding = NamedSharding(mesh, P(None, AXIS))
            split.eval_indices = put_global(indices, sharding)
            split.eval_masks = put_global(masks, sharding)
        splits[name] = split

    return Trainer(
        config=config,
        mesh=mesh,
        model=model,
        tx=tx,
        state=state,
        train_step=shard_train_step(
            step_fn, mesh, seed=config.seed, steps_per_epoch=steps_per_epoch
        ),
        evaluate=shard_evaluate(eval_fn, mesh),
        splits=splits,
        steps_per_epoch=steps_per_epoch,
        learning_rate=learning_rate_schedule(config, steps_per_epoch),
        rho=rho_schedule(config, steps_per_epoch) if uses_sam(config) else 0.0,
        num_params=models.count_params(state.params),
    )


def evaluate_split(trainer: Trainer, state: TrainState, name: str) -> dict[str, float]:
    """Loss and accuracy over every example of a split, each counted exactly once."""
    split = trainer.splits[name]
    sums = trainer.evaluate(state, split.images, split.labels, split.eval_indices, split.eval_masks)
    sums = {k: float(v) for k, v in jax.device_get(sums).items()}
    count = sums["count"]
    if int(round(count)) != split.size:
        raise RuntimeError(f"Evaluated {count} examples of the {split.size} in '{name}'.")
    return {"loss": sums["loss"] / count, "accuracy": sums["correct"] / count, "count": count}


# --------------------------------------------------------------------------------------------
# Output directory, metrics files, checkpoints.
# --------------------------------------------------------------------------------------------

CONFIG_FILE = "config.json"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"


def _is_main_process() -> bool:
    return jax.process_index() == 0


def prepare_output_dir(config: TrainConfig) -> None:
    """Refuses to reuse a non-empty output dir unless ``resume`` or ``overwrite`` says so.

    With ``overwrite`` the directory is emptied; with ``resume`` its saved config must match
    `config` in every field that changes the numbers.
    """
    path = config.output_dir
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"--output-dir {path!r} exists and is not a directory.")
    non_empty = os.path.isdir(path) and any(os.scandir(path))
    if non_empty and not (config.resume or config.overwrite):
        raise FileExistsError(
            f"Output directory {path!r} is not empty (it holds an earlier run). Pass --resume to "
            "continue that run from its last checkpoint, --overwrite to delete it and start "
            "afresh, or choose another --output-dir."
        )
    if non_empty and config.overwrite and _is_main_process():
        shutil.rmtree(path)
    if non_empty and config.resume:
        _check_resumable(config)
    if _is_main_process():
        os.makedirs(path, exist_ok=True)
    _sync("prepare_output_dir")


def _check_resumable(config: TrainConfig) -> None:
    saved_path = os.path.join(config.output_dir, CONFIG_FILE)
    if not os.path.exists(saved_path):
        return
    with open(saved_path) as f:
        saved = json.load(f)
    current = config.to_dict()
    differences = [
        f"{name}: saved {saved.get(name)!r}, now {current[name]!r}"
        for name in current
        if name not in config_lib.RESUME_INDEPENDENT_FIELDS and saved.get(name) != current[name]
    ]
    if differences:
        raise config_lib.ConfigError(
            f"--resume: the run in {config.output_dir!r} was started with a different "
            "configuration, so it cannot continue exactly:\n  "
            + "\n  ".join(differences)
            + "\nPass the same flags as the original run, or --overwrite to start afresh."
        )


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class MetricsLog:
    """Per-epoch rows appended to ``metrics.jsonl``, mirrored in ``metrics.csv`` (and
    TensorBoard when ``tensorboardX`` is installed). Only the main process writes.

    On resume, rows of epochs after the restored checkpoint are dropped (the run died between
    writing them and checkpointing), so the files always match the checkpointed state.
    """

    def __init__(self, output_dir: str, *, keep_until_epoch: int, enabled: bool = True):
        self.output_dir = output_dir
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        jsonl = os.path.join(output_dir, METRICS_JSONL)
        if keep_until_epoch > 0 and os.path.exists(jsonl):
            with open(jsonl) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            self.rows = [r for r in rows if r.get("epoch", 0) <= keep_until_epoch]
        if enabled:
            self._rewrite()
        self._tensorboard = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter  # optional

                self._tensorboard = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError:
                pass

    def _rewrite(self) -> None:
        with open(os.path.join(self.output_dir, METRICS_JSONL), "w") as f:
            for row in self.rows:
                f.write(json.dumps(row) + "\n")
        self._write_csv()

    def _write_csv(self) -> None:
        columns: list[str] = []
        for row in self.rows:
            columns += [k for k in row if k not in columns]
        with open(os.path.join(self.output_dir, METRICS_CSV), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        with open(os.path.join(self.output_dir, METRICS_JSONL), "a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_csv()
        if self._tensorboard is not None:
            for key, value in row.items():
                if key not in ("epoch", "step") and isinstance(value, int | float):
                    self._tensorboard.add_scalar(key, value, row["step"])
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def checkpoint_manager(config: TrainConfig):
    """An orbax ``CheckpointManager`` in ``<output_dir>/checkpoints`` keeping the last N.

    Checkpoints are written atomically (to a temporary directory, then renamed), so a run killed
    mid-save resumes from the previous one. The step number of a checkpoint is the epoch.
    """
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints,
        create=True,
        # Leftovers of a save that a kill interrupted (never read as checkpoints) are removed.
        cleanup_tmp_directories=True,
    )
    directory = os.path.abspath(os.path.join(config.output_dir, CHECKPOINT_DIR))
    return ocp.CheckpointManager(directory, options=options)


def save_checkpoint(manager, epoch: int, state: TrainState) -> None:
    import orbax.checkpoint as ocp

    # The save copies the arrays to host memory before it returns (then writes in the
    # background), so the next step may donate the state's buffers.
    manager.save(epoch, args=ocp.args.StandardSave(state))


def restore_checkpoint(manager, epoch: int, like: TrainState) -> TrainState:
    """Restores the state saved at `epoch` with the shapes, dtypes and shardings of `like`."""
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like
    )
    return manager.restore(epoch, args=ocp.args.StandardRestore(abstract))


# --------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------


def _print(*args: Any) -> None:
    if _is_main_process():
        from tqdm.auto import tqdm

        tqdm.write(" ".join(str(a) for a in args), file=sys.stdout)


def _fmt_pct(value: float | None) -> str:
    return "   -  " if value is None else f"{100 * value:6.2f}%"


def train(config: TrainConfig, *, dataset: input_pipeline.Dataset | None = None) -> dict[str, Any]:
    """Trains (or resumes) the run described by `config`; returns its summary.

    Writes ``config.json``, ``metrics.jsonl``/``metrics.csv``, orbax checkpoints and
    ``summary.json`` to ``config.output_dir``. When the run stops early (``stop_after_epoch``),
    the returned dict has ``completed: False`` and no ``summary.json`` is written.
    `dataset` skips loading (it must be what ``config`` would load).
    """
    from tqdm.auto import tqdm

    config = config_lib.resolve(config)
    maybe_initialize_distributed(config.distributed)
    wall_start = time.perf_counter()
    prepare_output_dir(config)
    is_main = _is_main_process()

    if dataset is None:
        dataset = input_pipeline.load_dataset(
            config.dataset,
            data_dir=config.data_dir,
            validation_size=config.validation_size,
            split_seed=config.split_seed,
        )
    trainer = setup(config, dataset)
    num_devices = trainer.mesh.devices.size
    _print(
        f"{config.model}: {trainer.num_params:,} parameters | {dataset!r} | {config.optimizer} "
        f"(rho {trainer.rho_at(trainer.steps_per_epoch * config.epochs)}) | "
        f"{num_devices} device(s), {jax.process_count()} process(es), "
        f"{config.batch_size // num_devices} images per device per step"
    )

    manager = checkpoint_manager(config)
    state = trainer.state
    start_epoch = 0
    latest = manager.latest_step() if config.resume else None
    if latest is not None:
        state = restore_checkpoint(manager, latest, like=state)
        start_epoch = int(latest)
        _print(f"Resumed from the checkpoint of epoch {start_epoch} in {config.output_dir}.")
    elif config.resume:
        _print(f"--resume: no checkpoint in {config.output_dir}; starting from scratch.")
    log = MetricsLog(config.output_dir, keep_until_epoch=start_epoch, enabled=is_main)
    if is_main:
        with open(os.path.join(config.output_dir, CONFIG_FILE), "w") as f:
            f.write(config.to_json())

    train_split = trainer.splits["train"]
    steps = trainer.steps_per_epoch
    images_per_epoch = steps * config.batch_size
    compile_time = 0.0
    step_fn = trainer.train_step
    if start_epoch < config.epochs:
        t0 = time.perf_counter()
        step_fn = trainer.train_step.lower(
            state, train_split.images, train_split.labels, trainer.epoch_indices(start_epoch)
        ).compile()
        compile_time = time.perf_counter() - t0
        _print(f"Compiled the train step in {compile_time:.1f} s.")

    stop_epoch = config.epochs
    if config.stop_after_epoch and config.stop_after_epoch < config.epochs:
        stop_epoch = max(config.stop_after_epoch, start_epoch)

    try:
        for epoch in range(start_epoch, stop_epoch):
            epoch_indices = trainer.epoch_indices(epoch)
            bar = tqdm(
                total=steps,
                desc=f"epoch {epoch + 1}/{config.epochs}",
                disable=not (config.progress and is_main),
                leave=False,
                dynamic_ncols=True,
            )
            step_metrics = []
            t0 = time.perf_counter()
            for i in range(steps):
                state, metrics = step_fn(
                    state, train_split.images, train_split.labels, epoch_indices
                )
                step_metrics.append(metrics)
                bar.update(1)
                if (i + 1) % config.log_every_steps == 0 or i + 1 == steps:
                    latest_metrics = jax.device_get(metrics)
                    rate = (i + 1) * config.batch_size / (time.perf_counter() - t0)
                    bar.set_postfix(
                        loss=f"{float(latest_metrics['loss']):.4f}",
                        acc=f"{float(latest_metrics['accuracy']):.3f}",
                        img_s=f"{rate:.0f}",
                    )
            jax.block_until_ready(state)
            epoch_time = time.perf_counter() - t0
            bar.close()
            fetched = jax.device_get(step_metrics)
            row: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": (epoch + 1) * steps,
                "learning_rate": float(trainer.learning_rate(epoch * steps)),
                "rho": trainer.rho_at(epoch * steps),
                "train_loss": float(np.mean([m["loss"] for m in fetched])),
                "train_accuracy": float(np.mean([m["accuracy"] for m in fetched])),
            }
            if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
                for split in ("val", "test"):
                    if trainer.splits[split].size:
                        result = evaluate_split(trainer, state, split)
                        row[f"{split}_loss"] = result["loss"]
                        row[f"{split}_accuracy"] = result["accuracy"]
            row["epoch_time_s"] = epoch_time
            row["train_images_per_s"] = images_per_epoch / epoch_time
            row["compile_time_s"] = compile_time if epoch == start_epoch else 0.0
            log.append(row)
            _print(
                f"epoch {epoch + 1:>3}/{config.epochs}  loss {row['train_loss']:.4f}  "
                f"train {_fmt_pct(row['train_accuracy'])}  "
                f"val {_fmt_pct(row.get('val_accuracy'))}  "
                f"test {_fmt_pct(row.get('test_accuracy'))}  "
                f"lr {row['learning_rate']:.4g}  {row['train_images_per_s']:,.0f} img/s"
            )
            last = epoch + 1 == stop_epoch
            if (epoch + 1) % config.checkpoint_every == 0 or last:
                save_checkpoint(manager, epoch + 1, state)
        manager.wait_until_finished()
    finally:
        manager.close()
        log.close()

    if stop_epoch < config.epochs:
        _print(
            f"Stopped after epoch {stop_epoch} (--stop-after-epoch). Continue with: "
            f"python -m experiments.train --output-dir {config.output_dir} --resume ..."
        )
        return {"completed": False, "epoch": stop_epoch, "output_dir": config.output_dir}

    summary = summarize(config, log.rows, trainer, wall_time=time.perf_counter() - wall_start)
    if is_main:
        with open(os.path.join(config.output_dir, SUMMARY_FILE), "w") as f:
            json.dump(summary, f, indent=2)
    print_summary(summary)
    return summary


def summarize(
    config: TrainConfig,
    rows: Sequence[Mapping[str, Any]],
    trainer: Trainer,
    *,
    wall_time: float,
) -> dict[str, Any]:
    """The run's summary from its per-epoch rows (which span resumed sessions too)."""
    val_rows = [r for r in rows if "val_accuracy" in r]
    test_rows = [r for r in rows if "test_accuracy" in r]
    best = max(val_rows, key=lambda r: r["val_accuracy"]) if val_rows else None
    train_time = sum(r["epoch_time_s"] for r in rows)
    trained_images = len(rows) * trainer.steps_per_epoch * config.batch_size
    summary = {
        "completed": True,
        "name": config_lib.run_name(config),
        "output_dir": config.output_dir,
        "dataset": config.dataset,
        "model": config.model,
        "optimizer": config.optimizer,
        "rho": config.rho if uses_sam(config) else 0.0,
        "learning_rate": config.learning_rate,
        "weight_decay": config.weight_decay,
        "seed": config.seed,
        "epochs": config.epochs,
        "steps": config.epochs * trainer.steps_per_epoch,
        "num_params": trainer.num_params,
        "num_devices": int(trainer.mesh.devices.size),
        "best_val_accuracy": best["val_accuracy"] if best else None,
        "best_val_epoch": best["epoch"] if best else None,
        "final_val_accuracy": val_rows[-1]["val_accuracy"] if val_rows else None,
        "final_test_accuracy": test_rows[-1]["test_accuracy"] if test_rows else None,
        "final_test_loss": test_rows[-1]["test_loss"] if test_rows else None,
        "final_train_loss": rows[-1]["train_loss"] if rows else None,
        "final_train_accuracy": rows[-1]["train_accuracy"] if rows else None,
        "train_time_s": train_time,
        "compile_time_s": sum(r.get("compile_time_s", 0.0) for r in rows),
        "images_per_s": trained_images / train_time if train_time else None,
        "wall_time_s": wall_time,
    }
    return summary


def print_summary(summary: Mapping[str, Any]) -> None:
    def pct(key):
        value = summary.get(key)
        return "-" if value is None else f"{100 * value:.2f}%"

    rate = summary.get("images_per_s")
    _print(
        "\n".join(
            [
                f"== {summary['name']} ({summary['output_dir']}) ==",
                f"  parameters           {summary['num_params']:,}",
                f"  best val accuracy    {pct('best_val_accuracy')}"
                f" (epoch {summary.get('best_val_epoch')})",
                f"  final val accuracy   {pct('final_val_accuracy')}",
                f"  final test accuracy  {pct('final_test_accuracy')}",
                f"  training time        {summary['train_time_s']:.1f} s"
                f" (+ {summary['compile_time_s']:.1f} s compiling,"
                f" {summary['wall_time_s']:.1f} s wall)",
                f"  throughput           {'-' if rate is None else f'{rate:,.0f}'} images/s"
                f" on {summary['num_devices']} device(s)",
            ]
        )
    )
