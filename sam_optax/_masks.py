"""Boolean masks over parameter trees, for `perturb_mask=` (no Flax import here)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import jax


def _key_name(key: Any) -> Any:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return getattr(key, attribute)
    return key


def layer_mask(tree: Any, prefixes: Collection[tuple], *, model: Any, layers: tuple) -> Any:
    """`tree` with each leaf replaced by whether its path starts with one of `prefixes`, the
    paths of the `layers` found in `model` (none found is an error)."""
    if not prefixes:
        raise ValueError(
            f"{type(model).__name__} has no layer of the types {[t.__name__ for t in layers]}; "
            "pass layers=(MyNorm,) for a normalization layer of your own."
        )
    prefixes = {tuple(prefix) for prefix in prefixes}

    def inside(path: tuple, _: Any) -> bool:
        names = tuple(_key_name(key) for key in path)
        return any(names[: len(prefix)] == prefix for prefix in prefixes)

    return jax.tree_util.tree_map_with_path(inside, tree)
