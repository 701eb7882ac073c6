"""`grad_fn` and micro-batches: evaluated and checked at trace time (free at run time)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

GradFn = Callable[[optax.Params], optax.Updates]

MISSING_GRAD_FN = (
    "sam_optax transformations evaluate the gradient at the perturbed weights, so `update` needs "
    "the keyword argument `grad_fn` (a function of the params returning the gradient pytree), "
    "e.g.\n"
    "    updates, opt_state = tx.update(grads, opt_state, params,\n"
    "                                   grad_fn=lambda p: jax.grad(loss_fn)(p, batch))"
)


def describe(tree: Any, max_leaves: int = 4) -> str:
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


def _check_grad_fn_output(out: Any, like: Any) -> None:
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
            f"structure, shapes and dtypes of the gradient passed to update, {describe(like)}; "
            f"it returned {describe(out)}.{hint}"
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


def evaluate_grad_fn(grad_fn: GradFn, params: optax.Params, like: optax.Updates) -> optax.Updates:
    """grad_fn(params), checked at trace time against `like` (structure, shapes, dtypes).

    For transformations that evaluate the user's `grad_fn`: the error names `grad_fn` and says
    what it returned and what was expected.
    """
    out = grad_fn(params)
    _check_grad_fn_output(out, like)
    return out


def micro_batch_count(micro_batches: Any) -> int:
    """k, the leading-axis size shared by every leaf of `micro_batches`."""
    leaves = jax.tree.leaves(micro_batches)
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if not leaves or None in sizes or len(sizes) != 1:
        raise ValueError(
            "micro_batches must be a pytree of arrays that stack the k micro-batches on a leading "
            "axis of the same size, e.g. jax.tree.map(lambda x: x.reshape(k, -1, *x.shape[1:]), "
            f"batch); got {describe(micro_batches)}."
        )
    return sizes.pop()


def scalar_loss(out: Any, call: str) -> Any:
    """The loss `out` (what a loss_fn returned with has_aux=False), or a TypeError naming
    has_aux=True when it is a tuple (e.g. (loss, logits)): jax.grad's own error is a long
    traceback ending in "Gradient only defined for scalar-output functions"."""
    if isinstance(out, (tuple, list)):
        raise TypeError(
            f"{call}: loss_fn returned a {type(out).__name__} of {len(out)} (e.g. (loss, logits)), "
            f"not a scalar loss: pass has_aux=True, e.g. {call}(loss_fn, ..., has_aux=True) (aux "
            "is dropped)."
        )
    return out


FLAX_HINT = (
    "{module} needs Flax, which is not installed: pip install flax (or pip install "
    '"sam-optax[experiments]"). `import sam_optax` alone needs only JAX and Optax.'
)


def missing_flax(error: ModuleNotFoundError, module: str) -> ModuleNotFoundError:
    """The error to raise for a failed Flax import in `module`: one naming the install when
    Flax itself is missing, `error` otherwise (a module Flax imports)."""
    if error.name is None or error.name.split(".")[0] != "flax":
        return error
    return ModuleNotFoundError(FLAX_HINT.format(module=module), name=error.name)
