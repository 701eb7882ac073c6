"""The optimizer of a run, from its configuration and the variant registry.

``optax.chain(variant(rho schedule), add_decayed_weights(wd), sgd(lr schedule, momentum))``:
the SAM variant (see :mod:`experiments.optimizer_registry`) replaces the gradient, the rest is
the base optimizer every variant shares. Late-phase SAM is a rho schedule (0, then rho).
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax
from experiments import config as config_lib
from experiments import optimizer_registry
from experiments.config import TrainConfig


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


def sam_start_step(config: TrainConfig, steps_per_epoch: int) -> int:
    """The first step of late-phase SAM (0 without ``sam_start_epoch``/``sam_last_fraction``)."""
    total = config.epochs * steps_per_epoch
    if config.sam_last_fraction:
        return total - int(round(config.sam_last_fraction * total))
    return config.sam_start_epoch * steps_per_epoch


def rho_schedule(config: TrainConfig, steps_per_epoch: int) -> float | optax.Schedule:
    """rho, or the schedule that is rho on the steps that ascend and 0 on the others.

    The steps that ascend: from :func:`sam_start_step` on (late-phase SAM), every
    ``sam_every``-th of those (:func:`sam_optax.periodic_rho_schedule`) and each with probability
    ``sam_probability`` (:func:`sam_optax.randomized_rho_schedule`, seeded by the run's seed).
    """
    rho = float(config.rho)
    start = sam_start_step(config, steps_per_epoch)
    if not start and config.sam_every == 1 and config.sam_probability == 1:
        return rho
    schedule: optax.Schedule = lambda count: jnp.where(count >= start, rho, 0.0)  # noqa: E731
    if config.sam_every > 1:
        schedule = sam_optax.periodic_rho_schedule(schedule, config.sam_every, offset=start)
    if config.sam_probability < 1:
        schedule = sam_optax.randomized_rho_schedule(
            schedule, config.sam_probability, seed=config.seed
        )
    return lambda count: jnp.asarray(schedule(count), jnp.float32)


def ascending_steps(config: TrainConfig, steps_per_epoch: int) -> np.ndarray:
    """Whether each step of the run ascends (rho > 0), known ahead of the run."""
    rho = rho_schedule(config, steps_per_epoch) if uses_sam(config) else 0.0
    total = config.epochs * steps_per_epoch
    if not callable(rho):
        return np.full(total, rho > 0)
    return np.asarray(jax.jit(jax.vmap(rho))(jnp.arange(total, dtype=jnp.int32))) > 0


def uses_sam(config: TrainConfig) -> bool:
    """Whether the run has an ascent (every optimizer but the SGD baseline)."""
    return config.optimizer != optimizer_registry.BASELINE


def build_optimizer(
    config: TrainConfig,
    steps_per_epoch: int,
    *,
    axis_name: str | None,
    learning_rate: optax.Schedule | None = None,
) -> optax.GradientTransformationExtraArgs:
    """``chain(variant(...), add_decayed_weights(wd), sgd(schedule, momentum))`` for the config.

    `learning_rate`: the run's schedule where the caller holds it already (built from the config
    otherwise).

    The update takes each device's own gradient. For ``sgd`` the SAM part is left out and, with
    `axis_name`, the gradient is averaged over the axis first (the state stays the chain's).
    For the SAM variants, `axis_name` makes every device ascend with its own gradient and the
    transformation return the SAM gradient averaged over the axis.
    """
    if learning_rate is None:
        learning_rate = learning_rate_schedule(config, steps_per_epoch)
    tail = [
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(
            learning_rate,
            momentum=config.momentum or None,
            nesterov=config.nesterov,
        ),
    ]
    # SGD, and the loss-level methods (their objective's gradient goes to the base optimizer).
    if not uses_sam(config) or optimizer_registry.get(config.optimizer).gradient == "objective":
        return optax.chain(*tail) if axis_name is None else _averaged(optax.chain(*tail), axis_name)
    variant = optimizer_registry.get(config.optimizer)
    options = variant.options(config)
    if config.adaptive:  # --adaptive forces ASAM's scaling onto any variant
        options["adaptive"] = True
    takes = inspect.signature(variant.factory).parameters
    if "num_steps" in takes:  # a schedule over the run (AE-SAM's threshold, SSAM-D's drops)
        options["num_steps"] = config.epochs * steps_per_epoch
    if variant.run_options is not None:
        options.update(variant.run_options(config, steps_per_epoch))
    if "sync_ascent" in takes:
        options["sync_ascent"] = config.sync_ascent and axis_name is not None
    sam = variant.build(rho_schedule(config, steps_per_epoch), axis_name=axis_name, **options)
    return optax.chain(sam, *tail)


def _averaged(
    tx: optax.GradientTransformationExtraArgs, axis_name: str
) -> optax.GradientTransformationExtraArgs:
    """`tx` on the gradient averaged over `axis_name`, with `tx`'s own state (so checkpoints of
    `tx` restore into it)."""

    def update(updates, state, params=None, **extra_args):
        return tx.update(jax.lax.pmean(updates, axis_name), state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(tx.init, update)
