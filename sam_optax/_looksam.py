"""LookSAM: the SAM gradient every k steps, reused in between, as an Optax gradient
transformation in the style of :func:`sam_optax.sam`.

Notation: g = the gradient at w (`updates`), n(v) = v / ||v||_2 (0 for v = 0), g_p = the gradient
at w + eps. Norms and inner products are global over the pytree and accumulated in float32 (or
the parameters' dtype if wider).
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


class LookSAMState(NamedTuple):
    """State of :func:`looksam`: the step count and g_v, the component of the last SAM gradient
    orthogonal to the gradient (of the averaged gradients, with `axis_name`)."""

    count: jax.Array
    g_v: optax.Updates


def _orthogonal_part(g_s: optax.Updates, g: optax.Updates, like: optax.Updates) -> optax.Updates:
    """g_v = g_s - <g_s, n(g)> n(g), in the dtypes of `like` (the stored g_v)."""
    c = tree.projection_coefficient(g_s, g)
    return jax.tree.map(
        lambda x, y, old: (x - c.astype(x.dtype) * y).astype(old.dtype), g_s, g, like
    )


def _reused_gradient(g: optax.Updates, g_v: optax.Updates, alpha: Any) -> optax.Updates:
    """g + alpha ||g|| / ||g_v|| g_v (g alone where g_v is 0)."""
    scale = jnp.asarray(alpha, jnp.float32) * tree.safe_divide(tree.l2_norm(g), tree.l2_norm(g_v))
    return tree.axpy(scale, g_v, g)


@_ascent.with_shared_args()
def looksam(
    rho: float | jax.Array | Schedule = 0.05,
    k: int | jax.Array = 5,
    alpha: float | jax.Array = 0.7,
    **shared: Unpack[SharedArgs],
) -> optax.GradientTransformationExtraArgs:
    r"""LookSAM: the SAM gradient every k steps, reused in between at the cost of one pass.

    On steps t with t % k == 0 (t the number of earlier `update` calls), with eps = rho n(g):

    .. math::

      g_s = \nabla L(w + \epsilon), \qquad
      g_v = g_s - \langle g_s, n(g) \rangle\, n(g), \qquad \text{output } g_s,

    and g_v, the part of g_s orthogonal to g, is stored. On the other steps

    .. math::

      \text{output } g + \alpha\, \frac{\|g\|}{\|g_v\|}\, g_v,

    and `grad_fn` is not evaluated at run time (the second pass sits in a `lax.cond`), so the
    average step costs (k + 1) / (2k) of a SAM step. k = 1 is SAM. With a rho schedule, a SAM
    step whose rho is 0 stores g_v = 0 (the following steps output g). A step whose output is not
    finite (which `optax.apply_if_finite` then skips) leaves g_v as it was. Inner products are
    Re sum(conj(x) y), so complex parameters take the step of their (Re, Im) pairs.

    With `axis_name`, g_s and g (hence g_v) are averaged over the axis; each device's eps comes
    from its own gradient unless `sync_ascent`.

    Example:

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda w: jnp.sum(w ** 2 * jnp.arange(1.0, 4.0))
      >>> params = jnp.ones(3)
      >>> tx = optax.chain(sam_optax.looksam(rho=0.05, k=5, alpha=0.7), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...   updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                              grad_fn=jax.grad(loss))
      ...   params = optax.apply_updates(params, updates)

    Args:
      rho: radius of the ascent, >= 0, or an optax schedule of the step count. Defaults to 0.05.
      k: period of the SAM steps, an int >= 1 (an integer array under `inject_hyperparams`,
        which may change it). Defaults to 5 (the paper's main setting).
      alpha: weight of the reused component, >= 0. Defaults to 0.7 (the paper's value).
      {shared_args}

    Returns:
      An `optax.GradientTransformationExtraArgs` whose `update` needs `params` and
      `grad_fn(params) -> gradient pytree`, as :func:`sam_optax.sam`. Its state holds g_v.

    References:
      Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
      <https://arxiv.org/abs/2203.02714>`_, CVPR 2022.
    """
    ascent = _ascent.Ascent("looksam", rho, **shared)
    _checks.check_count("k", k, hint="E.g. looksam(rho=0.05, k=5) (k = 1 is SAM).")
    _checks.check_real(
        "alpha", alpha, low=0.0, high=None, hint="E.g. looksam(rho=0.05, k=5, alpha=0.7)."
    )

    def init_fn(params: optax.Params) -> LookSAMState:
        return LookSAMState(count=jnp.zeros([], jnp.int32), g_v=_ascent.zero_buffers(params))

    def update(
        updates: optax.Updates, state: LookSAMState, params: optax.Params, grad_fn: GradFn
    ) -> tuple[optax.Updates, LookSAMState]:
        rho_now = ascent.rho_at(state.count)
        count = optax.safe_increment(state.count)
        g = ascent.average(updates)
        if ascent.static_rho == 0:
            return g, LookSAMState(count=count, g_v=state.g_v)
        sam_step = state.count % jnp.asarray(k, state.count.dtype) == 0
        g_wide = tree.to_wide(g)

        # Each kind of step computes only its own quantities, inside its branch.
        def sam_branch():
            direction = ascent.own_or_synced(g, updates)
            g_s, eps = ascent.sam_gradient(direction, updates, params, grad_fn, rho_now)
            g_s = tree.to_wide(ascent.average(g_s))
            return tree.cast_like(g_s, updates), _orthogonal_part(g_s, g_wide, state.g_v), eps

        def reuse_branch():
            out = _reused_gradient(g_wide, state.g_v, alpha)
            return tree.cast_like(out, updates), state.g_v, ascent.no_eps(params)

        def no_ascent_branch():  # a SAM step whose rho is 0: output g, store g_v = 0
            return g, jax.tree.map(jnp.zeros_like, state.g_v), ascent.no_eps(params)

        if ascent.static_rho is None:
            index = jnp.where(sam_step, jnp.where(jnp.asarray(rho_now) > 0, 0, 2), 1)
            branches = (sam_branch, reuse_branch, no_ascent_branch)
            out, g_v, eps = jax.lax.switch(index, branches)
        else:
            out, g_v, eps = jax.lax.cond(sam_step, sam_branch, reuse_branch)
        out = ascent.rescale(out, g, params, eps)
        # A step whose output is not finite (optax.apply_if_finite skips it) keeps g_v.
        return out, LookSAMState(count=count, g_v=tree.where_finite(out, g_v, state.g_v))

    return ascent.transformation(init_fn, update)
