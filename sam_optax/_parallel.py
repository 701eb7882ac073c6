"""Data parallelism of the ascent: per-device gradients inside `jax.shard_map`.

Inside `jax.shard_map` (check_vma=True) JAX types each value as varying or not over the mesh
axes, and `jax.grad` with respect to a replicated (non-varying) value sums the gradient over the
devices. The ascent needs each device's own gradient, so the perturbed weights are marked varying
before `grad_fn` sees them.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax

AxisName = Hashable | Sequence[Hashable]


def average(tree: Any, axis_name: AxisName | None) -> Any:
    """The mean of `tree` over `axis_name` (the tree itself without an axis)."""
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


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


def _mark_varying(x: jax.Array, axes: tuple) -> jax.Array:
    """x typed as varying over `axes`; jax.lax.pcast replaced jax.lax.pvary in newer JAX."""
    cast = getattr(jax.lax, "pcast", None)
    return cast(x, axes, to="varying") if cast is not None else jax.lax.pvary(x, axes)


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

    def mark(x):
        missing = tuple(n for n in names if n not in _varying_axes(x))
        return _mark_varying(x, missing) if missing else x

    return jax.tree.map(mark, tree)


def varying_like(tree: Any, *inputs: Any) -> Any:
    """`tree` marked varying over every mesh axis any leaf of `inputs` varies over.

    Inside `jax.shard_map`, the initial carry of a `lax.scan` that accumulates gradients must be
    as varying as the gradients (which vary like the params and the batch they come from).
    """
    axes = frozenset().union(*(_varying_axes(x) for x in jax.tree.leaves(inputs)))
    if not axes:
        return tree

    def mark(x):
        missing = tuple(sorted(axes - _varying_axes(x), key=str))
        return _mark_varying(x, missing) if missing else x

    return jax.tree.map(mark, tree)


def check_per_device_gradient(grads: Any, axis_name: AxisName) -> None:
    """Raises where `grads` is typed as the same on every device of `axis_name`."""
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
