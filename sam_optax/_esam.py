"""ESAM: SAM with a random subset of the parameters perturbed (stochastic weight perturbation)
and the second pass on the examples whose loss the ascent raised most (sharpness-sensitive data
selection), as an Optax gradient transformation in the style of :func:`sam_optax.sam`.

Notation: g = the gradient at w (`updates`), n(v) = v / ||v||_2 (0 for v = 0), g_p = the gradient
at w + eps. Norms are global over the pytree and accumulated in float32 (or the parameters' dtype
if wider).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _ascent, _checks
from sam_optax._ascent import SharedArgs
from sam_optax._grad_fn import GradFn
from sam_optax._typing import Schedule, Unpack


class ESAMState(NamedTuple):
    """State of :func:`esam`: the step count and `key`, the PRNG key (raw uint32 data, as
    `jax.random.PRNGKey` makes) from which the next step draws its perturbed tensors."""

    count: jax.Array
    key: jax.Array


def draw_tensors(key: jax.Array, params: optax.Params, beta: Any) -> Any:
    """One Bernoulli(beta) draw per leaf of params: 1.0 (perturbed) or 0.0, in float32."""
    leaves, treedef = jax.tree.flatten(params)
    keep = jax.random.bernoulli(key, jnp.asarray(beta, jnp.float32), (len(leaves),))
    return jax.tree.unflatten(treedef, list(keep.astype(jnp.float32)))


@_ascent.with_shared_args()
def esam(
    rho: float | jax.Array | Schedule = 0.05,
    beta: float | jax.Array = 0.6,
    *,
    seed: int = 0,
    **shared: Unpack[SharedArgs],
) -> optax.GradientTransformationExtraArgs:
    r"""ESAM's stochastic weight perturbation (SWP): SAM's ascent on a random subset of tensors.

    At every step each parameter tensor (each leaf of the params) is drawn independently into
    the ascent with probability beta, m_l ~ Bernoulli(beta), and

    .. math::

      \epsilon = \frac{\rho}{\beta}\, n(m \odot g), \qquad \text{output } \nabla L(w + \epsilon),

    so the tensors left out are not perturbed and the radius is rho / beta over the ones kept.
    beta = 1 is SAM. The draw is per tensor, not per coordinate, and the 1 / beta scaling of the
    radius is the official code's. The draws come from `key` in the state (split at every step),
    so `update` is a pure function of the state and a resumed run draws alike; every device of
    a data-parallel run draws the same tensors. With `adaptive`, eps = (rho / beta) T n(T m g)
    (the official code's ASAM form, with eta here).

    ESAM's second saving, sharpness-sensitive data selection (SDS), is the second pass on the
    fraction gamma of the examples whose loss rose most from w to w + eps: pass
    ``grad_fn=sam_optax.esam_selected_grad_fn(per_example_loss_fn, batch, losses, gamma)``.

    What of ESAM a pre-transformation cannot give: the official code saves the backward pass of
    the tensors left out of the ascent in the *first* pass (they need no gradient at w), but here
    `updates`, the gradient at w, is computed by the caller before this transformation runs, in
    full, so SWP changes the ascent and not the first pass's cost (the second pass
    differentiates every tensor, there as here). SDS does save compute, in the second backward
    pass, whose batch is smaller (a static count of examples), at the cost of a forward pass on
    the whole batch at w + eps (as in the official code). Costs two passes per step (one where
    rho is 0).

    Example:

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda w: jnp.sum(w["a"] ** 2) + jnp.sum(3.0 * w["b"] ** 2)
      >>> params = {"a": jnp.ones(3), "b": jnp.ones(2)}
      >>> tx = optax.chain(sam_optax.esam(rho=0.05, beta=0.6, seed=0), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                            grad_fn=jax.grad(loss))

    Args:
      rho: radius of the ascent, >= 0, or an optax schedule of the step count. Defaults to 0.05.
      beta: the probability that a tensor is perturbed, in (0, 1]. Defaults to 0.6 (the official
        code's ResNet-18 setting; 0.5 for its WideResNet and PyramidNet runs).
      seed: seed of the draws. Defaults to 0.
      {shared_args}

    Returns:
      An `optax.GradientTransformationExtraArgs` whose `update` needs `params` and
      `grad_fn(params) -> gradient pytree`, as :func:`sam_optax.sam`. Its state holds the key.

    References:
      Du et al., `Efficient Sharpness-aware Minimization for Improved Training of Neural
      Networks <https://arxiv.org/abs/2110.03141>`_, ICLR 2022 (official code: dydjw9/Efficient_SAM,
      `utils/Esam.py`).
    """
    ascent = _ascent.Ascent("esam", rho, **shared)
    hint = "E.g. esam(rho=0.05, beta=0.6) (beta = 1 is SAM)."
    _checks.check_real("beta", beta, low=0.0, high=1.0, hint=hint)
    if _checks.concrete_float(beta) == 0:
        raise ValueError(f"beta must be > 0 (beta = 0 perturbs nothing). {hint}")
    integer_array = hasattr(seed, "dtype") and jnp.issubdtype(seed.dtype, jnp.integer)
    if isinstance(seed, bool) or not (isinstance(seed, int) or integer_array):
        raise TypeError(f"seed must be an int, got {seed!r}. E.g. esam(rho=0.05, seed=0).")

    def init_fn(params: optax.Params) -> ESAMState:
        del params
        return ESAMState(count=jnp.zeros([], jnp.int32), key=jax.random.PRNGKey(seed))

    def update(
        updates: optax.Updates, state: ESAMState, params: optax.Params, grad_fn: GradFn
    ) -> tuple[optax.Updates, ESAMState]:
        rho_now = ascent.rho_at(state.count)
        key, draw_key = jax.random.split(state.key)
        new_state = ESAMState(count=optax.safe_increment(state.count), key=key)
        g = ascent.average(updates)
        if ascent.static_rho == 0:
            return g, new_state
        kept = draw_tensors(draw_key, updates, beta)
        direction = ascent.own_or_synced(g, updates)
        # The tensors left out contribute neither to the norm nor to eps.
        direction = jax.tree.map(lambda m, x: (m * x).astype(x.dtype), kept, direction)
        radius = rho_now / jnp.asarray(beta, jnp.float32)
        g_p, eps = ascent.perturbed_gradient(direction, updates, params, grad_fn, radius)
        return ascent.rescale(ascent.average(g_p), g, params, eps), new_state

    return ascent.transformation(init_fn, update)


def esam_selected_grad_fn(
    per_example_loss_fn: Callable[[optax.Params, Any], jax.Array],
    batch: Any,
    losses: jax.Array,
    fraction: float,
) -> GradFn:
    r"""ESAM's sharpness-sensitive data selection (SDS), as a `grad_fn` for any transformation.

    The returned ``grad_fn(p)`` (p = w + eps) evaluates the per-example losses on the whole
    batch, ranks the examples by how much their loss rose, l_i(w + eps) - l_i(w), keeps the
    k = floor(fraction * n) highest (`jax.lax.top_k`; k is static, so the selected batch has a
    fixed shape) and returns the gradient of their mean loss:

    .. math::

      S = \operatorname{top}_k\bigl(l_i(w + \epsilon) - l_i(w)\bigr), \qquad
      \text{grad\_fn}(p) = \nabla_p \frac{1}{k} \sum_{i \in S} l_i(p).

    fraction = 1 differentiates the whole batch with no selection (and no extra forward pass).
    The official code keeps the examples strictly above the k-th value (k - 1 of them without
    ties) and the whole batch from fraction 0.99 up; here exactly k are kept. Its cost: one
    forward pass on the whole batch and a backward pass on k examples, in place of a backward
    pass on n. Inside `jax.shard_map`, each device selects among its own examples (as each
    process of the official data-parallel code does).

    Example:

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> def per_example_loss(w, batch):
      ...   x, y = batch
      ...   return (x @ w - y) ** 2
      >>> x, y = jnp.arange(12.0).reshape(4, 3) / 10, jnp.ones(4)
      >>> w = jnp.zeros(3)
      >>> losses = per_example_loss(w, (x, y))  # from the first pass, at w
      >>> grads = jax.grad(lambda w: per_example_loss(w, (x, y)).mean())(w)
      >>> grad_fn = sam_optax.esam_selected_grad_fn(per_example_loss, (x, y), losses, 0.5)
      >>> tx = sam_optax.esam(rho=0.05, beta=0.6)
      >>> updates, state = tx.update(grads, tx.init(w), w, grad_fn=grad_fn)

    Args:
      per_example_loss_fn: ``per_example_loss_fn(params, batch) -> losses``, one loss per
        example (a vector along the batch's leading axis).
      batch: the step's batch, a pytree whose leaves share a leading axis of n examples.
      losses: the per-example losses at w (the first pass has them), shape (n,).
      fraction: gamma, the fraction of the batch kept, in (0, 1]; the official code uses 0.5.

    Returns:
      ``grad_fn(params) -> gradient pytree``.

    References:
      Du et al., `Efficient Sharpness-aware Minimization for Improved Training of Neural
      Networks <https://arxiv.org/abs/2110.03141>`_, ICLR 2022 (official code: dydjw9/Efficient_SAM,
      `utils/Esam.py`).
    """
    hint = (
        "E.g. sam_optax.esam_selected_grad_fn(per_example_loss_fn, batch, losses, fraction=0.5), "
        "with losses = per_example_loss_fn(params, batch) at w."
    )
    if isinstance(fraction, jax.core.Tracer):
        raise TypeError(
            "fraction must be a Python float: it sets the static size of the selected batch. "
            + hint
        )
    _checks.check_real("fraction", fraction, low=0.0, high=1.0, hint=hint)
    if jnp.ndim(losses) != 1:
        raise ValueError(
            f"losses must be the vector of per-example losses at w, got shape "
            f"{jnp.shape(losses)}. {hint}"
        )
    n = jnp.shape(losses)[0]
    k = int(float(fraction) * n)
    if k < 1:
        raise ValueError(
            f"fraction={fraction!r} of a batch of {n} keeps no example; it must keep at least one "
            f"(fraction >= 1/{n}). {hint}"
        )

    def mean_loss(params, examples):
        return jnp.mean(per_example_loss_fn(params, examples))

    def grad_fn(params: optax.Params) -> optax.Updates:
        if k == n:
            return jax.grad(mean_loss)(params, batch)
        rise = jax.lax.stop_gradient(per_example_loss_fn(params, batch) - losses)
        _, selected = jax.lax.top_k(rise, k)
        examples = jax.tree.map(lambda x: jnp.take(x, selected, axis=0), batch)
        return jax.grad(mean_loss)(params, examples)

    return grad_fn
