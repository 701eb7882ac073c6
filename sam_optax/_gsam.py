"""GSAM (surrogate gap guided SAM) and its rho schedule tied to the learning rate, as an
Optax gradient transformation in the style of :func:`sam_optax.sam`.

Notation: g = the gradient at w (`updates`), n(v) = v / ||v||_2 (0 for v = 0), g_p = the gradient
at w + eps. Norms and inner products are global over the pytree and accumulated in float32 (or
the parameters' dtype if wider).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _ascent, _checks
from sam_optax import _tree as tree
from sam_optax._ascent import SharedArgs
from sam_optax._grad_fn import GradFn
from sam_optax._typing import Schedule, Unpack


class GSAMState(NamedTuple):
    """State of :func:`gsam`: the number of `update` calls so far (drives rho schedules)."""

    count: jax.Array


@_ascent.with_shared_args()
def gsam(
    rho: float | jax.Array | Schedule = 0.05,
    alpha: float | jax.Array = 0.1,
    *,
    minimize_perturbed: bool = True,
    **shared: Unpack[SharedArgs],
) -> optax.GradientTransformationExtraArgs:
    r"""Surrogate gap guided SAM (GSAM): SAM plus a descent step on the surrogate gap.

    With eps = rho n(g) and g_p the gradient at w + eps:

    .. math::

      g_{\rm GSAM} = g_p - \alpha\, (g - \langle g, n(g_p) \rangle\, n(g_p))
      \quad\text{(minimize\_perturbed)}, \qquad
      g_{\rm GSAM} = g + \alpha\, (g_p - \langle g_p, n(g) \rangle\, n(g)) \quad\text{(otherwise)},

    i.e. the perturbed gradient minus alpha times the component of g orthogonal to it, which
    descends the surrogate gap L(w + eps) - L(w) without changing the descent of L(w + eps).
    alpha = 0 with `minimize_perturbed` is SAM exactly. Costs two passes per step (one where rho
    is 0, as for :func:`sam_optax.sam`). The paper ties rho to the learning rate: see
    :func:`gsam_rho_schedule`. Inner products are Re sum(conj(x) y), so complex parameters take
    the step of their (Re, Im) pairs.

    With `axis_name` the decomposition uses the averaged g and the averaged g_p (the official
    big_vision code decomposes each worker's gradients before averaging).

    Example:

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda w: jnp.sum(w ** 2 * jnp.arange(1.0, 4.0))
      >>> params = jnp.ones(3)
      >>> tx = optax.chain(sam_optax.gsam(rho=0.05, alpha=0.1), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                            grad_fn=jax.grad(loss))
      >>> params = optax.apply_updates(params, updates)

    Args:
      rho: radius of the ascent, >= 0, or an optax schedule of the step count (e.g.
        :func:`gsam_rho_schedule`). Defaults to 0.05.
      alpha: weight of the surrogate-gap step, >= 0. Defaults to 0.1 (the paper searches
        0.01 to 0.3).
      minimize_perturbed: the paper's (and big_vision's default) form, which follows g_p;
        False gives the form that follows g and adds alpha times the part of g_p orthogonal
        to g (big_vision's ``minimize_fp=False``).
      {shared_args}

    Returns:
      An `optax.GradientTransformationExtraArgs` whose `update` needs `params` and
      `grad_fn(params) -> gradient pytree`, as :func:`sam_optax.sam`.

    References:
      Zhuang et al., `Surrogate Gap Guided Sharpness-Aware Minimization
      <https://arxiv.org/abs/2203.08065>`_, ICLR 2022 (official code: google-research/big_vision,
      ``big_vision/trainers/proj/gsam/gsam.py``).
    """
    ascent = _ascent.Ascent("gsam", rho, **shared)
    _checks.check_real("alpha", alpha, low=0.0, high=None, hint="E.g. gsam(rho=0.05, alpha=0.1).")

    def init_fn(params: optax.Params) -> GSAMState:
        del params
        return GSAMState(count=jnp.zeros([], jnp.int32))

    def update(
        updates: optax.Updates, state: GSAMState, params: optax.Params, grad_fn: GradFn
    ) -> tuple[optax.Updates, GSAMState]:
        rho_now = ascent.rho_at(state.count)
        new_state = GSAMState(count=optax.safe_increment(state.count))
        g = ascent.average(updates)
        if ascent.static_rho == 0:
            return g, new_state
        g_p, eps = ascent.perturbed_gradient(
            ascent.own_or_synced(g, updates), updates, params, grad_fn, rho_now
        )
        g_p = tree.to_wide(ascent.average(g_p))
        g_wide = tree.to_wide(g)
        # Where rho is 0 at run time g_p = g and the output is g exactly.
        weight = alpha if ascent.static_rho is not None else jnp.where(rho_now > 0, alpha, 0.0)
        weight = jnp.asarray(weight, jnp.float32)
        if minimize_perturbed:
            # g_p - alpha (g - c g_p) with c = <g, g_p> / ||g_p||^2.
            c = tree.projection_coefficient(g_wide, g_p)
            out = tree.axpby(1 + weight * c, g_p, -weight, g_wide)
        else:
            # g + alpha (g_p - c g) with c = <g_p, g> / ||g||^2.
            c = tree.projection_coefficient(g_p, g_wide)
            out = tree.axpby(1 - weight * c, g_wide, weight, g_p)
        out = ascent.rescale(tree.cast_like(out, updates), g, params, eps)
        return out, new_state

    return ascent.transformation(init_fn, update)


def gsam_rho_schedule(
    learning_rate: float | Schedule,
    rho_max: float,
    rho_min: float = 0.0,
    *,
    lr_max: float,
    lr_min: float = 0.0,
) -> Callable[[jax.typing.ArrayLike], jax.Array]:
    r"""GSAM's rho tied to the learning rate, never below `rho_min`.

    .. math::

      \rho_t = \max\Big(\rho_{\min},\; \rho_{\min} + (\rho_{\max} - \rho_{\min})
      \frac{\eta_t - \eta_{\min}}{\eta_{\max} - \eta_{\min}}\Big)

    with eta_t = `learning_rate(t)`. The paper's formula (and its official code) goes below
    rho_min, even negative, where eta_t < eta_min, e.g. during a linear warm-up from 0 with
    eta_min > 0; here rho stays at rho_min there. With lr_max == lr_min, rho is rho_max.

    Example:

      >>> import optax, sam_optax
      >>> lr = optax.warmup_cosine_decay_schedule(0.0, 0.1, 100, 1000, end_value=0.001)
      >>> rho = sam_optax.gsam_rho_schedule(lr, rho_max=0.1, rho_min=0.01,
      ...                                   lr_max=0.1, lr_min=0.001)
      >>> tx = optax.chain(sam_optax.gsam(rho, alpha=0.1), optax.sgd(lr, momentum=0.9))

    Args:
      learning_rate: the base optimizer's learning rate: a schedule of the step count (the
        same count as the SAM transformation's when both are in one chain) or a constant.
      rho_max: rho at the peak learning rate lr_max, >= rho_min.
      rho_min: rho at lr_min and the floor of the schedule, >= 0. Defaults to 0.
      lr_max: the peak learning rate of the schedule.
      lr_min: the final learning rate of the schedule, <= lr_max. Defaults to 0.

    Returns:
      An optax schedule of the step count.

    References:
      Zhuang et al., `Surrogate Gap Guided Sharpness-Aware Minimization
      <https://arxiv.org/abs/2203.08065>`_, ICLR 2022.
    """
    if not 0 <= rho_min <= rho_max:
        raise ValueError(
            f"gsam_rho_schedule needs 0 <= rho_min <= rho_max, got rho_min={rho_min!r}, "
            f"rho_max={rho_max!r}; e.g. gsam_rho_schedule(lr, rho_max=0.1, rho_min=0.01, "
            "lr_max=0.1, lr_min=0.001)."
        )
    if not lr_max >= lr_min:
        raise ValueError(
            f"gsam_rho_schedule needs lr_max >= lr_min, got lr_max={lr_max!r}, "
            f"lr_min={lr_min!r}; lr_max is the peak of the learning-rate schedule."
        )
    lr_fn = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def schedule(count: jax.typing.ArrayLike) -> jax.Array:
        if lr_max == lr_min:
            return jnp.asarray(rho_max, jnp.float32)
        lr = jnp.asarray(lr_fn(count), jnp.float32)
        rho = rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)
        return jnp.maximum(rho, rho_min)

    return schedule
