"""VaSSO: the ascent along an exponential moving average of the gradients, as an Optax
gradient transformation in the style of :func:`sam_optax.sam`.

Notation: g = the gradient at w (`updates`), n(v) = v / ||v||_2 (0 for v = 0), g_p = the gradient
at w + eps. Norms and inner products are global over the pytree and accumulated in float32 (or
the parameters' dtype if wider).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _ascent, _checks
from sam_optax import _tree as tree
from sam_optax._ascent import SharedArgs
from sam_optax._grad_fn import GradFn
from sam_optax._typing import Schedule, Unpack


class VaSSOState(NamedTuple):
    """State of :func:`vasso`: the step count and d, the exponential moving average of the
    gradients that sets the ascent direction (of the averaged gradients, with `axis_name`)."""

    count: jax.Array
    d: optax.Updates


@_ascent.with_shared_args()
def vasso(
    rho: float | jax.Array | Schedule = 0.05,
    theta: float | jax.Array = 0.9,
    **shared: Unpack[SharedArgs],
) -> optax.GradientTransformationExtraArgs:
    r"""Variance-suppressed sharpness-aware optimization (VaSSO): the ascent along an EMA.

    At the first step d = g; at the later steps

    .. math::

      d_t = (1 - \theta)\, d_{t-1} + \theta\, g, \qquad
      \epsilon = \rho\, \frac{d_t}{\|d_t\|}, \qquad \text{output } \nabla L(w + \epsilon).

    Averaging the ascent direction over steps suppresses the variance of the stochastic
    gradient's direction. theta = 1 is SAM. Costs two passes per step (one where rho is 0; d is
    updated on every step). The official code divides by ||d|| + 1e-7; here a zero d gives
    eps = 0. A step whose output is not finite (a NaN or inf in g or g_p, which
    `optax.apply_if_finite` then skips) leaves d as it was; complex parameters take the step of
    their (Re, Im) pairs.

    With `axis_name`, the stored d is built from the averaged gradients (the same on every
    device); each device's ascent uses (1 - theta) d_{t-1} + theta g with its own g unless
    `sync_ascent` (the average of those is the stored d).

    Example:

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda w: jnp.sum(w ** 2 * jnp.arange(1.0, 4.0))
      >>> params = jnp.ones(3)
      >>> tx = optax.chain(sam_optax.vasso(rho=0.05, theta=0.9), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                            grad_fn=jax.grad(loss))

    Args:
      rho: radius of the ascent, >= 0, or an optax schedule of the step count. Defaults to 0.05.
      theta: weight of the new gradient in the EMA, in (0, 1]. Defaults to 0.9 (the official
        code's default).
      {shared_args}

    Returns:
      An `optax.GradientTransformationExtraArgs` whose `update` needs `params` and
      `grad_fn(params) -> gradient pytree`, as :func:`sam_optax.sam`. Its state holds d.

    References:
      Li and Giannakis, `Enhancing Sharpness-Aware Optimization Through Variance Suppression
      <https://arxiv.org/abs/2309.15639>`_, NeurIPS 2023 (official code: BingcongLi/VaSSO).
    """
    ascent = _ascent.Ascent("vasso", rho, **shared)
    hint = "E.g. vasso(rho=0.05, theta=0.9) (theta = 1 is SAM)."
    _checks.check_real("theta", theta, low=0.0, high=1.0, hint=hint)
    theta_value = _checks.concrete_float(theta)
    if theta_value == 0:
        raise ValueError(f"theta must be > 0 (theta = 0 never uses the gradient). {hint}")

    def init_fn(params: optax.Params) -> VaSSOState:
        return VaSSOState(count=jnp.zeros([], jnp.int32), d=_ascent.zero_buffers(params))

    def update(
        updates: optax.Updates, state: VaSSOState, params: optax.Params, grad_fn: GradFn
    ) -> tuple[optax.Updates, VaSSOState]:
        rho_now = ascent.rho_at(state.count)
        # The first step: d = g (d_prev is 0 there).
        theta_now = jnp.where(state.count == 0, 1.0, jnp.asarray(theta, jnp.float32))

        def ema(d_prev, x):
            return ((1 - theta_now) * d_prev + theta_now * x).astype(d_prev.dtype)

        g = ascent.average(updates)
        d = jax.tree.map(ema, state.d, g)
        count = optax.safe_increment(state.count)

        def finish(out: optax.Updates) -> tuple[optax.Updates, VaSSOState]:
            # A step whose output is not finite (optax.apply_if_finite skips it) keeps d.
            return out, VaSSOState(count=count, d=tree.where_finite(out, d, state.d))

        if ascent.static_rho == 0:
            return finish(g)
        own = ascent.sync_ascent or ascent.axis_name is None
        direction = d if own else jax.tree.map(ema, state.d, updates)
        g_p, eps = ascent.perturbed_gradient(direction, updates, params, grad_fn, rho_now)
        return finish(ascent.rescale(ascent.average(g_p), g, params, eps))

    return ascent.transformation(init_fn, update)
