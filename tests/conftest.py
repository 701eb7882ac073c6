"""Test-wide setup: simulate 8 CPU devices before JAX does anything."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Must run before the first JAX operation; tests that want one device build a 1-device mesh.
jax.config.update("jax_num_cpu_devices", 8)


def pytest_collection_modifyitems(items):
    """The long end-to-end tests (marked slow) first: under ``pytest -n 2`` they then overlap the
    short ones rather than running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
