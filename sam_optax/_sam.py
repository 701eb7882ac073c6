"""Sharpness-aware minimization (SAM) and its shortcuts as Optax gradient transformations."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _ascent, _checks
from sam_optax import _tree as tree
from sam_optax._ascent import PerturbMask
from sam_optax._grad_fn import MISSING_GRAD_FN, GradFn, evaluate_grad_fn, micro_batch_count
from sam_optax._parallel import AxisName, per_device, varying_like
from sam_optax._typing import Schedule


class SAMState(NamedTuple):
    """State of :func:`sam`: the number of `update` calls so far (drives rho schedules)."""

    count: jax.Array


def perturbation(
    grads: optax.Updates,
    params: optax.Params,
    *,
    rho: float | jax.Array = 0.05,
    grad_fn: GradFn | None = None,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    normalize: bool = True,
    ascent_norm: float | None = None,
    ascent_steps: int | None = None,
    perturb_mask: PerturbMask = None,
) -> optax.Params:
    """The perturbation eps that :func:`sam` adds to the weights before its second gradient.

    Useful for analysis (e.g. the SAM sharpness L(w + eps) - L(w)). Arguments mean what they mean
    in :func:`sam`; `grad_fn` is needed only for a multi-step ascent (`ascent_steps > 1`).

    Returns:
      eps, a pytree shaped like `params` in the promoted dtype of the params and float32.

    Example:
      >>> import jax.numpy as jnp, sam_optax
      >>> eps = sam_optax.perturbation({"w": jnp.array([3.0, 4.0])}, {"w": jnp.zeros(2)}, rho=0.5)
      >>> print(eps["w"])
      [0.3 0.4]
    """
    _checks.check_args(rho=rho, eta=eta, ascent_norm=ascent_norm, ascent_steps=ascent_steps)
    if ascent_norm is None:
        ascent_norm = _ascent.DEFAULT_ASCENT_NORM
    if ascent_steps is None:
        ascent_steps = _ascent.DEFAULT_ASCENT_STEPS
    if ascent_steps > 1 and grad_fn is None:
        raise TypeError("perturbation(..., ascent_steps > 1) needs grad_fn. " + MISSING_GRAD_FN)
    eps, _ = _ascent.ascend(
        grads,
        params,
        grad_fn,
        rho,
        like=grads,
        adaptive=adaptive,
        eta=eta,
        normalize=normalize,
        ascent_norm=float(ascent_norm),
        ascent_steps=int(ascent_steps),
        mask=_ascent.resolve_mask(perturb_mask, params),
        final_gradient=False,
    )
    return eps


def sam(
    rho: float | jax.Array | Schedule = 0.05,
    *,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    normalize: bool = True,
    stable: bool = False,
    ascent_norm: float | None = None,
    ascent_steps: int | None = None,
    axis_name: AxisName | None = None,
    sync_ascent: bool = False,
    perturb_mask: PerturbMask = None,
    stable_max_scale: float | jax.Array | None = None,
    stable_norm: str = "plain",
    check_input_gradient: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Sharpness-aware minimization: replaces the gradient by the gradient at an ascent point.

    Chain it in front of any base optimizer (first in the chain: it needs the gradient, not an
    update), which then sees the SAM gradient. Behind a descent transformation (e.g.
    ``optax.chain(optax.adamw(lr), sam(rho))``) the incoming updates point against the gradient
    at the ascent point: on the first step (and where a rho schedule turns on) that is a
    ValueError naming the fix, a warning under `jax.jit`, at no extra gradient evaluation.

    With g the gradient at w (`updates`) and T = |w| + eta elementwise when `adaptive`, else 1:

    .. math::

      \epsilon = \rho\, T\, d(T g)  \quad\text{(normalize)}, \qquad
      \epsilon = \rho\, T^2 g      \quad\text{(USAM)}, \qquad
      g_{\rm SAM} = \nabla L(w + \epsilon)

    where d(v) = argmax_{||e||_p <= 1} <v, e> is the dual-norm direction of p = `ascent_norm`:
    v / ||v||_2 for p = 2, sign(v) for p = inf, sign(v) |v|^{q-1} / ||v||_q^{q-1} with
    1/p + 1/q = 1 otherwise. With `ascent_steps` = k > 1 the ascent takes k steps of radius rho / k,
    each from the gradient at the previous point. With `stable` (StableSAM) the output is
    g_SAM * ||g||_2 / ||g_SAM||_2, so the update keeps the exact gradient's norm.

    All norms are global over the pytree. The ascent, its norms, the perturbed weights and the
    StableSAM rescale are computed in the promoted dtype of the parameters and float32 (float32
    for bfloat16 parameters, float64 for float64 ones). Zero gradients give zeros, never NaN; a
    non-finite element in g or in any gradient the ascent evaluates makes the whole output NaN
    (on a rho = 0 step the output is g itself), so `optax.apply_if_finite` sees it. The output
    has the dtype of `updates`. Each step costs one extra gradient evaluation (`grad_fn`),
    `ascent_steps` with a multi-step ascent, and none on a step where rho is 0. `grad_fn`'s
    output is checked against `updates` (structure, shapes, dtypes) when the step is traced.

    Args:
      rho: radius of the ascent, >= 0, or an optax schedule of the step count (the number of
        `update` calls so far). Where rho is 0 the output is `updates` itself and `grad_fn` is not
        evaluated at run time, so "SGD first, SAM late" costs one pass per step until SAM starts.
        Defaults to 0.05 (Foret et al.'s CIFAR value; ASAM wants about 10x larger, see `asam`).
      adaptive: scale the ascent by T = |w| + eta (ASAM, Kwon et al. 2021).
      eta: the offset of ASAM's T; ignored unless `adaptive`. Defaults to 0.01.
      normalize: normalize the ascent direction (SAM). False gives unnormalized SAM (USAM),
        eps = rho T^2 g, which the StableSAM paper calls "SAM".
      stable: renormalize the output to the norm of the exact gradient (StableSAM, Tan et al.
        2025). Plain L2 norms, also when `adaptive`, unless `stable_norm` says otherwise.
      ascent_norm: p of the L-p ball of the ascent, a Python number > 1: None (default) means 2,
        SAM; float('inf') gives a sign (FGSM-style) ascent. Static: with
        `optax.inject_hyperparams`, passing it needs `static_args=('ascent_norm',)`.
      ascent_steps: number of ascent steps, an int >= 1; None (default) means 1. Static, like
        `ascent_norm`.
      axis_name: inside `jax.shard_map`/`jax.pmap`, the data-parallel axis. `updates` is then each
        device's own gradient: each device perturbs its weights with its own gradient (m-sharpness,
        as Foret et al.), and the output is the SAM gradient averaged over the axis. With `stable`,
        the scale uses the norms of the averaged g and the averaged g_SAM. Do not average the
        gradient yourself first: this transformation does the all-reduce. Under
        `jax.vmap(..., axis_name=...)` over sub-batches it gives m-sharpness on one device, the
        same result as `jax.shard_map` over the same sub-batches.
      sync_ascent: with `axis_name`, average g over the axis before the ascent, so every device
        uses the same eps (the global-batch SAM). Costs one more all-reduce.
      perturb_mask: optional pytree of booleans (or a function of the params returning one) that
        marks the parameters to perturb; the others keep eps = 0 and stay out of the ascent's norms
        (e.g. ASAM's official code perturbs only kernels and norm scales). The output still covers
        every parameter.
      stable_max_scale: with `stable`, caps the factor: g_SAM * min(stable_max_scale,
        ||g|| / ||g_SAM||). 1.0 never scales the SAM gradient up (the truncation the official
        StableSAM code keeps as a commented-out line). Defaults to None (no cap).
      stable_norm: with `stable`, the norms of the factor. "plain" (default, the paper's
        formula): L2 norms. "adaptive" (the official code's adaptive variants):
        ||(|w|) g|| / ||(|w + eps|) g_SAM||, elementwise weighted by the absolute weights, the
        second at the perturbed weights; with `axis_name`, eps is averaged over the axis. The
        official code's stable ASAM exactly (its T is |w|, i.e. eta = 0):
        ``sam(rho, adaptive=True, eta=0.0, stable=True, stable_norm="adaptive")``.
      check_input_gradient: a debug check of the chain order: on the first step, raise a
        ValueError if `updates` differs from grad_fn(params) (a transformation in front of sam).
        A descent transformation in front is caught without it; this one also sees what keeps
        the gradient's direction (a scaling, clipping). Costs one more `grad_fn` evaluation on
        the first step; nothing when False (default).

    Returns:
      An `optax.GradientTransformationExtraArgs` whose `update(updates, state, params, *,
      grad_fn, micro_batches=None, **extra_args)` needs `params` and `grad_fn(params) ->
      gradient pytree`. With `micro_batches` (a pytree whose leaves stack k micro-batches on a
      leading axis), `grad_fn(params, micro_batch)` takes one micro-batch and each micro-batch
      ascends from its own gradient (m-sharpness with m = the micro-batch size; `updates` is not
      used, pass None): a `lax.scan`, so memory grows with the micro-batch, not with k;
      ``micro_batch_chunk=c`` runs c micro-batches at once under `jax.vmap` (c perturbed copies
      of the params and c micro-batches' activations in memory, and faster). The k
      gradients and SAM gradients are averaged (then over `axis_name`); `stable` uses the norms of
      the averages. For the ascent from the mean gradient (SAM on the whole batch) use
      :func:`accumulate_grad_fn` instead.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, optax, sam_optax
      >>> def loss_fn(params, batch):
      ...   x, y = batch
      ...   return jnp.mean((x @ params["w"] - y) ** 2)
      >>> params = {"w": jnp.zeros(3)}
      >>> batch = (jnp.eye(3), jnp.array([1.0, 2.0, 3.0]))
      >>> tx = optax.chain(sam_optax.sam(rho=0.05), optax.sgd(0.1))
      >>> opt_state = tx.init(params)
      >>> grad_fn = lambda p: jax.grad(loss_fn)(p, batch)
      >>> updates, opt_state = tx.update(grad_fn(params), opt_state, params, grad_fn=grad_fn)
      >>> params = optax.apply_updates(params, updates)
      >>> print(np.asarray(params["w"]).round(3))
      [0.068 0.135 0.203]

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving Generalization
      <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.

      Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of
      Deep Neural Networks <https://arxiv.org/abs/2102.11600>`_, ICML 2021.

      Andriushchenko and Flammarion, `Towards Understanding Sharpness-Aware Minimization
      <https://arxiv.org/abs/2206.06232>`_, ICML 2022 (unnormalized SAM).

      Tan et al., `Stabilizing Sharpness-Aware Minimization Through A Simple Renormalization
      Strategy <https://arxiv.org/abs/2401.07250>`_, JMLR 2025 (StableSAM).

      Zhou et al., `Sharpness-Aware Minimization Efficiently Selects Flatter Minima Late In
      Training <https://openreview.net/forum?id=aD2uwhLbnA>`_, ICLR 2025 (rho schedules).
    """
    ascent = _ascent.Ascent.from_arguments("sam", locals(), warn_inside_multi_steps=True)

    def init_fn(params: optax.Params) -> SAMState:
        del params
        return SAMState(count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: optax.Updates,
        state: SAMState,
        params: optax.Params | None = None,
        *,
        grad_fn: GradFn | None = None,
        micro_batches: Any = None,
        micro_batch_chunk: int = 1,
        **extra_args: Any,
    ) -> tuple[optax.Updates, SAMState]:
        del extra_args
        params = ascent.check_update_inputs(
            updates, params, grad_fn, state.count, micro_batches=micro_batches
        )
        # With micro_batches each ascent starts from a gradient grad_fn computed: nothing to check.
        checked_updates = updates if micro_batches is None else None
        with ascent.checking_chain_order(checked_updates, state.count):
            return sam_update(updates, state, params, grad_fn, micro_batches, micro_batch_chunk)

    def sam_update(updates, state, params, grad_fn, micro_batches, micro_batch_chunk=1):
        rho_now = ascent.rho_at(state.count)
        new_state = SAMState(count=optax.safe_increment(state.count))
        if micro_batches is not None:
            like = params if updates is None else updates
            mean_grads, g_sam, eps = _micro_batch_sam_gradient(
                ascent, params, grad_fn, micro_batches, like, rho_now, micro_batch_chunk
            )
        else:
            mean_grads = ascent.average(updates)
            if ascent.static_rho == 0:
                return mean_grads, new_state
            # The rho = 0 branch returns the local gradient, so that the one all-reduce below
            # serves both branches.
            direction = mean_grads if sync_ascent else updates
            g_sam, eps = ascent.perturbed_gradient(direction, updates, params, grad_fn, rho_now)
            g_sam = ascent.average(g_sam)
        return ascent.rescale(g_sam, mean_grads, params, eps), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _micro_batch_sam_gradient(
    ascent: _ascent.Ascent,
    params: optax.Params,
    grad_fn: Any,
    micro_batches: Any,
    like: optax.Updates,
    rho: Any,
    chunk: int = 1,
) -> tuple[optax.Updates, optax.Updates, Any]:
    """(mean gradient, mean SAM gradient, mean eps) over the micro-batches, each ascending from
    its own gradient; `chunk` of them at once under `jax.vmap`, the chunks in a `lax.scan`; both
    gradients averaged over `axis_name` too."""
    k = micro_batch_count(micro_batches)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1 or k % chunk:
        raise ValueError(
            f"micro_batch_chunk must be an int >= 1 that divides the number of micro-batches "
            f"{k}, got {chunk!r}; e.g. tx.update(None, state, params, grad_fn=..., "
            "micro_batches=..., micro_batch_chunk=8)."
        )
    axis_name = ascent.axis_name
    local_params = params if axis_name is None else per_device(params, axis_name)

    def one(batch):
        def batch_grad_fn(p):
            return grad_fn(p, batch)

        g = tree.cast_like(evaluate_grad_fn(batch_grad_fn, local_params, like), like)
        g_sam, eps = ascent.perturbed_gradient(g, g, params, batch_grad_fn, rho)
        return tree.to_wide(g), tree.to_wide(g_sam), eps

    def body(carry, batches):
        # A chunk's micro-batches run side by side: memory grows with the chunk, not with k.
        parts = jax.vmap(one)(batches) if chunk > 1 else one(batches)
        if chunk > 1:
            parts = jax.tree.map(lambda x: jnp.sum(x, axis=0), parts)
        return jax.tree.map(jnp.add, carry, parts), None

    chunks = jax.tree.map(lambda x: x.reshape(k // chunk, chunk, *x.shape[1:]), micro_batches)
    if chunk == 1:
        chunks = micro_batches
    zeros = varying_like(tree.zeros_wide(like), local_params, micro_batches)
    zero_eps = varying_like(ascent.no_eps(params), local_params, micro_batches)
    (sum_g, sum_sam, sum_eps), _ = jax.lax.scan(body, (zeros, zeros, zero_eps), chunks)

    def mean(total):
        return ascent.average(tree.cast_like(jax.tree.map(lambda t: t / k, total), like))

    # stable_norm="adaptive" weighs by |w + eps| with eps averaged over micro-batches.
    return mean(sum_g), mean(sum_sam), jax.tree.map(lambda t: t / k, sum_eps)


# --------------------------------------------------------------------------------------------
# Shortcuts. Each takes every keyword of `sam` and shows it in its signature, so that
# `optax.inject_hyperparams(stable_sam)(rho=...)` sees the same arguments as for `sam`.
# --------------------------------------------------------------------------------------------


def _signature_like_sam(positional: Sequence[str] = ("rho",), **defaults) -> inspect.Signature:
    """sam's signature with other defaults; `positional` may be passed by position."""
    params = []
    for p in inspect.signature(sam).parameters.values():
        if p.name in defaults:
            p = p.replace(default=defaults[p.name])
        if p.name in positional:
            p = p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)
        params.append(p)
    params.sort(key=lambda p: (p.kind != inspect.Parameter.POSITIONAL_OR_KEYWORD,))
    return inspect.signature(sam).replace(parameters=params)


def stable_sam(
    rho: float | jax.Array | Schedule = 0.05, **kwargs: Any
) -> optax.GradientTransformationExtraArgs:
    """StableSAM (Tan et al., JMLR 2025): :func:`sam` with ``stable=True``.

    The SAM gradient is rescaled to the norm of the exact gradient, g_SAM ||g|| / ||g_SAM||. Every
    other keyword of :func:`sam` applies; ``stable_sam(normalize=False)`` is the paper's SSAM
    (its "SAM" is the unnormalized ascent).

    Example:
      >>> import jax.numpy as jnp, optax, sam_optax
      >>> tx = optax.inject_hyperparams(sam_optax.stable_sam)(rho=0.1)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> print(state.hyperparams["rho"])
      0.1

    References:
      Tan et al., `Stabilizing Sharpness-Aware Minimization Through A Simple Renormalization
      Strategy <https://arxiv.org/abs/2401.07250>`_, JMLR 2025.
    """
    kwargs.setdefault("stable", True)
    return sam(rho, **kwargs)


def asam(
    rho: float | jax.Array | Schedule = 0.5, eta: float | jax.Array = 0.01, **kwargs: Any
) -> optax.GradientTransformationExtraArgs:
    """Adaptive SAM (Kwon et al., ICML 2021): :func:`sam` with ``adaptive=True``.

    eps = rho T^2 g / ||T g||_2 with T = |w| + eta. Defaults rho = 0.5, eta = 0.01 (the paper's
    CIFAR-10 values; CIFAR-100 used rho = 1.0).

    Example:
      >>> import jax.numpy as jnp, sam_optax
      >>> tx = sam_optax.asam(rho=0.5, eta=0.01)
      >>> params = {"w": jnp.array([1.0, 0.0])}
      >>> out, _ = tx.update(params, tx.init(params), params, grad_fn=lambda p: p)
      >>> print(out["w"])  # T = |w| + eta, eps = rho T^2 g / ||T g||
      [1.505 0.   ]

    References:
      Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of
      Deep Neural Networks <https://arxiv.org/abs/2102.11600>`_, ICML 2021.
    """
    kwargs.setdefault("adaptive", True)
    return sam(rho, eta=eta, **kwargs)


def usam(
    rho: float | jax.Array | Schedule = 0.05, **kwargs: Any
) -> optax.GradientTransformationExtraArgs:
    """Unnormalized SAM: :func:`sam` with ``normalize=False``, eps = rho g (rho T^2 g adaptive).

    Example:
      >>> import jax.numpy as jnp, sam_optax
      >>> tx = sam_optax.usam(rho=0.5)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> out, _ = tx.update(params, tx.init(params), params, grad_fn=lambda p: p)
      >>> print(out["w"])  # the gradient at w + 0.5 g = 1.5 w
      [ 1.5 -3. ]

    References:
      Andriushchenko and Flammarion, `Towards Understanding Sharpness-Aware Minimization
      <https://arxiv.org/abs/2206.06232>`_, ICML 2022.
    """
    kwargs.setdefault("normalize", False)
    return sam(rho, **kwargs)


stable_sam.__signature__ = _signature_like_sam(stable=True)
asam.__signature__ = _signature_like_sam(("rho", "eta"), rho=0.5, adaptive=True)
usam.__signature__ = _signature_like_sam(normalize=False)
