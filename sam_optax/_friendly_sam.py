"""Friendly SAM (F-SAM): the ascent along the gradient minus its running mean, as an Optax
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


class FriendlySAMState(NamedTuple):
    """State of :func:`friendly_sam`: the step count and m, the exponential moving average of
    the gradients (of the averaged gradients, with `axis_name`)."""

    count: jax.Array
    m: optax.Updates


@_ascent.with_shared_args()
def friendly_sam(
    rho: float | jax.Array | Schedule = 0.05,
    sigma: float | jax.Array = 1.0,
    lmbda: float | jax.Array = 0.9,
    **shared: Unpack[SharedArgs],
) -> optax.GradientTransformationExtraArgs:
    r"""Friendly SAM (F-SAM): the ascent along the gradient minus its running mean.

    With m an exponential moving average of the gradients: at the first step d = g and m = g;
    at the later steps

    .. math::

      d = g - \sigma\, m_{t-1}, \qquad m_t = \lambda\, m_{t-1} + (1 - \lambda)\, g, \qquad
      \epsilon = \rho\, n(d), \qquad \text{output } \nabla L(w + \epsilon).

    Removing the full-gradient component (estimated by m) keeps the batch-specific part of the
    ascent, which the paper finds to be what helps generalization. sigma = 0 is SAM. Costs two
    passes per step (one where rho is 0; m is updated on every step). A step whose output is not
    finite (a NaN or inf in g or g_p, which `optax.apply_if_finite` then skips) leaves m as it
    was; complex parameters take the step of their (Re, Im) pairs.

    With `axis_name`, m is the average of the averaged gradients (the same on every device);
    each device's d uses its own g unless `sync_ascent`.

    Example:

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda w: jnp.sum(w ** 2 * jnp.arange(1.0, 4.0))
      >>> params = jnp.ones(3)
      >>> tx = optax.chain(sam_optax.friendly_sam(rho=0.05, sigma=1.0, lmbda=0.9),
      ...                  optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                            grad_fn=jax.grad(loss))

    Args:
      rho: radius of the ascent, >= 0, or an optax schedule of the step count. Defaults to 0.05.
      sigma: weight of the mean removed from g, >= 0. Defaults to 1.0 (the official code's).
      lmbda: EMA decay of m, in [0, 1]. Defaults to 0.9 (the official optimizer's default; its
        training script uses 0.95).
      {shared_args}

    Returns:
      An `optax.GradientTransformationExtraArgs` whose `update` needs `params` and
      `grad_fn(params) -> gradient pytree`, as :func:`sam_optax.sam`. Its state holds m.

    References:
      Li et al., `Friendly Sharpness-Aware Minimization <https://arxiv.org/abs/2403.12350>`_,
      CVPR 2024 (official code: nblt/F-SAM).
    """
    ascent = _ascent.Ascent("friendly_sam", rho, **shared)
    hint = "E.g. friendly_sam(rho=0.05, sigma=1.0, lmbda=0.9)."
    _checks.check_real("sigma", sigma, low=0.0, high=None, hint=hint)
    _checks.check_real("lmbda", lmbda, low=0.0, high=1.0, hint=hint)

    def init_fn(params: optax.Params) -> FriendlySAMState:
        return FriendlySAMState(count=jnp.zeros([], jnp.int32), m=_ascent.zero_buffers(params))

    def update(
        updates: optax.Updates, state: FriendlySAMState, params: optax.Params, grad_fn: GradFn
    ) -> tuple[optax.Updates, FriendlySAMState]:
        rho_now = ascent.rho_at(state.count)
        first = state.count == 0
        # The first step: d = g and m = g (m_prev is 0 there).
        sigma_now = jnp.where(first, 0.0, jnp.asarray(sigma, jnp.float32))
        lmbda_now = jnp.where(first, 0.0, jnp.asarray(lmbda, jnp.float32))
        g = ascent.average(updates)
        m = jax.tree.map(
            lambda m_prev, x: (lmbda_now * m_prev + (1 - lmbda_now) * x).astype(m_prev.dtype),
            state.m,
            g,
        )
        count = optax.safe_increment(state.count)

        def finish(out: optax.Updates) -> tuple[optax.Updates, FriendlySAMState]:
            # A step whose output is not finite (optax.apply_if_finite skips it) keeps m.
            return out, FriendlySAMState(count=count, m=tree.where_finite(out, m, state.m))

        if ascent.static_rho == 0:
            return finish(g)
        d = tree.axpy(-sigma_now, state.m, tree.to_wide(ascent.own_or_synced(g, updates)))
        g_p, eps = ascent.perturbed_gradient(d, updates, params, grad_fn, rho_now)
        return finish(ascent.rescale(ascent.average(g_p), g, params, eps))

    return ascent.transformation(init_fn, update)
