"""AE-SAM: SAM only on the steps whose squared gradient norm is unusually large, as an Optax
gradient transformation in the style of :func:`sam_optax.sam`.

Notation: g = the gradient at w (`updates`), n(v) = v / ||v||_2 (0 for v = 0), g_p = the gradient
at w + eps. Norms are global over the pytree and accumulated in float32 (or the parameters' dtype
if wider).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _ascent, _checks
from sam_optax import _tree as tree
from sam_optax._ascent import SharedArgs
from sam_optax._grad_fn import GradFn
from sam_optax._typing import Schedule, Unpack


class AESAMState(NamedTuple):
    """State of :func:`ae_sam`: the step count, the exponential moving mean and variance of
    ||g||^2 (of the averaged gradient, with `axis_name`) and `ascents`, the number of steps that
    evaluated `grad_fn` (the second passes of the run so far)."""

    count: jax.Array
    mean: jax.Array
    variance: jax.Array
    ascents: jax.Array


def _check_num_steps(num_steps: Any) -> None:
    hint = "E.g. ae_sam(rho=0.05, num_steps=total_training_steps)."
    if num_steps is None:
        raise TypeError(
            "ae_sam needs num_steps, the length of the run over which its threshold rises from "
            f"lambda_1 to lambda_2. {hint}"
        )
    _checks.check_count("num_steps", num_steps, hint=hint)


def threshold_at(count: jax.Array, num_steps: Any, lambda_1: Any, lambda_2: Any) -> jax.Array:
    """c_t = lambda_1 + (lambda_2 - lambda_1) min(t / T, 1), in float32."""
    progress = jnp.minimum(
        jnp.asarray(count, jnp.float32) / jnp.asarray(num_steps, jnp.float32), 1.0
    )
    low = jnp.asarray(lambda_1, jnp.float32)
    return low + (jnp.asarray(lambda_2, jnp.float32) - low) * progress


@_ascent.with_shared_args()
def ae_sam(
    rho: float | jax.Array | Schedule = 0.05,
    *,
    num_steps: int | jax.Array | None = None,
    decay: float | jax.Array = 0.9,
    lambda_1: float | jax.Array = -1.0,
    lambda_2: float | jax.Array = 1.0,
    **shared: Unpack[SharedArgs],
) -> optax.GradientTransformationExtraArgs:
    r"""AE-SAM: SAM on the steps where ||g||^2 is large against its running statistics.

    At step t (the number of earlier `update` calls), with s = ||g||^2, the moving mean and
    variance are updated first and then compared with s:

    .. math::

      \mu_t = \delta \mu_{t-1} + (1 - \delta)\, s, \qquad
      \sigma^2_t = \delta \sigma^2_{t-1} + (1 - \delta) (s - \mu_t)^2, \qquad
      c_t = \lambda_1 + (\lambda_2 - \lambda_1) \min(t / T, 1),

    with mu_(-1) = sigma^2_(-1) = 0 and T = `num_steps`. If s >= mu_t + c_t sigma_t the step is a
    SAM step (output g_p, eps = rho n(g)); otherwise the output is g and `grad_fn` is not
    evaluated at run time (the second pass sits in a `lax.cond`). A large gradient norm marks a
    sharp region, where SAM helps; the rising threshold makes SAM rarer late in training.
    :attr:`AESAMState.ascents` counts the SAM steps, so a run's gradient evaluations are
    ``count + ascents`` (exact, not an estimate). A threshold that always fires
    (lambda_1 = lambda_2 very negative) is SAM; one that never fires is the gradient.

    A step with a non-finite s (a NaN or inf gradient, which the output carries on) leaves mu and
    sigma^2 as they were, so one bad batch does not stop the switch for the rest of the run. With
    a rho schedule, a step whose rho is 0 outputs g and does not count as an ascent. With
    `axis_name`, s comes from the averaged gradient, so every device takes the same branch; g_p
    is averaged, and each device's eps comes from its own gradient unless `sync_ascent`.

    Example:

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda w: jnp.sum(w ** 2 * jnp.arange(1.0, 4.0))
      >>> params = jnp.ones(3)
      >>> tx = optax.chain(sam_optax.ae_sam(rho=0.05, num_steps=5), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> for _ in range(5):
      ...   updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                              grad_fn=jax.grad(loss))
      ...   params = optax.apply_updates(params, updates)
      >>> int(state[0].count), int(state[0].ascents)  # steps, and those with a second pass
      (5, 3)

    Args:
      rho: radius of the ascent, >= 0, or an optax schedule of the step count. Defaults to 0.05.
      num_steps: T, the number of training steps over which c_t rises from lambda_1 to lambda_2
        (an int >= 1; required, since the schedule is tied to the length of the run, e.g. the
        number of epochs times the steps per epoch).
      decay: delta, the decay of the moving mean and variance, in [0, 1). Defaults to 0.9.
      lambda_1: c_0, the threshold at the start, in standard deviations. Defaults to -1.0.
      lambda_2: c_T, the threshold from step T on, >= lambda_1. Defaults to 1.0.
      {shared_args}

    Returns:
      An `optax.GradientTransformationExtraArgs` whose `update` needs `params` and
      `grad_fn(params) -> gradient pytree`, as :func:`sam_optax.sam`. Its state holds mu,
      sigma^2 and the count of ascents.

    References:
      Jiang, Yang, Zhang and Kwok, `An Adaptive Policy to Employ Sharpness-Aware Minimization
      <https://arxiv.org/abs/2304.14647>`_, ICLR 2023. The update order (statistics first,
      then the comparison), the zero initial statistics and the linear threshold schedule follow
      the paper's Algorithm 1; the authors' code was not available to check them against, and
      decay = 0.9, lambda_1 = -1, lambda_2 = 1 are starting points, not verified defaults: tune
      lambda_1 and lambda_2 for the fraction of SAM steps you want (``ascents / count``).
    """
    ascent = _ascent.Ascent("ae_sam", rho, **shared)
    _check_num_steps(num_steps)
    hint = "E.g. ae_sam(rho=0.05, num_steps=T, decay=0.9, lambda_1=-1.0, lambda_2=1.0)."
    _checks.check_real("decay", decay, low=0.0, high=1.0, hint=hint)
    if _checks.concrete_float(decay) == 1.0:
        raise ValueError(f"decay must be < 1 (decay = 1 never updates the statistics). {hint}")
    _checks.check_real("lambda_1", lambda_1, low=-float("inf"), high=float("inf"), hint=hint)
    _checks.check_real("lambda_2", lambda_2, low=-float("inf"), high=float("inf"), hint=hint)
    low, high = _checks.concrete_float(lambda_1), _checks.concrete_float(lambda_2)
    if low is not None and high is not None and high < low:
        raise ValueError(
            f"lambda_2 must be >= lambda_1 (the threshold rises), got lambda_1={lambda_1!r}, "
            f"lambda_2={lambda_2!r}. {hint}"
        )

    def init_fn(params: optax.Params) -> AESAMState:
        del params
        zero = jnp.zeros([], jnp.float32)
        steps = jnp.zeros([], jnp.int32)
        return AESAMState(count=steps, mean=zero, variance=zero, ascents=steps)

    def update(
        updates: optax.Updates, state: AESAMState, params: optax.Params, grad_fn: GradFn
    ) -> tuple[optax.Updates, AESAMState]:
        rho_now = ascent.rho_at(state.count)
        g = ascent.average(updates)
        square = jnp.square(tree.l2_norm(g)).astype(jnp.float32)
        delta = jnp.asarray(decay, jnp.float32)
        mean = delta * state.mean + (1 - delta) * square
        variance = delta * state.variance + (1 - delta) * jnp.square(square - mean)
        finite = jnp.isfinite(square)
        mean = jnp.where(finite, mean, state.mean)
        variance = jnp.where(finite, variance, state.variance)
        c = threshold_at(state.count, num_steps, lambda_1, lambda_2)
        sharp = finite & (square >= mean + c * jnp.sqrt(variance))

        def new_state(ascended):
            return AESAMState(
                count=optax.safe_increment(state.count),
                mean=mean,
                variance=variance,
                ascents=state.ascents + ascended.astype(state.ascents.dtype),
            )

        if ascent.static_rho == 0:
            return g, new_state(jnp.zeros([], bool))
        ascend = sharp if ascent.static_rho is not None else sharp & (jnp.asarray(rho_now) > 0)

        # Only the SAM branch evaluates grad_fn.
        def sam_branch():
            direction = ascent.own_or_synced(g, updates)
            g_p, eps = ascent.sam_gradient(direction, updates, params, grad_fn, rho_now)
            return tree.cast_like(ascent.average(g_p), updates), eps

        def gradient_branch():
            return g, ascent.no_eps(params)

        out, eps = jax.lax.cond(ascend, sam_branch, gradient_branch)
        return ascent.rescale(out, g, params, eps), new_state(ascend)

    return ascent.transformation(init_fn, update)
