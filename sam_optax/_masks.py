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


def mask_under(tree: Any, prefixes: Collection[tuple]) -> Any:
    """`tree` with each leaf replaced by whether its path starts with one of `prefixes`."""
    prefixes = {tuple(prefix) for prefix in prefixes}

    def inside(path: tuple, _: Any) -> bool:
        names = tuple(_key_name(key) for key in path)
        return any(names[: len(prefix)] == prefix for prefix in prefixes)

    return jax.tree_util.tree_map_with_path(inside, tree)
