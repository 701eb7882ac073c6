"""Test-wide setup: simulate 8 CPU devices before JAX does anything."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gzip  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Must run before the first JAX operation; tests that want one device build a 1-device mesh.
jax.config.update("jax_num_cpu_devices", 8)


def pytest_collection_modifyitems(items):
    """The long end-to-end tests (marked slow) first: under ``pytest -n 2`` they then overlap the
    short ones rather than running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory):
    """Four tiny Fashion-MNIST IDX files: class-dependent blobs, learnable in a few steps."""
    folder = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)

    def images(labels):
        x = rng.integers(0, 60, (len(labels), 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            x[i, 2 * label : 2 * label + 6, 4:24] = 250
        return x

    train_y = (np.arange(96) % 10).astype(np.uint8)
    test_y = (np.arange(40) % 10).astype(np.uint8)
    for name, array in zip(
        IDX_NAMES, (images(train_y), train_y, images(test_y), test_y), strict=True
    ):
        with gzip.open(folder / (name + ".gz"), "wb") as f:
            f.write(_idx_bytes(array))
    return str(folder)
