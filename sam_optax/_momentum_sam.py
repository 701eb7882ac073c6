"""Momentum-SAM: the ascent along the momentum, one gradient evaluation per step, as an Optax
gradient transformation in the style of :func:`sam_optax.sam`.

Notation: n(v) = v / ||v||_2 (0 for v = 0), g_p = the gradient at w + eps. Norms are global over
the pytree and accumulated in float32 (or the parameters' dtype if wider).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _ascent, _checks
from sam_optax import _tree as tree
from sam_optax._ascent import OnePassArgs
from sam_optax._grad_fn import GradFn
from sam_optax._typing import Schedule, Unpack

STABLE_NEEDS_UPDATES = (
    "sam_optax.momentum_sam(stable=True) rescales to the norm of the gradient at w, which "
    "momentum_sam does not compute: pass it as updates, tx.update(grads, state, params, "
    "grad_fn=grad_fn) (one more pass per step), or drop stable=True and call "
    "tx.update(None, state, params, grad_fn=grad_fn)."
)


class MomentumSAMState(NamedTuple):
    """State of :func:`momentum_sam`: the step count and v, the momentum of the gradients this
    transformation returned (of the averaged gradients, with `axis_name`)."""

    count: jax.Array
    momentum: optax.Updates


@_ascent.with_shared_args(_ascent.OnePassArgs)
def momentum_sam(
    rho: float | jax.Array | Schedule = 0.3,
    momentum: float | jax.Array = 0.9,
    **shared: Unpack[OnePassArgs],
) -> optax.GradientTransformationExtraArgs:
    r"""Momentum-SAM (MSAM): the gradient at w perturbed against the momentum, in one pass.

    With v the momentum of the gradients returned so far (v = 0 at the first step):

    .. math::

      \epsilon = -\rho\, n(v), \qquad g_p = \nabla L(w + \epsilon), \qquad
      v \leftarrow \mu v + g_p, \qquad \text{output } g_p.

    The perturbation points along the coming descent step -v (the official code evaluates the
    gradient at w - rho v / ||v||), so no gradient at w is needed: `update` evaluates `grad_fn`
    exactly once per step, the cost of the base optimizer. The first step (v = 0) and steps
    whose rho is 0 evaluate the gradient at w. rho = 0 is the gradient.

    A pre-transformation cannot read the base optimizer's momentum buffer, so the state keeps
    its own, with the base optimizer's coefficient `momentum` (mu; no dampening, as
    `optax.sgd(lr, momentum=mu)` and PyTorch's SGD): pass the same mu to both. The official
    code's buffer also holds the weight decay (its SGD adds wd w to the gradient before the
    momentum); v here holds this transformation's outputs only, so to reproduce it put the L2
    term in the loss that `grad_fn` differentiates (a decay added later in the chain is not in
    v). With `adaptive`, eps = -rho T n(T v), T = |w| + eta.

    Call ``tx.update(None, state, params, grad_fn=grad_fn)``: the gradient at w is not needed.
    If `updates` is given (the gradient at w, already paid for), the steps whose eps is 0 (the
    first, or rho = 0) return it without evaluating `grad_fn`, and `stable` rescales the output
    to its norm. `stable=True` needs `updates` (a TypeError says so otherwise).

    With `axis_name`, g_p is averaged over the axis, so v and eps are the same on every device.
    A step whose output is not finite (which `optax.apply_if_finite` then skips) leaves v as it
    was; complex parameters take the step of their (Re, Im) pairs.

    In a chain, momentum_sam goes first, as :func:`sam_optax.sam`, but unlike the other variants
    it does not check that: its g_p is taken a step down from w, which past a minimum (a large
    rho near one) points against the gradient at w, just as g_p points against a descent step
    that a transformation in front would pass as `updates`; the two cases are mirror images
    (every vector negated), so no comparison of `updates`, v and g_p tells them apart.

    Example:

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda w: jnp.sum(w ** 2 * jnp.arange(1.0, 4.0))
      >>> params = jnp.ones(3)
      >>> tx = optax.chain(sam_optax.momentum_sam(rho=0.3, momentum=0.9),
      ...                  optax.sgd(0.1, momentum=0.9))
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...   updates, state = tx.update(None, state, params, grad_fn=jax.grad(loss))
      ...   params = optax.apply_updates(params, updates)

    Args:
      rho: radius of the ascent, >= 0, or an optax schedule of the step count. Defaults to 0.3
        (the official optimizer's default; its CIFAR-100 WRN-16-4 configuration uses 3, with
        SGD at learning rate 0.5): MSAM's best radius is larger than SAM's.
      momentum: mu, the base optimizer's momentum coefficient, in [0, 1). Defaults to 0.9.
      adaptive: scale the ascent by T = |w| + eta (ASAM).
      eta: the offset of ASAM's T; ignored unless `adaptive`. Defaults to 0.01.
      stable: renormalize the output to the norm of `updates` (StableSAM); needs `updates`.
      stable_max_scale: with `stable`, cap the factor at this value (None: no cap).
      stable_norm: with `stable`, "plain" or "adaptive", as in :func:`sam_optax.sam`.
      axis_name: inside `jax.shard_map`/`jax.pmap`, the data-parallel axis; `grad_fn`'s output is
        each device's own gradient, averaged here.
      perturb_mask: pytree of booleans (or a function of the params returning one) marking the
        parameters to perturb, as in :func:`sam_optax.sam`.

    Returns:
      An `optax.GradientTransformationExtraArgs` whose `update(updates_or_None, state, params,
      *, grad_fn)` needs `params` and `grad_fn(params) -> gradient pytree`. Its state holds v.

    References:
      Becker, Altrock and Franke, `Momentum-SAM: Sharpness Aware Minimization without
      Computational Overhead <https://arxiv.org/abs/2401.12033>`_, 2024 (official code:
      MarlonBecker/MSAM, `optimizer/msam.py`).
    """
    # No chain-order check: see "In a chain" in the docstring.
    ascent = _ascent.Ascent("momentum_sam", rho, sync_ascent=False, descent_check=False, **shared)
    _checks.check_real(
        "momentum",
        momentum,
        low=0.0,
        high=1.0,
        hint="E.g. momentum_sam(rho=0.3, momentum=0.9), with the base optimizer's momentum.",
    )
    if _checks.concrete_float(momentum) == 1.0:
        raise ValueError(
            "momentum must be < 1, got 1.0. E.g. momentum_sam(rho=0.3, momentum=0.9), with the "
            "base optimizer's momentum."
        )

    def init_fn(params: optax.Params) -> MomentumSAMState:
        return MomentumSAMState(
            count=jnp.zeros([], jnp.int32), momentum=_ascent.zero_buffers(params)
        )

    def update(
        updates: optax.Updates | None,
        state: MomentumSAMState,
        params: optax.Params,
        grad_fn: GradFn,
    ) -> tuple[optax.Updates, MomentumSAMState]:
        if ascent.stable and updates is None:
            raise TypeError(STABLE_NEEDS_UPDATES)
        rho_now = ascent.rho_at(state.count)
        like = params if updates is None else updates
        direction = jax.tree.map(jnp.negative, state.momentum)

        def perturbed():
            g_p, eps = ascent.sam_gradient(direction, like, params, grad_fn, rho_now)
            return ascent.average(g_p), eps

        if updates is None:
            g_p, eps = perturbed()
        else:
            # The given gradient at w serves the steps whose eps is 0 (no grad_fn call).
            no_ascent = tree.l2_norm(state.momentum) == 0
            if ascent.static_rho == 0:
                no_ascent = jnp.ones([], bool)
            elif ascent.static_rho is None:
                no_ascent = no_ascent | ~(jnp.asarray(rho_now) > 0)
            g_p, eps = jax.lax.cond(
                no_ascent, lambda: (ascent.average(updates), ascent.no_eps(params)), perturbed
            )
        out = ascent.rescale(g_p, ascent.average(updates), params, eps) if ascent.stable else g_p
        mu = jnp.asarray(momentum, jnp.float32)
        new_momentum = jax.tree.map(
            lambda v, x: (mu * v + x).astype(v.dtype), state.momentum, tree.to_wide(out)
        )
        # A step whose output is not finite (optax.apply_if_finite skips it) keeps v.
        new_momentum = tree.where_finite(out, new_momentum, state.momentum)
        return out, MomentumSAMState(count=optax.safe_increment(state.count), momentum=new_momentum)

    return ascent.transformation(init_fn, update)
