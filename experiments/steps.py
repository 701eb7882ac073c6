"""The pure pieces of a training run: state, preprocessing, loss, train and eval steps, keys.

Each step is one device's view, pure and jittable. With ``axis_name`` it runs inside
``jax.shard_map`` (see :mod:`experiments.parallel`) and reduces over the data-parallel axis.
Randomness is a function of (seed, step), so a resumed run is bit-identical to an uninterrupted
one on the same device count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import sam_optax
from experiments import data

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


def step_key(seed: int, step: jax.Array) -> jax.Array:
    """The PRNG key of a training step: a function of (seed, step) only."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), 0), step)


def init_key(seed: int) -> jax.Array:
    """The PRNG key of the parameter initialization (a stream apart from the steps' keys)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), 1)


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
        images = data.augment(
            key, images_uint8, pad=self.crop_padding, flip=self.flip, cutout=self.cutout
        )
        return data.normalize(images, self.mean, self.std, self.dtype)

    def eval(self, images_uint8: jax.Array) -> jax.Array:
        return data.normalize(images_uint8, self.mean, self.std, self.dtype)


def make_train_step(
    model: Any,
    tx: optax.GradientTransformationExtraArgs,
    preprocess: Preprocess,
    *,
    num_classes: int,
    label_smoothing: float = 0.0,
    axis_name: str | None,
    micro_batch: int = 0,
    first_pass: bool = True,
    select_fraction: float = 1.0,
    gradient: str = "grad_fn",
    objective: Objective | None = None,
) -> Callable[[TrainState, jax.Array, jax.Array, jax.Array], tuple[TrainState, Metrics]]:
    """One device's training step: ``step(state, images_uint8, labels, key) -> (state, metrics)``.

    Pure and jittable. With `axis_name`, it runs inside ``shard_map``/``pmap`` on the device's
    share of the batch and returns replicated outputs. The step hands `tx` each device's own
    gradient and a ``grad_fn`` for the perturbed pass; `tx` averages over `axis_name` (a SAM
    variant after each device's ascent, the SGD baseline before its update: see
    :func:`experiments.optimizers.build_optimizer`) and calls ``grad_fn`` only if it ascends.
    BatchNorm running statistics come from the first,
    unperturbed pass only (the ascent's passes run in train mode with batch statistics but their
    statistics are dropped), averaged over devices. Metrics are averaged over devices.

    `key` drives augmentation and stochastic layers (e.g. ShakeDrop); the perturbed pass sees the
    same augmented batch and the same stochastic masks as the first.

    `micro_batch` = m > 0 (m-sharpness): every m examples of the device's batch ascend from their
    own gradient (``tx.update(None, ..., micro_batches=...)`` of :func:`sam_optax.sam`); the
    loss, accuracy and BatchNorm statistics then come from a forward pass over the whole batch.
    `first_pass=False` (Momentum-SAM, whose one gradient is at the perturbed weights): ``tx``
    gets ``None`` for the gradient, and the metrics come from a forward pass at the weights.
    `select_fraction` < 1 (ESAM's data selection): the perturbed pass differentiates that
    fraction of the batch whose loss rose most (:func:`sam_optax.esam_selected_grad_fn`).
    `gradient="per_example"` (:func:`sam_optax.per_example_sam`): the first pass is
    :func:`sam_optax.per_example.value_and_grad` with groups of `micro_batch` examples (0: the
    device's batch), and `tx` gets its ``sam_grad_fn``. `gradient="objective"`: the step
    differentiates ``objective(loss_fn, step)`` (a loss-level method, e.g. head SAM or a penalty;
    see :func:`head_sam_objective`), and `tx` is the base optimizer alone.
    """

    def per_example_loss_fn(params, batch_stats, images, labels, rngs):
        logits, new_model_state = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=True,
            rngs=rngs,
            mutable=["batch_stats"],
        )
        losses = cross_entropy(logits, labels, num_classes, label_smoothing)
        return losses, (logits, new_model_state.get("batch_stats", {}))

    def loss_fn(params, batch_stats, images, labels, rngs):
        losses, (logits, batch_stats) = per_example_loss_fn(
            params, batch_stats, images, labels, rngs
        )
        return losses.mean(), (logits, batch_stats, losses)

    grad_of_loss = jax.value_and_grad(loss_fn, has_aux=True)

    def per_example_value_and_grad(params, batch_stats, images, labels, rngs):
        group_size = micro_batch or images.shape[0]
        return sam_optax.per_example.value_and_grad(loss_fn, group_size=group_size, has_aux=True)(
            params, batch_stats, images, labels, rngs
        )

    tx = optax.with_extra_args_support(tx)

    def step(state: TrainState, images_uint8, labels, key):
        augment_key, shakedrop_key, dropout_key = jax.random.split(key, 3)
        rngs = {"shakedrop": shakedrop_key, "dropout": dropout_key}
        images = preprocess.train(augment_key, images_uint8)

        def local(params):
            # Inside shard_map, jax.grad of replicated params would sum over devices.
            return params if axis_name is None else sam_optax.per_device(params, axis_name)

        def grad_fn(params, batch_images=images, batch_labels=labels):
            # The pass at the perturbed weights: same batch, same rngs, stats discarded.
            grads, _ = jax.grad(loss_fn, has_aux=True)(
                local(params), state.batch_stats, batch_images, batch_labels, rngs
            )
            return grads

        if gradient == "per_example":
            (loss, (logits, batch_stats, _)), grads, sam_grad_fn = per_example_value_and_grad(
                local(state.params), state.batch_stats, images, labels, rngs
            )
            updates, opt_state = tx.update(
                grads, state.opt_state, state.params, sam_grad_fn=sam_grad_fn
            )
            return finish(state, updates, opt_state, loss, logits, labels, batch_stats)
        if gradient == "objective":
            (_, (loss, (logits, batch_stats, _))), grads = jax.value_and_grad(
                objective(loss_fn, state.step), has_aux=True
            )(local(state.params), state.batch_stats, images, labels, rngs)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            return finish(state, updates, opt_state, loss, logits, labels, batch_stats)
        if micro_batch or not first_pass:
            loss, (logits, batch_stats, _) = loss_fn(
                state.params, state.batch_stats, images, labels, rngs
            )
            grads = None
        else:
            (loss, (logits, batch_stats, losses)), grads = grad_of_loss(
                local(state.params), state.batch_stats, images, labels, rngs
            )
            if select_fraction < 1:

                def selection_loss_fn(params, batch):
                    return per_example_loss_fn(local(params), state.batch_stats, *batch, rngs)[0]

                grad_fn = sam_optax.esam_selected_grad_fn(
                    selection_loss_fn, (images, labels), losses, select_fraction
                )
        updates, opt_state = _update(tx, state, grads, grad_fn, (images, labels), micro_batch)
        return finish(state, updates, opt_state, loss, logits, labels, batch_stats)

    def finish(state, updates, opt_state, loss, logits, labels, batch_stats):
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


Objective = Callable[[Callable, jax.Array], Callable]


def head_sam_objective(rho: Any, last_layers: int) -> Objective:
    """Per-example SAM on the last dense layers in one pass
    (:func:`sam_optax.per_example.sam_loss`), rho a float or a schedule of the step:
    ``objective(loss_fn, step)(params, *args) -> (shifted loss, (loss, aux))``."""

    def objective(loss_fn, step):
        rho_now = rho(step) if callable(rho) else rho
        return sam_optax.per_example.sam_loss(
            loss_fn, rho_now, last_layers=last_layers, has_aux=True
        )

    return objective


def last_layer_penalty_objective(weight_penalty: float, feature_penalty: float) -> Objective:
    """The loss plus :func:`sam_optax.losses.last_layer_l2_penalty` of the model's last
    ``nn.Dense`` (its kernel and its input, found while the model runs)."""

    def objective(loss_fn, step):
        del step

        def penalized(params, *args):
            seen = []

            def record(next_fun, call_args, call_kwargs, context):
                if type(context.module) is nn.Dense and context.method_name == "__call__":
                    inputs = call_args[0] if call_args else call_kwargs["inputs"]
                    seen.append((context.module.variables["params"]["kernel"], inputs))
                return next_fun(*call_args, **call_kwargs)

            with nn.intercept_methods(record):
                loss, aux = loss_fn(params, *args)
            if not seen:
                raise ValueError("the last-layer penalty needs a model with a flax.linen.Dense.")
            kernel, features = seen[-1]
            penalty = sam_optax.losses.last_layer_l2_penalty(
                kernel, features, weight_penalty=weight_penalty, feature_penalty=feature_penalty
            )
            return loss + penalty, (loss, aux)

        return penalized

    return objective


def _update(tx, state: TrainState, grads, grad_fn, batch, micro_batch: int):
    """`tx`'s update from the device's gradient, or with `micro_batch` = m > 0 from each m
    examples' gradient at their own perturbed weights (m-sharpness)."""
    if not micro_batch:
        return tx.update(grads, state.opt_state, state.params, grad_fn=grad_fn)
    micro_batches = jax.tree.map(lambda x: x.reshape(-1, micro_batch, *x.shape[1:]), batch)
    return tx.update(
        None,
        state.opt_state,
        state.params,
        grad_fn=lambda p, micro: grad_fn(p, *micro),
        micro_batches=micro_batches,
    )


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point value in `tree` is finite: one reduction on the devices, so
    checking the parameters costs one scalar transfer."""
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_eval_step(
    model: Any,
    preprocess: Preprocess,
    *,
    num_classes: int,
    axis_name: str | None,
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
