"""Pytree and dtype helpers of the ascent.

The ascent, its norms and the perturbed weights are computed in the "wide" dtype: the promoted
dtype of a value and float32, i.e. float32 for bfloat16/float16/float32 values and float64 for
float64 ones (with jax_enable_x64). Where `optax.tree` has the operation it is used.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax


def wide_dtype(dtype: Any) -> jnp.dtype:
    """float32, or the given dtype if it is a wider float."""
    return jnp.promote_types(dtype, jnp.float32)


def float_dtype(tree: Any) -> jnp.dtype:
    """The promoted dtype of the leaves of `tree` and float32."""
    dtypes = [jnp.result_type(x) for x in jax.tree.leaves(tree)]
    return functools.reduce(jnp.promote_types, dtypes, jnp.dtype(jnp.float32))


def to_wide(tree: Any) -> Any:
    """Each leaf in its wide dtype: float32 for 16-bit floats, float64 stays float64."""
    return jax.tree.map(lambda x: jnp.asarray(x).astype(wide_dtype(jnp.result_type(x))), tree)


def zeros_wide(tree: Any) -> Any:
    """Zeros shaped like `tree`, each leaf in its wide dtype."""
    return jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), wide_dtype(jnp.result_type(x))), tree)


def cast_like(tree: Any, reference: Any) -> Any:
    """`tree` with the dtypes of `reference`."""
    return optax.tree.cast_like(jax.tree.map(jnp.asarray, tree), reference)


def l2_norm(tree: Any) -> jax.Array:
    """Global L2 norm, accumulated in the wide dtype (float64 when a leaf is float64)."""
    if not jax.tree.leaves(tree):
        return jnp.zeros([], jnp.float32)
    return optax.tree.norm(to_wide(tree))


def inner(a: Any, b: Any) -> jax.Array:
    """<a, b> = Re sum(conj(a) b) over two pytrees of the same structure, accumulated in the wide
    dtype: the real inner product of the (Re, Im) pairs for complex leaves, sum(a b) for real."""
    leaves = [
        jnp.sum(jnp.real(jnp.conj(x.astype(wide_dtype(x.dtype))) * y.astype(wide_dtype(y.dtype))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return sum(leaves) if leaves else jnp.zeros([], jnp.float32)


def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, 0 where the denominator is 0 (a zero gradient gives no NaN)."""
    safe = jnp.where(denominator > 0, denominator, 1.0)
    return jnp.where(denominator > 0, numerator / safe, 0.0)


def projection_coefficient(v: Any, u: Any) -> jax.Array:
    """<v, u> / ||u||^2 (0 for u = 0): v - c u is the part of v orthogonal to u. Written with
    the two sums over the same arrays and no normalized copy of u, so that a whole projection
    costs one reduction pass and one elementwise pass over the parameters."""
    return safe_divide(inner(v, u), inner(u, u))


def all_finite(tree: Any) -> jax.Array:
    """A scalar boolean: every element of every leaf is finite."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.asarray(True)
    return functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(x)) for x in leaves])


def where_finite(out: Any, new: Any, old: Any) -> Any:
    """`new` if every element of `out` is finite, else `old`: a buffer keeps its value on a
    step whose output is not finite (the step `optax.apply_if_finite` skips)."""
    return optax.tree.where(all_finite(out), new, old)


def nan_unless(ok: jax.Array, tree: Any) -> Any:
    """`tree` where `ok`, else NaN everywhere: a non-finite input is never hidden."""
    return jax.tree.map(lambda x: jnp.where(ok, x, jnp.asarray(jnp.nan, x.dtype)), tree)


def add_wide(params: Any, eps: Any) -> Any:
    """w + eps in the promoted dtype of w, eps and float32, rounded back to w's dtype."""

    def add(w, e):
        dtype = jnp.promote_types(wide_dtype(jnp.result_type(w)), jnp.result_type(e))
        return (jnp.asarray(w, dtype) + e).astype(jnp.result_type(w))

    return jax.tree.map(add, params, eps)


# The scalars below are cast to each leaf's dtype (optax.tree.add_scale would promote the leaf
# to the scalar's dtype instead), so that a float32 buffer stays float32.


def axpby(a: Any, x: Any, b: Any, y: Any) -> Any:
    """a * x + b * y, leaf by leaf, for scalars a and b."""
    return jax.tree.map(
        lambda xi, yi: jnp.asarray(a, xi.dtype) * xi + jnp.asarray(b, yi.dtype) * yi, x, y
    )


def axpy(a: Any, x: Any, y: Any) -> Any:
    """a * x + y, leaf by leaf, for a scalar a."""
    return jax.tree.map(lambda xi, yi: jnp.asarray(a, xi.dtype) * xi + yi, x, y)


def apply_mask(tree: Any, mask: Any) -> Any:
    """Zeros where `mask` (one boolean per leaf, or None for all True) is False."""
    if mask is None:
        return tree
    return jax.tree.map(lambda x, m: x if m else jnp.zeros_like(x), tree, mask)
