"""Test-wide setup: simulate 8 CPU devices before JAX does anything."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Must run before the first JAX operation; tests that want one device build a 1-device mesh.
jax.config.update("jax_num_cpu_devices", 8)
