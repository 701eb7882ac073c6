"""Sharpness-aware minimization (SAM) and its variants as Optax gradient transformations."""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import sys
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _composition
from sam_optax._typing import Schedule

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

    count: jax.Array


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
    """Construction-time checks; None stands for the defaults of ascent_norm (2) and steps (1)."""
    if not callable(rho):
        rho_value = _concrete_float(rho)
        if rho_value is not None and not (rho_value >= 0 and math.isfinite(rho_value)):
            raise ValueError(
                "rho must be a non-negative, finite float (0 turns SAM off) or an optax "
                f"schedule, got rho={rho!r}; e.g. sam_optax.sam(rho=0.05)."
            )
    eta_value = _concrete_float(eta)
    if eta_value is not None and not (eta_value >= 0 and math.isfinite(eta_value)):
        raise ValueError(
            f"eta must be >= 0 and finite (ASAM's default is 0.01), got eta={eta!r}; "
            "e.g. sam_optax.asam(rho=0.5, eta=0.01)."
        )
    static_hint = (
        " With optax.inject_hyperparams, list it in static_args=('ascent_norm', 'ascent_steps'),"
        " e.g. optax.inject_hyperparams(sam_optax.sam, static_args=('ascent_norm',))"
        "(rho=0.05, ascent_norm=float('inf'))."
        if isinstance(ascent_norm, jax.Array) or isinstance(ascent_steps, jax.Array)
        else ""
    )
    if ascent_norm is not None and (
        isinstance(ascent_norm, bool)
        or not isinstance(ascent_norm, numbers.Real)
        or not float(ascent_norm) > 1
    ):
        raise ValueError(
            "ascent_norm is the p of the L-p ball of the ascent and must be a Python number > 1 "
            f"(2.0 for SAM, float('inf') for a sign/FGSM-style ascent), got {ascent_norm!r}."
            + static_hint
        )
    if ascent_steps is None:
        return
    if isinstance(ascent_steps, bool) or not isinstance(ascent_steps, numbers.Integral):
        raise TypeError(f"ascent_steps must be an int >= 1, got {ascent_steps!r}." + static_hint)
    if ascent_steps < 1:
        raise ValueError(f"ascent_steps must be >= 1 (1 is plain SAM), got {ascent_steps!r}.")


def _ascent_norm_value(ascent_norm) -> float:
    return 2.0 if ascent_norm is None else float(ascent_norm)


def _ascent_steps_value(ascent_steps) -> int:
    return 1 if ascent_steps is None else int(ascent_steps)


# --------------------------------------------------------------------------------------------
# Tree helpers. The ascent, its norms and the perturbed weights are computed in the promoted
# dtype of the parameters and float32: float32 for bfloat16/float16/float32 parameters, float64
# for float64 parameters (with jax_enable_x64).
# --------------------------------------------------------------------------------------------


def _at_least_f32(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def _float_dtype(tree) -> jnp.dtype:
    """The promoted dtype of the leaves of `tree` and float32."""
    dtypes = [jnp.result_type(x) for x in jax.tree.leaves(tree)]
    return functools.reduce(jnp.promote_types, dtypes, jnp.dtype(jnp.float32))


def _to_f32(tree):
    """Each leaf in at least float32: float32 for 16-bit floats, float64 stays float64."""
    return jax.tree.map(lambda x: jnp.asarray(x).astype(_at_least_f32(jnp.result_type(x))), tree)


def _l2_norm(tree) -> jax.Array:
    """Global L2 norm, accumulated in at least float32 (float64 when a leaf is float64)."""
    leaves = jax.tree.leaves(_to_f32(tree))
    if not leaves:
        return jnp.zeros([], jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in leaves))


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, 0 where the denominator is 0 (a zero gradient gives no NaN)."""
    safe = jnp.where(denominator > 0, denominator, 1.0)
    return jnp.where(denominator > 0, numerator / safe, 0.0)


def _all_finite(tree) -> jax.Array:
    """A scalar boolean: every element of every leaf is finite."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.asarray(True)
    return functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(x)) for x in leaves])


def _nan_unless(ok: jax.Array, tree):
    """`tree` where `ok`, else NaN everywhere: a non-finite input is never hidden."""
    return jax.tree.map(lambda x: jnp.where(ok, x, jnp.asarray(jnp.nan, x.dtype)), tree)


def _dual_direction(v, p: float):
    """d(v) = argmax over ||e||_p <= 1 of <v, e>, for a float32 pytree v; 0 where v is 0.

    p = 2: v / ||v||_2. p = inf: sign(v). Otherwise, with q = p / (p - 1):
    sign(v) |v|^(q-1) / ||v||_q^(q-1). Computed in the dtype of v (at least float32).
    """
    if p == 2:
        norm = _l2_norm(v)
        inv_norm = _safe_divide(jnp.ones([], norm.dtype), norm)
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
    if any(isinstance(m, jax.core.Tracer) for m in jax.tree.leaves(mask)):
        raise TypeError(
            "perturb_mask must hold Python booleans (it decides the program's shape), got traced "
            "values. With optax.inject_hyperparams, list it in static_args, e.g. "
            "optax.inject_hyperparams(sam_optax.sam, static_args=('perturb_mask',))(rho=0.05, "
            "perturb_mask=mask)."
        )
    # Broadcast a prefix pytree of booleans to one boolean per leaf of params.
    mask = jax.tree.map(lambda m, p: jax.tree.map(lambda _: bool(m), p), mask, params)
    if jax.tree.leaves(params) and not any(jax.tree.leaves(mask)):
        raise ValueError(
            f"perturb_mask marks no parameter (it resolved to {perturb_mask!r} for every leaf), so "
            "the ascent would do nothing. With optax.inject_hyperparams, a function perturb_mask "
            "is taken for a schedule: list it in static_args, e.g. "
            "optax.inject_hyperparams(sam_optax.sam, static_args=('perturb_mask',))(rho=0.05, "
            "perturb_mask=fn)."
        )
    return mask


def _apply_mask(tree, mask):
    if mask is None:
        return tree
    return jax.tree.map(lambda x, m: x if m else jnp.zeros_like(x), tree, mask)


def _ascent_direction(
    grads, params, *, adaptive: bool, eta, normalize: bool, ascent_norm: float, mask
):
    """One ascent step of unit radius, at least float32: T d(T g) (normalized) or T T g (USAM).

    T = |w| + eta elementwise when adaptive (ASAM), else 1.
    """
    g = _apply_mask(_to_f32(grads), mask)
    if adaptive:
        scale = jax.tree.map(lambda w: jnp.abs(w) + eta, _to_f32(params))
        g = jax.tree.map(jnp.multiply, scale, g)
    direction = _dual_direction(g, ascent_norm) if normalize else g
    if adaptive:
        direction = jax.tree.map(jnp.multiply, scale, direction)
    return _apply_mask(direction, mask)


def _add(params, eps):
    """w + eps in the promoted dtype of w, eps and float32, rounded back to w's dtype."""

    def add(w, e):
        dtype = jnp.promote_types(_at_least_f32(jnp.result_type(w)), jnp.result_type(e))
        return (jnp.asarray(w, dtype) + e).astype(jnp.result_type(w))

    return jax.tree.map(add, params, eps)


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
    """StableSAM: g_out * min(max_scale, N(g) / N'(g_out)), in at least float32.

    N = N' = the L2 norm for norm="plain"; for "adaptive", N(v) = ||(|w|) v|| and
    N'(v) = ||(|w + eps|) v||, the norms of the official code's adaptive variants. NaN everywhere
    if a norm is not finite, so that a non-finite gradient is never rescaled away.
    """
    if norm == "adaptive":
        numerator = _l2_norm(jax.tree.map(lambda w, x: jnp.abs(_to_f32(w)) * _to_f32(x), params, g))
        denominator = _l2_norm(
            jax.tree.map(lambda w, e, x: jnp.abs(_to_f32(w) + e) * _to_f32(x), params, eps, g_out)
        )
    else:
        numerator, denominator = _l2_norm(g), _l2_norm(g_out)
    scale = _safe_divide(numerator, denominator)
    if max_scale is not None:
        scale = jnp.minimum(scale, jnp.asarray(max_scale, scale.dtype))
    finite = jnp.isfinite(numerator) & jnp.isfinite(denominator)
    return _nan_unless(finite, jax.tree.map(lambda x: (_to_f32(x) * scale).astype(x.dtype), g_out))


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


def _tracks_varying(axis_name: AxisName) -> bool:
    """Whether JAX types values as varying over `axis_name` here: inside `jax.shard_map` with
    check_vma=True; not under `jax.vmap`, `jax.pmap` or `shard_map(check_vma=False)`."""
    names = set(_axis_names(axis_name))
    return names <= _varying_axes(jax.lax.axis_index(axis_name))


def per_device(tree: Any, axis_name: AxisName) -> Any:
    """Marks a replicated pytree as varying over `axis_name`, inside `jax.shard_map`.

    `jax.grad` with respect to the result gives each device's own gradient instead of the sum
    over devices, which is what :func:`sam` with `axis_name` expects::

      grads = jax.grad(loss_fn)(sam_optax.per_device(params, "data"), batch)

    A no-op for values already varying, under `jax.vmap` (m-sharpness on one device), under
    `jax.pmap` and under `shard_map(check_vma=False)`: there the gradient is already each
    device's (or each vmapped sub-batch's) own.
    """
    names = _axis_names(axis_name)
    if not _tracks_varying(axis_name):
        return tree
    cast = getattr(jax.lax, "pcast", None)

    def mark(x):
        missing = tuple(n for n in names if n not in _varying_axes(x))
        if not missing:
            return x
        if cast is not None:
            return cast(x, missing, to="varying")
        return jax.lax.pvary(x, missing)

    return jax.tree.map(mark, tree)


def _varying_like(tree, *inputs):
    """`tree` marked varying over every mesh axis any leaf of `inputs` varies over.

    Inside `jax.shard_map`, the initial carry of a `lax.scan` that accumulates gradients must be
    as varying as the gradients (which vary like the params and the batch they come from).
    """
    axes = frozenset().union(*(_varying_axes(x) for x in jax.tree.leaves(inputs)))
    if not axes:
        return tree
    cast = getattr(jax.lax, "pcast", None)

    def mark(x):
        missing = tuple(sorted(axes - _varying_axes(x), key=str))
        if not missing:
            return x
        return cast(x, missing, to="varying") if cast is not None else jax.lax.pvary(x, missing)

    return jax.tree.map(mark, tree)


def _check_per_device_gradient(grads, axis_name: AxisName) -> None:
    names = set(_axis_names(axis_name))
    if not _tracks_varying(axis_name):
        return  # JAX does not track varying values here (vmap, pmap, check_vma=False).
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
# grad_fn: evaluated and checked against the gradient at trace time (free at run time).
# --------------------------------------------------------------------------------------------


def _describe(tree, max_leaves: int = 4) -> str:
    """A short description of a pytree: its type and its leaves' dtypes and shapes."""

    def leaf(x):
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"
        return type(x).__name__

    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    if len(leaves) == 1 and not leaves[0][0]:
        return f"a single leaf {leaf(leaves[0][1])}"
    shown = ", ".join(f"{jax.tree_util.keystr(path)}: {leaf(x)}" for path, x in leaves[:max_leaves])
    more = f", ... ({len(leaves)} leaves)" if len(leaves) > max_leaves else ""
    return f"a {type(tree).__name__} {{{shown}{more}}}"


def _is_variable(x) -> bool:
    """A flax.nnx Variable (a pytree node holding an array), recognized without importing flax."""
    return type(x).__module__.startswith("flax.") and hasattr(x, "get_value")


def _has_variables(tree) -> bool:
    return any(map(_is_variable, jax.tree.leaves(tree, is_leaf=_is_variable)))


def _check_grad_fn_output(out, like) -> None:
    """Raises if `out` (what grad_fn returned) is not a gradient shaped like `like`."""
    expected = jax.tree.structure(like)
    got = jax.tree.structure(out)
    if got != expected:
        hint = ""
        if isinstance(out, (tuple, list)) and len(out) == 2:
            if jax.tree.structure(out[1]) == expected:
                hint = (
                    " It looks like (loss, grads): return only the gradient: jax.grad(...), not "
                    "jax.value_and_grad(...)."
                )
            elif jax.tree.structure(out[0]) == expected:
                hint = (
                    " It looks like (grads, aux): return only the gradient, e.g. "
                    "lambda p: jax.grad(loss_fn, has_aux=True)(p, batch)[0]."
                )
        elif got.num_leaves == 1 and expected.num_leaves != 1:
            hint = " A single array: return the gradient pytree, not the loss."
        if not hint and (_has_variables(out) or _has_variables(like)):
            hint = (
                " It holds flax.nnx Variables: nnx.Optimizer passes pure arrays (nnx.as_pure) and "
                "grad_fn must return them too; build it with "
                "sam_optax.nnx.grad_fn(loss_fn, model, *batch)."
            )
        raise TypeError(
            "grad_fn must return the gradient at the params it is given, a pytree with the "
            f"structure, shapes and dtypes of the gradient passed to update, {_describe(like)}; "
            f"it returned {_describe(out)}.{hint}"
        )
    bad = []
    for (path, x), y in zip(
        jax.tree_util.tree_flatten_with_path(out)[0], jax.tree.leaves(like), strict=True
    ):
        if jnp.shape(x) != jnp.shape(y) or jnp.result_type(x) != jnp.result_type(y):
            bad.append(
                f"{jax.tree_util.keystr(path) or 'the output'}: got "
                f"{jnp.result_type(x).name}{list(jnp.shape(x))}, expected "
                f"{jnp.result_type(y).name}{list(jnp.shape(y))}"
            )
    if bad:
        shown = "; ".join(bad[:4]) + (f"; ... ({len(bad)} leaves)" if len(bad) > 4 else "")
        raise ValueError(
            "grad_fn must return the gradient at the params it is given, with the shapes and "
            f"dtypes of the gradient passed to update; it returned {shown}. Return "
            "jax.grad(loss_fn)(p, batch) for the params p it receives (same dtype as the "
            "gradient you pass, e.g. cast with jax.tree.map(lambda g: g.astype(...), grads))."
        )


def _evaluate_grad_fn(grad_fn: GradFn, params: optax.Params, like: optax.Updates) -> optax.Updates:
    """grad_fn(params), checked at trace time against `like` (structure, shapes, dtypes).

    For transformations that evaluate the user's `grad_fn`: the error names `grad_fn` and says
    what it returned and what was expected.
    """
    out = grad_fn(params)
    _check_grad_fn_output(out, like)
    return out


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
    final point is None when `final_gradient` is False (it is then not computed). eps is in the
    promoted dtype of the params and float32; the gradient has the dtype of `grads`. Both are NaN
    everywhere when g or a gradient evaluated on the way has a non-finite element.
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
    step_size = jnp.asarray(rho, _float_dtype(params)) / ascent_steps

    def gradient_at(eps):
        perturbed = _add(params, eps)
        if axis_name is not None:
            perturbed = per_device(perturbed, axis_name)
        return _cast_like(_evaluate_grad_fn(grad_fn, perturbed, grads), grads)

    def ascent_step(eps, g):
        return jax.tree.map(lambda e, d: e + step_size * d, eps, step(g))

    # A non-finite element in g (or in a gradient evaluated on the way) makes every output NaN:
    # some ascents would hide it otherwise (sign(inf) = 1, a NaN norm switching the ascent off).
    finite = _all_finite(grads)
    eps = jax.tree.map(lambda d: step_size * d, step(grads))
    if ascent_steps > 1:

        def body(_, carry):
            eps, finite = carry
            g = reduce_grads(gradient_at(eps))
            return ascent_step(eps, g), finite & _all_finite(g)

        eps, finite = jax.lax.fori_loop(1, ascent_steps, body, (eps, finite))
    if not final_gradient:
        return _nan_unless(finite, eps), None
    g_final = gradient_at(eps)
    finite = finite & _all_finite(g_final)
    return _nan_unless(finite, eps), _nan_unless(finite, g_final)


def perturbation(
    grads: optax.Updates,
    params: optax.Params,
    *,
    rho: float | jax.Array = 0.05,
    grad_fn: GradFn | None = None,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    normalize: bool = True,
    ascent_norm: float | None = 2.0,
    ascent_steps: int | None = 1,
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
    _check_args(rho, eta, ascent_norm, ascent_steps)
    ascent_steps = _ascent_steps_value(ascent_steps)
    if ascent_steps > 1 and grad_fn is None:
        raise TypeError("perturbation(..., ascent_steps > 1) needs grad_fn. " + _MISSING_GRAD_FN)
    kwargs = dict(
        adaptive=adaptive,
        eta=eta,
        normalize=normalize,
        ascent_norm=_ascent_norm_value(ascent_norm),
        mask=_resolve_mask(perturb_mask, params),
    )
    eps, _ = _ascend(
        grads, params, grad_fn, rho, ascent_steps=ascent_steps, final_gradient=False, **kwargs
    )
    return eps


# --------------------------------------------------------------------------------------------
# The transformation.
# --------------------------------------------------------------------------------------------


def _inside_multi_steps() -> bool:
    """Whether `optax.MultiSteps.update` is on the call stack (checked when the step traces)."""
    code = getattr(getattr(getattr(optax, "MultiSteps", None), "update", None), "__code__", None)
    frame = sys._getframe(1)
    while frame is not None and code is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


_MULTI_STEPS_WARNING = (
    "sam_optax.sam inside optax.MultiSteps: at every micro-batch the ascent starts from the "
    "running mean of the gradients and evaluates that micro-batch's grad_fn, and only the last "
    "call's result is kept, so the SAM gradient comes from the last micro-batch alone (neither SAM "
    "on the whole batch nor per-micro-batch SAM) and k - 1 second passes are wasted. Inside one "
    "step, use grad_fn=sam_optax.accumulate_grad_fn(per_batch_grad_fn, micro_batches) (the ascent "
    "from the mean gradient) or tx.update(None, state, params, grad_fn=per_batch_grad_fn, "
    "micro_batches=micro_batches) (one ascent per micro-batch)."
)


def _micro_batch_count(micro_batches) -> int:
    leaves = jax.tree.leaves(micro_batches)
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if not leaves or None in sizes or len(sizes) != 1:
        raise ValueError(
            "micro_batches must be a pytree of arrays that stack the k micro-batches on a leading "
            "axis of the same size, e.g. jax.tree.map(lambda x: x.reshape(k, -1, *x.shape[1:]), "
            f"batch); got {_describe(micro_batches)}."
        )
    return sizes.pop()


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
    update), which then sees the SAM gradient.

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
        Costs one more `grad_fn` evaluation on the first step; nothing when False (default).

    Returns:
      An `optax.GradientTransformationExtraArgs` whose `update(updates, state, params, *,
      grad_fn, micro_batches=None, **extra_args)` needs `params` and `grad_fn(params) ->
      gradient pytree`. With `micro_batches` (a pytree whose leaves stack k micro-batches on a
      leading axis), `grad_fn(params, micro_batch)` takes one micro-batch and each micro-batch
      ascends from its own gradient (m-sharpness with m = the micro-batch size; `updates` is not
      used, pass None): a `lax.scan`, so memory grows with the micro-batch, not with k. The k
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
    _check_args(rho, eta, ascent_norm, ascent_steps)
    _check_stable_args(stable, stable_max_scale, stable_norm)
    if sync_ascent and axis_name is None:
        raise ValueError(
            "sync_ascent=True averages gradients over `axis_name`; pass axis_name too, e.g. "
            "sam_optax.sam(0.05, axis_name='data', sync_ascent=True)."
        )
    ascent_norm = _ascent_norm_value(ascent_norm)
    ascent_steps = _ascent_steps_value(ascent_steps)
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
        micro_batches: Any = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, SAMState]:
        del extra_args
        params = _composition.check_inputs(
            updates, params, grad_fn, call="sam", micro_batches=micro_batches
        )
        if grad_fn is None:
            raise TypeError(_MISSING_GRAD_FN)
        if params is None:
            raise ValueError(
                "sam_optax transformations need `params`: call tx.update(grads, state, "
                "params, grad_fn=...)."
            )
        if check_input_gradient:
            _composition.check_input_gradient(
                updates, params, grad_fn, state.count, call="sam", axis_name=axis_name
            )
        if _inside_multi_steps():
            warnings.warn(_MULTI_STEPS_WARNING, stacklevel=2)
        rho_now = rho_schedule(state.count) if rho_schedule is not None else rho
        new_state = SAMState(count=optax.safe_increment(state.count))
        mask = _resolve_mask(perturb_mask, params)

        def sam_gradient(grads, fn, reduce_grads=lambda g: g):
            eps, g_perturbed = _ascend(
                grads,
                params,
                fn,
                rho_now,
                adaptive=adaptive,
                eta=eta,
                normalize=normalize,
                ascent_norm=ascent_norm,
                ascent_steps=ascent_steps,
                mask=mask,
                reduce_grads=reduce_grads,
                axis_name=axis_name,
            )
            return g_perturbed, _typed_eps(eps, axis_name)  # eps for stable_norm="adaptive"

        def maybe_sam_gradient(grads, fallback, fn, reduce_grads=lambda g: g):
            """(gradient at w + eps, eps), or (fallback, 0) where rho is 0."""
            no_eps = _typed_eps(jax.tree.map(jnp.zeros_like, params), axis_name)
            if static_rho == 0:
                return fallback, no_eps
            if static_rho is None:
                return jax.lax.cond(
                    jnp.asarray(rho_now) > 0,
                    lambda: sam_gradient(grads, fn, reduce_grads),
                    lambda: (fallback, no_eps),
                )
            return sam_gradient(grads, fn, reduce_grads)

        if micro_batches is not None:
            if sync_ascent:
                raise ValueError(
                    "micro_batches gives every micro-batch its own ascent; sync_ascent=True asks "
                    "for one ascent from the averaged gradient. For that (SAM on the whole "
                    "batch), pass grad_fn=sam_optax.accumulate_grad_fn(per_batch_grad_fn, "
                    "micro_batches) and no micro_batches."
                )
            like = params if updates is None else updates
            k = _micro_batch_count(micro_batches)
            local_params = params if axis_name is None else per_device(params, axis_name)

            def body(carry, batch):
                def fn(p):
                    return grad_fn(p, batch)

                g = _cast_like(_evaluate_grad_fn(fn, local_params, like), like)
                g_sam, eps = maybe_sam_gradient(g, g, fn)
                sums = jax.tree.map(lambda t, x: t + _to_f32(x), carry[:2], (g, g_sam))
                return (*sums, jax.tree.map(jnp.add, carry[2], eps)), None

            zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), _float_dtype(x)), like)
            zeros = _varying_like(zeros, local_params, micro_batches)
            zero_eps = _typed_eps(jax.tree.map(jnp.zeros_like, params), axis_name)
            zero_eps = _varying_like(zero_eps, local_params, micro_batches)
            (sum_g, sum_sam, sum_eps), _ = jax.lax.scan(
                body, (zeros, zeros, zero_eps), micro_batches
            )
            mean_grads = average(_cast_like(jax.tree.map(lambda t: t / k, sum_g), like))
            g_sam = average(_cast_like(jax.tree.map(lambda t: t / k, sum_sam), like))
            # stable_norm="adaptive" weighs by |w + eps| with eps averaged over micro-batches.
            eps = jax.tree.map(lambda t: t / k, sum_eps)
        else:
            if axis_name is not None:
                _check_per_device_gradient(updates, axis_name)
            mean_grads = average(updates)
            if static_rho == 0:
                return mean_grads, new_state
            # The rho = 0 branch returns the local gradient, so that the one all-reduce below
            # serves both branches.
            g_sam, eps = maybe_sam_gradient(
                mean_grads if sync_ascent else updates,
                updates,
                grad_fn,
                average if sync_ascent else (lambda g: g),
            )
            g_sam = average(g_sam)

        if stable:
            eps = average(eps) if stable_norm == "adaptive" else None
            g_sam = _stable_rescale(
                g_sam, mean_grads, params, eps, max_scale=stable_max_scale, norm=stable_norm
            )
        return g_sam, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
