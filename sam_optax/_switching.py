"""SAM on some steps only: rho schedules that are 0 where the second pass is skipped.

Every transformation of the package skips its second gradient evaluation at run time on a step
whose rho is 0 (``grad_fn`` is not called there), so a rho schedule that is 0 on most steps is a
cheaper SAM with no new state: periodic SAM (every k-th step), randomized switching (RST), or
SAM late in training (:func:`optax.join_schedules` of 0 and rho). :func:`ascent_steps` counts,
exactly and ahead of time, the steps on which a schedule ascends, hence the gradient
evaluations of a run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["ascent_steps", "periodic_rho_schedule", "randomized_rho_schedule"]


def _as_schedule(value: optax.ScalarOrSchedule) -> optax.Schedule:
    return value if callable(value) else (lambda count: value)


def _check_probability(probability: optax.ScalarOrSchedule) -> None:
    if callable(probability):
        return
    if not 0.0 <= float(probability) <= 1.0:
        raise ValueError(
            f"probability must lie in [0, 1], got {probability!r}, e.g. "
            "sam_optax.randomized_rho_schedule(0.05, probability=0.5)."
        )


def periodic_rho_schedule(
    rho: optax.ScalarOrSchedule, every: int, *, offset: int = 0
) -> optax.Schedule:
    """rho on every `every`-th step (steps ``offset``, ``offset + every``, ...), 0 in between.

    .. math::

      \\rho_t = \\rho(t) \\; [t \\ge \\mathrm{offset},\\ (t - \\mathrm{offset}) \\bmod k = 0],
      \\quad \\text{else } 0

    The simplest cheaper SAM (SAM "every k steps", as MosaicML Composer's ``interval``): a
    fraction 1/k of the steps pay the second pass; the others are plain gradient steps.

    Args:
      rho: the radius on the steps that ascend: a number or an optax schedule of the step.
      every: k >= 1; 1 is SAM on every step.
      offset: the first step that ascends, >= 0 (default 0).

    Returns:
      An optax schedule for the `rho` of any sam_optax transformation.

    Example:
      >>> import optax, sam_optax
      >>> rho = sam_optax.periodic_rho_schedule(0.05, every=5)
      >>> [round(float(rho(t)), 3) for t in range(6)]
      [0.05, 0.0, 0.0, 0.0, 0.0, 0.05]
      >>> tx = optax.chain(sam_optax.sam(rho), optax.sgd(0.1))
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(
            f"every must be an integer >= 1, got {every!r}, e.g. "
            "sam_optax.periodic_rho_schedule(0.05, every=5)."
        )
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an integer >= 0, got {offset!r}.")
    rho_fn = _as_schedule(rho)

    def schedule(count: jax.Array) -> jax.Array:
        ascend = (count >= offset) & ((count - offset) % every == 0)
        return jnp.where(ascend, rho_fn(count), 0.0)

    return schedule


def randomized_rho_schedule(
    rho: optax.ScalarOrSchedule, probability: optax.ScalarOrSchedule, *, seed: int = 0
) -> optax.Schedule:
    """Randomized switching (RST): rho with probability p on each step, 0 otherwise.

    .. math::

      \\rho_t = \\rho(t) \\; [u_t < p(t)], \\quad u_t \\sim \\mathcal{U}[0, 1) \\text{ i.i.d.}

    Zhao et al.'s RST: a Bernoulli trial at each step chooses between SAM and the base
    optimizer, so the expected cost is 1 + p(t) gradient evaluations per step. The draw of step
    t is a function of `seed` and t alone (``jax.random.fold_in``), so a resumed run draws the
    same steps and :func:`ascent_steps` counts them ahead of time; every process and device of a
    data-parallel run draws alike.

    Args:
      rho: the radius on the steps that ascend: a number or an optax schedule of the step.
      probability: p in [0, 1], or a schedule of the step (the paper's scheduling functions,
        e.g. ``optax.linear_schedule(0.0, 1.0, num_steps)``).
      seed: seed of the draws (default 0).

    Returns:
      An optax schedule for the `rho` of any sam_optax transformation.

    Example:
      >>> import optax, sam_optax
      >>> rho = sam_optax.randomized_rho_schedule(0.05, probability=0.5, seed=0)
      >>> tx = optax.chain(sam_optax.sam(rho, stable=True), optax.sgd(0.1))
      >>> 0 < sam_optax.ascent_steps(rho, 1000) < 1000
      True

    References:
      Zhao et al., `Randomized Sharpness-Aware Training for Boosting Computational Efficiency in
      Deep Learning <https://arxiv.org/abs/2203.09962>`_, 2022.
    """
    _check_probability(probability)
    rho_fn, probability_fn = _as_schedule(rho), _as_schedule(probability)
    key = jax.random.key(seed)

    def schedule(count: jax.Array) -> jax.Array:
        draw = jax.random.uniform(jax.random.fold_in(key, count))
        return jnp.where(draw < probability_fn(count), rho_fn(count), 0.0)

    return schedule


def ascent_steps(rho: optax.ScalarOrSchedule, num_steps: int) -> int:
    """How many of the steps ``0 .. num_steps - 1`` ascend (rho > 0): the second passes.

    A run of `num_steps` steps of a sam_optax transformation evaluates ``grad_fn``
    ``ascent_steps(rho, num_steps)`` times (once more per step with ``ascent_steps=k`` > 1 in
    the transformation, k per ascending step), besides the `num_steps` first gradients; its cost
    relative to plain SGD is ``1 + ascent_steps(rho, num_steps) / num_steps``.

    Example:
      >>> import sam_optax
      >>> sam_optax.ascent_steps(sam_optax.periodic_rho_schedule(0.05, every=4), 10)
      3
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be an integer >= 0, got {num_steps!r}.")
    if not callable(rho):
        return num_steps if float(rho) > 0 else 0
    values = jax.jit(jax.vmap(rho))(jnp.arange(num_steps, dtype=jnp.int32))
    return int(np.count_nonzero(np.asarray(values) > 0))
