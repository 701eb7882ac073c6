"""Sparse SAM (SSAM-F and SSAM-D): SAM's perturbation on a sparse mask of the coordinates, kept
in the state, as an Optax gradient transformation in the style of :func:`sam_optax.sam`.

Notation: g = the gradient at w (`updates`), n(v) = v / ||v||_2 (0 for v = 0), g_p = the gradient
at w + eps, N = the number of parameters, k = floor(N (1 - sparsity)) the coordinates perturbed.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax import _ascent, _checks
from sam_optax import _tree as tree
from sam_optax._ascent import SharedArgs
from sam_optax._grad_fn import GradFn
from sam_optax._typing import Schedule, Unpack

MASK_RULES = ("fisher", "dynamic")
COMPLEX_REFUSED = (
    "sparse_sam does not support complex parameters (its mask ranks real coordinates): pass "
    "each complex parameter z as jnp.stack([z.real, z.imag], -1), or use "
    "sam_optax.sam(rho=0.05), which supports them."
)


class SparseSAMState(NamedTuple):
    """State of :func:`sparse_sam`: the step count, `mask` (True on the k coordinates the ascent
    perturbs, one boolean array per parameter), `fisher` (SSAM-F: the squared gradients summed
    since the mask was last refreshed; zeros for SSAM-D) and `key` (SSAM-D: the raw PRNG key
    data of the next regrowth)."""

    count: jax.Array
    mask: optax.Params
    fisher: optax.Updates
    key: jax.Array


def _flat(tree_: Any) -> jax.Array:
    """The leaves of `tree_` end to end (an empty vector for a tree without leaves)."""
    leaves = [jnp.ravel(x) for x in jax.tree.leaves(tree_)]
    return jnp.concatenate(leaves) if leaves else jnp.zeros([0], jnp.float32)


def _unflat(vector: jax.Array, like: Any) -> Any:
    """`vector` cut into the leaves of `like` (its shapes; any leaf with a shape will do)."""
    leaves, treedef = jax.tree.flatten(like)
    if not leaves:
        return jax.tree.unflatten(treedef, [])
    shapes = [np.shape(x) for x in leaves]
    parts = jnp.split(vector, np.cumsum([math.prod(shape) for shape in shapes])[:-1])
    return jax.tree.unflatten(
        treedef, [p.reshape(shape) for p, shape in zip(parts, shapes, strict=True)]
    )


def _ranks(scores: jax.Array) -> jax.Array:
    """The rank of each score, 0 for the largest (ties broken by position)."""
    order = jnp.argsort(-scores, stable=True)
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))


def top_k_mask(scores: Any, k: Any) -> Any:
    """True on the k largest scores over the whole pytree (one boolean array per leaf)."""
    return _unflat(_ranks(_flat(scores)) < k, scores)


def random_mask(key: jax.Array, params: Any, k: Any) -> Any:
    """True on k coordinates drawn uniformly without replacement over the whole pytree."""
    return top_k_mask(_unflat(jax.random.uniform(key, (_size(params),)), params), k)


def drop_rate_at(count: jax.Array, drop_rate: Any, num_steps: int) -> jax.Array:
    """SSAM-D's cosine schedule: drop_rate (1 + cos(pi t / T)) / 2 at step t of T."""
    progress = jnp.minimum(count / jnp.maximum(num_steps, 1), 1.0)
    return jnp.asarray(drop_rate, jnp.float32) * (1 + jnp.cos(jnp.pi * progress)) / 2


def dynamic_update(mask: Any, g: Any, key: jax.Array, death_rate: jax.Array, k: Any) -> Any:
    """SSAM-D's refresh: of the k live coordinates, keep the largest |g| but floor(k death_rate);
    revive as many at random among the others, so that k stay live."""
    live = _flat(mask)
    dropped = jnp.floor(k * death_rate).astype(jnp.int32)
    magnitude = jnp.where(live, jnp.abs(_flat(tree.to_wide(g))), -jnp.inf)
    kept = _ranks(magnitude) < k - dropped
    regrowth = jnp.where(kept, -jnp.inf, jax.random.uniform(key, live.shape))
    return _unflat(kept | (_ranks(regrowth) < dropped), mask)


def _size(params: Any) -> int:
    return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params))


def _positive_int(value: Any) -> bool:
    """An int >= 1, or an integer array (e.g. from `inject_hyperparams`; traced ones pass)."""
    if isinstance(value, jax.core.Tracer):
        return jnp.issubdtype(value.dtype, jnp.integer)
    if isinstance(value, (jax.Array, np.ndarray)):
        return jnp.issubdtype(value.dtype, jnp.integer) and value.ndim == 0 and int(value) >= 1
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_sparse_args(sparsity: Any, mask: str, update_every: Any, num_steps: Any) -> None:
    hint = (
        "E.g. sparse_sam(rho=0.05, sparsity=0.5, mask='fisher', update_every=1000) or "
        "sparse_sam(rho=0.05, sparsity=0.5, mask='dynamic', update_every=1000, num_steps=50000)."
    )
    _checks.check_real("sparsity", sparsity, low=0.0, high=1.0, hint=hint)
    if _checks.concrete_float(sparsity) == 1:
        raise ValueError(f"sparsity must be < 1 (sparsity 1 perturbs nothing). {hint}")
    if mask not in MASK_RULES:
        raise ValueError(f"mask must be one of {MASK_RULES}, got {mask!r}. {hint}")
    if not _positive_int(update_every):
        raise ValueError(f"update_every must be an int >= 1 (steps), got {update_every!r}. {hint}")
    if mask == "dynamic" and not _positive_int(num_steps):
        raise ValueError(
            "mask='dynamic' lowers its drop rate over the run and needs num_steps, the run's "
            f"length in steps (an int >= 1), got {num_steps!r}. {hint}"
        )


@_ascent.with_shared_args()
def sparse_sam(
    rho: float | jax.Array | Schedule = 0.05,
    sparsity: float = 0.5,
    *,
    mask: str = "fisher",
    update_every: int = 1,
    num_steps: int | None = None,
    drop_rate: float | jax.Array = 0.5,
    seed: int = 0,
    **shared: Unpack[SharedArgs],
) -> optax.GradientTransformationExtraArgs:
    r"""Sparse SAM: SAM's perturbation on k = floor(N (1 - sparsity)) coordinates only.

    With m the mask in the state (True on k coordinates, chosen over the whole pytree),

    .. math::

      \epsilon = \rho\, \frac{g}{\|g\|} \odot m, \qquad \text{output } \nabla L(w + \epsilon),

    the full gradient normalized and then masked, not renormalized (||eps|| <= rho), as the
    official code does. The mask is refreshed on the steps t with t % update_every == 0, from
    the averaged gradient (the same mask on every device):

    * ``mask="fisher"`` (SSAM-F): the k coordinates of largest empirical Fisher information,
      estimated by the squared gradients g * g summed over the steps since the last refresh (the
      first mask comes from the first gradient). The official code sums the squares of
      `num_samples` single-example gradients instead; a transformation sees one mini-batch
      gradient per step, so this estimate is the squared mini-batch gradients'.
    * ``mask="dynamic"`` (SSAM-D): a random mask of k coordinates at first (from `seed`); at
      each refresh after the first step, of the live coordinates those with the largest |g|
      stay but floor(k d_t), and as many are revived at random among the others, so k stay live.
      The drop rate d_t = drop_rate (1 + cos(pi t / num_steps)) / 2 falls from drop_rate to 0.

    sparsity = 0 is SAM (the mask holds every coordinate). The official code refreshes every
    `update_freq` epochs (5 by default; its published runs use 1); `update_every` counts steps,
    so pass epochs times steps per epoch. A refresh ranks all N coordinates (two sorts for
    SSAM-D), behind a `lax.cond` that only refresh steps take. A step whose output is not finite
    (which `optax.apply_if_finite` then skips) leaves the mask and the Fisher sums as they were.
    Complex parameters are refused (a ValueError): pass each as its (Re, Im) pairs.

    Example:

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda w: jnp.sum(w ** 2 * jnp.arange(1.0, 5.0))
      >>> params = jnp.ones(4)
      >>> tx = optax.chain(sam_optax.sparse_sam(0.05, sparsity=0.5, update_every=10),
      ...                  optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                            grad_fn=jax.grad(loss))
      >>> int(state[0].mask.sum())  # the coordinates the ascent perturbs
      2

    Args:
      rho: radius of the ascent, >= 0, or an optax schedule of the step count. Defaults to 0.05.
      sparsity: the share of the coordinates not perturbed, in [0, 1). Defaults to 0.5 (the
        official code's published runs; its argument's default is 0.2). It sets the mask's
        size, so under `optax.inject_hyperparams` it goes in `static_args`.
      mask: "fisher" (SSAM-F, the default) or "dynamic" (SSAM-D).
      update_every: refresh the mask every this many steps (>= 1). Defaults to 1.
      num_steps: the run's length in steps, for SSAM-D's drop-rate schedule (needed there).
      drop_rate: SSAM-D's initial drop rate. Defaults to 0.5 (the official code's).
      seed: seed of SSAM-D's random mask and regrowth. Defaults to 0.
      {shared_args}

    Returns:
      An `optax.GradientTransformationExtraArgs` whose `update` needs `params` and
      `grad_fn(params) -> gradient pytree`, as :func:`sam_optax.sam`. Its state holds the mask.

    References:
      Mi et al., `Make Sharpness-Aware Minimization Stronger: A Sparsified Perturbation
      Approach <https://arxiv.org/abs/2210.05177>`_, NeurIPS 2022 (official code:
      Mi-Peng/Sparse-Sharpness-Aware-Minimization).
    """
    ascent = _ascent.Ascent("sparse_sam", rho, **shared)
    _check_sparse_args(sparsity, mask, update_every, num_steps)
    dynamic = mask == "dynamic"

    def live_count(params: optax.Params) -> int:
        """k = floor(N (1 - sparsity)), a Python int (it is the mask's exact size)."""
        if isinstance(sparsity, jax.core.Tracer):
            raise TypeError(
                "sparsity sets how many coordinates the mask holds and must be a Python float, "
                "got a traced value. With optax.inject_hyperparams, list it in static_args, e.g. "
                "optax.inject_hyperparams(sam_optax.sparse_sam, static_args=('sparsity',))"
                "(rho=0.05, sparsity=0.5)."
            )
        return math.floor(_size(params) * (1 - float(sparsity)))

    def init_fn(params: optax.Params) -> SparseSAMState:
        key, mask_key = jax.random.split(jax.random.PRNGKey(seed))
        live = random_mask(mask_key, params, live_count(params)) if dynamic else None
        if live is None:
            live = jax.tree.map(lambda x: jnp.zeros(np.shape(x), bool), params)
        return SparseSAMState(
            count=jnp.zeros([], jnp.int32),
            mask=live,
            fisher=_ascent.zero_buffers(params),
            key=key,
        )

    def refreshed(state: SparseSAMState, g: Any, k: Any) -> tuple[Any, Any, jax.Array]:
        """(mask, fisher, key) after this step's refresh, if it is a refresh step."""
        fisher = jax.tree.map(lambda f, x: f + tree.to_wide(x) ** 2, state.fisher, g)
        key, regrowth_key = jax.random.split(state.key)
        refresh = state.count % update_every == 0
        if dynamic:
            refresh &= state.count > 0
            death_rate = drop_rate_at(state.count, drop_rate, num_steps)
            new_mask = jax.lax.cond(
                refresh,
                lambda: dynamic_update(state.mask, g, regrowth_key, death_rate, k),
                lambda: state.mask,
            )
            return new_mask, state.fisher, key
        new_mask = jax.lax.cond(refresh, lambda: top_k_mask(fisher, k), lambda: state.mask)
        fisher = jax.tree.map(lambda f: jnp.where(refresh, jnp.zeros_like(f), f), fisher)
        return new_mask, fisher, key

    def update(
        updates: optax.Updates, state: SparseSAMState, params: optax.Params, grad_fn: GradFn
    ) -> tuple[optax.Updates, SparseSAMState]:
        if any(jnp.iscomplexobj(x) for x in jax.tree.leaves(params)):
            raise ValueError(COMPLEX_REFUSED)
        rho_now = ascent.rho_at(state.count)
        g = ascent.average(updates)
        new_mask, fisher, key = refreshed(state, g, live_count(params))

        def finish(out: optax.Updates) -> tuple[optax.Updates, SparseSAMState]:
            # A step whose output is not finite (optax.apply_if_finite skips it) keeps the mask
            # and the Fisher sums as they were.
            kept = tree.where_finite(out, (new_mask, fisher), (state.mask, state.fisher))
            return out, SparseSAMState(optax.safe_increment(state.count), *kept, key)

        if ascent.static_rho == 0:
            return finish(g)
        direction = g if ascent.sync_ascent or ascent.axis_name is None else updates
        masked = jax.tree.map(lambda m, x: jnp.where(m, x, jnp.zeros_like(x)), new_mask, direction)
        # The ascent normalizes what it is given; scaling rho by ||m g|| / ||g|| makes eps the
        # full gradient's direction, masked and not renormalized.
        scale = tree.safe_divide(
            _direction_norm(ascent, masked, params), _direction_norm(ascent, direction, params)
        )
        radius = rho_now * scale
        g_p, eps = ascent.perturbed_gradient(masked, updates, params, grad_fn, radius)
        return finish(ascent.rescale(ascent.average(g_p), g, params, eps))

    return ascent.transformation(init_fn, update)


def _direction_norm(ascent: _ascent.Ascent, direction: Any, params: Any) -> jax.Array:
    """||T d|| of the ascent's direction (T = |w| + eta with `adaptive`, else 1)."""
    d = tree.to_wide(direction)
    if ascent.adaptive:
        d = jax.tree.map(lambda w, x: (jnp.abs(tree.to_wide(w)) + ascent.eta) * x, params, d)
    return tree.l2_norm(d)
