"""Shared helpers of the small paper experiments (instability, quadratic, late_phase).

Small data sets that ship inside PyPI packages (no download), a Flax MLP, losses, and writers for
the CSV/markdown tables and figures each experiment leaves in its output folder.
"""

from __future__ import annotations

import csv
import os
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import input_pipeline

DATASETS = ("digits", "mnist5k")

# The SAM variants the experiments compare: name -> (label, sam_optax.sam() keywords). The
# StableSAM paper's "SAM" is the unnormalized ascent (USAM) and its SSAM the renormalized USAM.
SAM_VARIANTS: dict[str, tuple[str, dict]] = {
    "usam": ('USAM (paper\'s "SAM")', dict(normalize=False, stable=False)),
    "ssam-usam": ("StableSAM on USAM (paper's SSAM)", dict(normalize=False, stable=True)),
    "sam": ("SAM, normalized (paper's SAM\u2020)", dict(normalize=True, stable=False)),
    "ssam": ("StableSAM on SAM", dict(normalize=True, stable=True)),
}
SAM_COLORS = {"usam": "C3", "ssam-usam": "C2", "sam": "C1", "ssam": "C0"}


class MLP(nn.Module):
    """A ReLU multilayer perceptron: inputs [batch, features] -> logits [batch, num_outputs]."""

    hidden: Sequence[int] = (64, 64)
    num_outputs: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_outputs)(x)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, -1) == labels)


def tree_norm(tree: Any) -> jax.Array:
    return optax.tree.norm(tree)


def load_dataset(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Returns (x_train, y_train, x_test, y_test): flattened float32 pixels in [0, 1], centred.

    The images and the fixed, stratified train/test split of the training pipeline's
    ``input_pipeline.load_dataset`` (``digits``: 1,438 / 359, ``mnist5k``: 4,000 / 1,000); both
    ship with their package, nothing is downloaded.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {DATASETS}.")
    data = input_pipeline.load_dataset(name, validation_size=0)

    def features(images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1).astype(np.float32) / 255.0

    x_train, x_test = features(data.train_images), features(data.test_images)
    mean = x_train.mean(0, keepdims=True)
    return x_train - mean, data.train_labels, x_test - mean, data.test_labels


def teacher_dataset(
    seed: int, num_examples: int, dim: int, num_classes: int, hidden: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic classification: Gaussian inputs labelled by a random two-layer tanh teacher."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_examples, dim)).astype(np.float32)
    w1 = rng.normal(size=(dim, hidden)) / np.sqrt(dim)
    w2 = rng.normal(size=(hidden, num_classes)) / np.sqrt(hidden)
    y = np.argmax(np.tanh(x @ w1) @ w2, axis=1).astype(np.int32)
    return x, y


def write_table(rows: Sequence[dict[str, Any]], path_csv: str, path_md: str | None = None) -> None:
    """Writes rows (dicts with the same keys) as CSV and, optionally, a markdown table."""
    if not rows:
        raise ValueError("no rows to write")
    keys = list(rows[0])
    with open(path_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    if path_md is not None:
        with open(path_md, "w") as f:
            f.write(markdown_table(rows) + "\n")


def _format(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_format(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The shell command that reproduces a run: ``python -m module`` plus its flags."""
    flags = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python -m", module, *map(shlex.quote, flags)])


def prepare_output_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start
