"""Sharpness-aware minimization (SAM) and its variants as Optax gradient transformations."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

GradFn = Callable[[optax.Params], optax.Updates]
# A pytree of booleans shaped like the params (or a prefix of it), or a function of the params
# returning one. True marks the parameters that the ascent perturbs.
PerturbMask = Any | Callable[[optax.Params], Any]
AxisName = Hashable | Sequence[Hashable]

_MISSING_GRAD_FN = (
    "sam_optax transformations evaluate the gradient at the perturbed weights, so `update` needs "
    "the keyword argument `grad_fn` (a function of the params returning the gradient pytree), "
    "e.g.\n"
    "    updates, opt_state = tx.update(grads, opt_state, params,\n"
    "                                   grad_fn=lambda p: jax.grad(loss_fn)(p, batch))"
)


class SAMState(NamedTuple):
    """State of :func:`sam`: the number of `update` calls so far (drives rho schedules)."""

    count: chex.Array


# --------------------------------------------------------------------------------------------
# Argument checks (construction time; traced values, e.g. under `inject_hyperparams`, pass).
# --------------------------------------------------------------------------------------------


def _concrete_float(value: Any) -> float | None:
    """The value as a float, or None when it is traced (its check happens at trace time)."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _check_args(rho, eta, ascent_norm, ascent_steps) -> None:
    if not callable(rho):
        rho_value = _concrete_float(rho)
        if rho_value is not None and not rho_value >= 0:
            raise ValueError(
                "rho must be a non-negative float (0 turns SAM off) or an optax schedule, "
                f"got {rho!r}."
            )
    eta_value = _concrete_float(eta)
    if eta_value is not None and not eta_value >= 0:
        raise ValueError(f"eta must be >= 0 (ASAM's default is 0.01), got {eta!r}.")
    static_hint = (
        " With optax.inject_hyperparams, list it in static_args=('ascent_norm', 'ascent_steps')."
        if isinstance(ascent_norm, jax.Array) or isinstance(ascent_steps, jax.Array)
        else ""
    )
    if not isinstance(ascent_norm, numbers.Real) or not float(ascent_norm) > 1:
        raise ValueError(
            "ascent_norm is the p of the L-p ball of the ascent and must be a Python number > 1 "
            f"(2.0 for SAM, float('inf') for a sign/FGSM-style ascent), got {ascent_norm!r}."
            + static_hint
        )
    if isinstance(ascent_steps, bool) or not isinstance(ascent_steps, numbers.Integral):
        raise TypeError(f"ascent_steps must be an int >= 1, got {ascent_steps!r}." + static_hint)
    if ascent_steps < 1:
        raise ValueError(f"ascent_steps must be >= 1 (1 is plain SAM), got {ascent_steps!r}.")


# --------------------------------------------------------------------------------------------
# Tree helpers. Norms accumulate in float32 whatever the parameter dtype.
# --------------------------------------------------------------------------------------------


def _to_f32(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _l2_norm(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros([], jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, 0 where the denominator is 0 (a zero gradient gives no NaN)."""
    safe = jnp.where(denominator > 0, denominator, 1.0)
    return jnp.where(denominator > 0, numerator / safe, 0.0)


def _dual_direction(v, p: float):
    """d(v) = argmax over ||e||_p <= 1 of <v, e>, for a float32 pytree v; 0 where v is 0.

    p = 2: v / ||v||_2. p = inf: sign(v). Otherwise, with q = p / (p - 1):
    sign(v) |v|^(q-1) / ||v||_q^(q-1).
    """
    if p == 2:
        inv_norm = _safe_divide(jnp.ones([], jnp.float32), _l2_norm(v))
        return jax.tree.map(lambda x: x * inv_norm, v)
    if math.isinf(p):
        return jax.tree.map(jnp.sign, v)
    q = p / (p - 1.0)
    leaves = jax.tree.leaves(v)
    norm_q = sum(jnp.sum(jnp.abs(x) ** q) for x in leaves) ** (1.0 / q)
    # (|v| / ||v||_q)^(q-1) is |v|^(q-1) / ||v||_q^(q-1) without overflowing |v|^(q-1).
    return jax.tree.map(lambda x: jnp.sign(x) * _safe_divide(jnp.abs(x), norm_q) ** (q - 1.0), v)


def _resolve_mask(perturb_mask: PerturbMask, params):
    if perturb_mask is None:
        return None
    mask = perturb_mask(params) if callable(perturb_mask) else perturb_mask
    # Broadcast a prefix pytree of booleans to one boolean per leaf of params.
    return jax.tree.map(lambda m, p: jax.tree.map(lambda _: bool(m), p), mask, params)


def _apply_mask(tree, mask):
    if mask is None:
        return tree
    return jax.tree.map(lambda x, m: x if m else jnp.zeros_like(x), tree, mask)


def _ascent_direction(
    grads, params, *, adaptive: bool, eta, normalize: bool, ascent_norm: float, mask
):
    """One ascent step of unit radius, in float32: T d(T g) (normalized) or T T g (USAM).

    T = |w| + eta elementwise when adaptive (ASAM), else 1.
    """
    g = _apply_mask(_to_f32(grads), mask)
    if adaptive:
        scale = jax.tree.map(lambda w: jnp.abs(w.astype(jnp.float32)) + eta, params)
        g = jax.tree.map(jnp.multiply, scale, g)
    direction = _dual_direction(g, ascent_norm) if normalize else g
    if adaptive:
        direction = jax.tree.map(jnp.multiply, scale, direction)
    return _apply_mask(direction, mask)


def _add(params, eps):
    return jax.tree.map(lambda w, e: (w.astype(jnp.float32) + e).astype(w.dtype), params, eps)


def _cast_like(tree, reference):
    return jax.tree.map(lambda x, r: jnp.asarray(x).astype(r.dtype), tree, reference)


# --------------------------------------------------------------------------------------------
# StableSAM's renormalization (shared with the variants of _variants.py).
# --------------------------------------------------------------------------------------------

STABLE_NORMS = ("plain", "adaptive")


def _check_stable_args(stable, stable_max_scale, stable_norm, call: str = "sam") -> None:
    if stable_norm not in STABLE_NORMS:
        raise ValueError(
            f"stable_norm must be one of {STABLE_NORMS}, got {stable_norm!r}; e.g. "
            f"{call}(rho, stable=True, stable_norm='adaptive')."
        )
    if stable_max_scale is not None:
        cap = _concrete_float(stable_max_scale)
        if cap is not None and not cap > 0:
            raise ValueError(
                "stable_max_scale caps StableSAM's factor ||g|| / ||g_SAM|| and must be > 0 "
                f"(1.0 is the official code's truncation), got {stable_max_scale!r}."
            )
    if not stable and (stable_max_scale is not None or stable_norm != "plain"):
        raise ValueError(
            "stable_max_scale and stable_norm set StableSAM's renormalization; pass "
            f"stable=True too, e.g. {call}(rho, stable=True, stable_max_scale=1.0)."
        )


def _typed_eps(eps, axis_name):
    """eps in float32, typed as varying over `axis_name` (both branches of a cond agree)."""
    eps = _to_f32(eps)
    return eps if axis_name is None else per_device(eps, axis_name)


def _stable_rescale(g_out, g, params, eps, *, max_scale, norm: str):
    """StableSAM: g_out * min(max_scale, N(g) / N'(g_out)), computed in float32.

    N = N' = the L2 norm for norm="plain"; for "adaptive", N(v) = ||(|w|) v|| and
    N'(v) = ||(|w + eps|) v||, the norms of the official code's adaptive variants.
    """
    if norm == "adaptive":
        scale_w = jax.tree.map(lambda w: jnp.abs(w.astype(jnp.float32)), params)
        scale_p = jax.tree.map(lambda w, e: jnp.abs(w.astype(jnp.float32) + e), params, eps)
        numerator = _l2_norm(jax.tree.map(lambda t, x: t * x.astype(jnp.float32), scale_w, g))
        denominator = _l2_norm(
            jax.tree.map(lambda t, x: t * x.astype(jnp.float32), scale_p, g_out)
        )
    else:
        numerator, denominator = _l2_norm(g), _l2_norm(g_out)
    scale = _safe_divide(numerator, denominator)
    if max_scale is not None:
        scale = jnp.minimum(scale, jnp.asarray(max_scale, jnp.float32))
    return jax.tree.map(lambda x: (x.astype(jnp.float32) * scale).astype(x.dtype), g_out)


# --------------------------------------------------------------------------------------------
# Data parallelism. Inside `jax.shard_map` (check_vma=True) JAX types each value as varying or
# not over the mesh axes, and `jax.grad` with respect to a replicated (non-varying) value sums
# the gradient over the devices. The ascent needs each device's own gradient, so the perturbed
# weights are marked varying before `grad_fn` sees them.
# --------------------------------------------------------------------------------------------


def _axis_names(axis_name: AxisName) -> tuple:
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def _varying_axes(x) -> frozenset:
    """The mesh axes over which x is typed as varying (empty where JAX does not track them)."""
    aval = jax.typeof(x)
    varying = getattr(aval, "vma", None)  # jax < 0.10
    if varying is None:
        varying = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    return frozenset(varying or ())


def per_device(tree, axis_name: AxisName):
    """Marks a replicated pytree as varying over `axis_name`, inside `jax.shard_map`.

    `jax.grad` with respect to the result gives each device's own gradient instead of the sum
    over devices, which is what :func:`sam` with `axis_name` expects::

      grads = jax.grad(loss_fn)(sam_optax.per_device(params, "data"), batch)

    A no-op for values already varying, under `jax.pmap` and under `shard_map(check_vma=False)`.
    """
    names = _axis_names(axis_name)
    cast = getattr(jax.lax, "pcast", None)

    def mark(x):
        missing = tuple(n for n in names if n not in _varying_axes(x))
        if not missing:
            return x
        if cast is not None:
            return cast(x, missing, to="varying")
        return jax.lax.pvary(x, missing)

    return jax.tree.map(mark, tree)


def _check_per_device_gradient(grads, axis_name: AxisName) -> None:
    names = set(_axis_names(axis_name))
    if not names <= _varying_axes(jax.lax.axis_index(axis_name)):
        return  # JAX does not track varying values here (pmap, check_vma=False).
    leaves = jax.tree.leaves(grads)
    if leaves and not any(names & _varying_axes(x) for x in leaves):
        raise ValueError(
            f"sam(axis_name={axis_name!r}) got a gradient that is the same on every device. "
            "Inside jax.shard_map, jax.grad with respect to replicated params already sums "
            "over the devices; pass each device's own gradient instead, e.g.\n"
            f"    grads = jax.grad(loss_fn)(sam_optax.per_device(params, {axis_name!r}), batch)\n"
            "and let sam average it (or drop axis_name if you want no per-device ascent)."
        )


# --------------------------------------------------------------------------------------------
# The ascent.
# --------------------------------------------------------------------------------------------


def _ascend(
    grads,
    params,
    grad_fn: GradFn | None,
    rho,
    *,
    adaptive: bool,
    eta,
    normalize: bool,
    ascent_norm: float,
    ascent_steps: int,
    mask,
    reduce_grads: Callable = lambda g: g,
    axis_name: AxisName | None = None,
    final_gradient: bool = True,
):
    """Runs the ascent from `grads` (already reduced); returns (eps, gradient at w + eps).

    eps_0 = 0, g_0 = g; eps_(i+1) = eps_i + (rho / k) step(g_i), g_(i+1) = reduce(grad_fn(w +
    eps_(i+1))). For k = 1: eps = rho step(g) and one gradient evaluation. The gradient at the
    final point is None when `final_gradient` is False (it is then not computed).
    """
    step = functools.partial(
        _ascent_direction,
        params=params,
        adaptive=adaptive,
        eta=eta,
        normalize=normalize,
        ascent_norm=ascent_norm,
        mask=mask,
    )
    step_size = jnp.asarray(rho, jnp.float32) / ascent_steps

    def gradient_at(eps):
        perturbed = _add(params, eps)
        if axis_name is not None:
            perturbed = per_device(perturbed, axis_name)
        return _cast_like(grad_fn(perturbed), grads)

    def ascent_step(eps, g):
        return jax.tree.map(lambda e, d: e + step_size * d, eps, step(g))

    eps = jax.tree.map(lambda d: step_size * d, step(grads))
    if ascent_steps > 1:
        eps = jax.lax.fori_loop(
            1, ascent_steps, lambda _, e: ascent_step(e, reduce_grads(gradient_at(e))), eps
        )
    return eps, (gradient_at(eps) if final_gradient else None)


def perturbation(
    grads: optax.Updates,
    params: optax.Params,
    *,
    rho: float | jax.Array = 0.05,
    grad_fn: GradFn | None = None,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    normalize: bool = True,
    ascent_norm: float = 2.0,
    ascent_steps: int = 1,
    perturb_mask: PerturbMask = None,
) -> optax.Params:
    """The perturbation eps that :func:`sam` adds to the weights before its second gradient.

    Useful for analysis (e.g. the SAM sharpness L(w + eps) - L(w)). Arguments mean what they mean
    in :func:`sam`; `grad_fn` is needed only for a multi-step ascent (`ascent_steps > 1`).

    Returns:
      eps, a float32 pytree shaped like `params`.
    """
    _check_args(rho, eta, ascent_norm, ascent_steps)
    if ascent_steps > 1 and grad_fn is None:
        raise TypeError("perturbation(..., ascent_steps > 1) needs grad_fn. " + _MISSING_GRAD_FN)
    kwargs = dict(
        adaptive=adaptive,
        eta=eta,
        normalize=normalize,
        ascent_norm=float(ascent_norm),
        mask=_resolve_mask(perturb_mask, params),
    )
    eps, _ = _ascend(
        grads, params, grad_fn, rho, ascent_steps=ascent_steps, final_gradient=False, **kwargs
    )
    return eps


# --------------------------------------------------------------------------------------------
# The transformation.
# --------------------------------------------------------------------------------------------


def sam(
    rho: float | jax.Array | optax.Schedule = 0.05,
    *,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    normalize: bool = True,
    stable: bool = False,
    ascent_norm: float = 2.0,
    ascent_steps: int = 1,
    axis_name: AxisName | None = None,
    sync_ascent: bool = False,
    perturb_mask: PerturbMask = None,
    stable_max_scale: float | jax.Array | None = None,
    stable_norm: str = "plain",
) -> optax.GradientTransformationExtraArgs:
    r"""Sharpness-aware minimization: replaces the gradient by the gradient at an ascent point.

    Chain it in front of any base optimizer, which then sees the SAM gradient::

      tx = optax.chain(sam_optax.sam(rho=0.05), optax.sgd(0.1, momentum=0.9))
      updates, state = tx.update(grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, batch))

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

    All norms are global over the pytree, accumulated in float32. Zero gradients give zeros, never
    NaN. The output has the dtype of `updates`. Each step costs one extra gradient evaluation
    (`grad_fn`), `ascent_steps` with a multi-step ascent, and none on a step where rho is 0.

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
      ascent_norm: p of the L-p ball of the ascent, > 1: 2 (default) for SAM, float('inf') for a
        sign (FGSM-style) ascent.
      ascent_steps: number of ascent steps, >= 1.
      axis_name: inside `jax.shard_map`/`jax.pmap`, the data-parallel axis. `updates` is then each
        device's own gradient: each device perturbs its weights with its own gradient (m-sharpness,
        as Foret et al.), and the output is the SAM gradient averaged over the axis. With `stable`,
        the scale uses the norms of the averaged g and the averaged g_SAM. Do not average the
        gradient yourself first: this transformation does the all-reduce.
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

    Returns:
      An `optax.GradientTransformationExtraArgs` whose `update(updates, state, params, *,
      grad_fn, **extra_args)` needs `params` and `grad_fn(params) -> gradient pytree`.

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
    _check_args(rho, eta, ascent_norm, ascent_steps)
    _check_stable_args(stable, stable_max_scale, stable_norm)
    if sync_ascent and axis_name is None:
        raise ValueError(
            "sync_ascent=True averages gradients over `axis_name`; pass axis_name too."
        )
    ascent_norm = float(ascent_norm)
    rho_schedule = rho if callable(rho) else None
    # A Python number known at construction time picks the branch once; anything else (a schedule
    # or a traced value from `inject_hyperparams`) decides at run time with lax.cond.
    static_rho = None if rho_schedule is not None else _concrete_float(rho)
    if isinstance(rho, jax.Array):
        static_rho = None

    def average(tree):
        return tree if axis_name is None else jax.lax.pmean(tree, axis_name)

    def init_fn(params: optax.Params) -> SAMState:
        del params
        return SAMState(count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: optax.Updates,
        state: SAMState,
        params: optax.Params | None = None,
        *,
        grad_fn: GradFn | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, SAMState]:
        del extra_args
        if grad_fn is None:
            raise TypeError(_MISSING_GRAD_FN)
        if params is None:
            raise ValueError(
                "sam_optax transformations need `params`: call tx.update(grads, state, "
                "params, grad_fn=...)."
            )
        if axis_name is not None:
            _check_per_device_gradient(updates, axis_name)
        rho_now = rho_schedule(state.count) if rho_schedule is not None else rho
        new_state = SAMState(count=optax.safe_increment(state.count))
        mean_grads = average(updates)

        if static_rho == 0:
            return mean_grads, new_state

        def sam_gradient():
            eps, g_perturbed = _ascend(
                mean_grads if sync_ascent else updates,
                params,
                grad_fn,
                rho_now,
                adaptive=adaptive,
                eta=eta,
                normalize=normalize,
                ascent_norm=ascent_norm,
                ascent_steps=ascent_steps,
                mask=_resolve_mask(perturb_mask, params),
                reduce_grads=average if sync_ascent else (lambda g: g),
                axis_name=axis_name,
            )
            return g_perturbed, _typed_eps(eps, axis_name)  # for stable_norm="adaptive"

        if static_rho is None:
            # The rho = 0 branch returns the local gradient, so that the one all-reduce below
            # serves both branches.
            no_eps = _typed_eps(jax.tree.map(jnp.zeros_like, params), axis_name)
            g_sam, eps = jax.lax.cond(
                jnp.asarray(rho_now) > 0, sam_gradient, lambda: (updates, no_eps)
            )
        else:
            g_sam, eps = sam_gradient()
        g_sam = average(g_sam)

        if stable:
            eps = average(eps) if stable_norm == "adaptive" else None
            g_sam = _stable_rescale(
                g_sam, mean_grads, params, eps, max_scale=stable_max_scale, norm=stable_norm
            )
        return g_sam, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def stable_sam(
    rho: float | jax.Array | optax.Schedule = 0.05, **kwargs
) -> optax.GradientTransformationExtraArgs:
    """StableSAM (Tan et al., JMLR 2025): :func:`sam` with ``stable=True``.

    The SAM gradient is rescaled to the norm of the exact gradient, g_SAM ||g|| / ||g_SAM||. Every
    other keyword of :func:`sam` applies; ``stable_sam(normalize=False)`` is the paper's SSAM
    (its "SAM" is the unnormalized ascent).

    References:
      Tan et al., `Stabilizing Sharpness-Aware Minimization Through A Simple Renormalization
      Strategy <https://arxiv.org/abs/2401.07250>`_, JMLR 2025.
    """
    kwargs.setdefault("stable", True)
    return sam(rho, **kwargs)


def asam(
    rho: float | jax.Array | optax.Schedule = 0.5, eta: float | jax.Array = 0.01, **kwargs
) -> optax.GradientTransformationExtraArgs:
    """Adaptive SAM (Kwon et al., ICML 2021): :func:`sam` with ``adaptive=True``.

    eps = rho T^2 g / ||T g||_2 with T = |w| + eta. Defaults rho = 0.5, eta = 0.01 (the paper's
    CIFAR-10 values; CIFAR-100 used rho = 1.0).

    References:
      Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of
      Deep Neural Networks <https://arxiv.org/abs/2102.11600>`_, ICML 2021.
    """
    kwargs.setdefault("adaptive", True)
    return sam(rho, eta=eta, **kwargs)


def usam(
    rho: float | jax.Array | optax.Schedule = 0.05, **kwargs
) -> optax.GradientTransformationExtraArgs:
    """Unnormalized SAM: :func:`sam` with ``normalize=False``, eps = rho g (rho T^2 g adaptive).

    References:
      Andriushchenko and Flammarion, `Towards Understanding Sharpness-Aware Minimization
      <https://arxiv.org/abs/2206.06232>`_, ICML 2022.
    """
    kwargs.setdefault("normalize", False)
    return sam(rho, **kwargs)
