"""What the papers' small experiments share: the methods they compare, a Flax MLP, losses,
the small data sets that ship inside PyPI packages (no download), and synthetic teacher data.
Each experiment's flags come from the fields of its configuration (:mod:`experiments.flags`).

Tables, numbers and figures are written with :mod:`experiments.reporting`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import data, optimizer_registry, reporting, runtime

DATASETS = ("digits", "mnist5k")

# The variants the StableSAM paper compares, in the order of its figures: its "SAM" (USAM), its
# SSAM (StableSAM on USAM), Foret et al.'s normalized SAM (its SAM-dagger) and StableSAM on it.
STABLESAM_VARIANTS: tuple[str, ...] = ("usam", "stable_usam", "sam", "stable_sam")

# Plain (stochastic) gradient descent, the baseline of every figure: name -> label.
BASELINES: dict[str, str] = {"gd": "GD", "sgd": "SGD"}
BASELINE_COLOR = "k"

# Default output folder of every experiment: runs/papers/<name> (git-ignored).
OUTPUT_ROOT = os.path.join("runs", "papers")


def label(method: str) -> str:
    """The legend label of a method (a baseline or a registered SAM variant)."""
    return BASELINES[method] if method in BASELINES else optimizer_registry.get(method).label


def color(method: str) -> str:
    return BASELINE_COLOR if method in BASELINES else optimizer_registry.get(method).color


def is_baseline(method: str) -> bool:
    return method in BASELINES


class MLP(nn.Module):
    """A ReLU multilayer perceptron: inputs [batch, features] -> logits [batch, num_outputs]."""

    hidden: Sequence[int] = (64, 64)
    num_outputs: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_outputs)(x)


def mean_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, -1) == labels)


def tree_norm(tree: Any) -> jax.Array:
    return optax.tree.norm(tree)


def load_dataset(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Returns (x_train, y_train, x_test, y_test): flattened float32 pixels in [0, 1], centred.

    The images and the fixed, stratified train/test split of the training pipeline's
    ``data.load_dataset`` (``digits``: 1,438 / 359, ``mnist5k``: 4,000 / 1,000); both
    ship with their package, nothing is downloaded.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {DATASETS}.")
    dataset = data.load_dataset(name, validation_size=0)

    def features(images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1).astype(np.float32) / 255.0

    x_train, x_test = features(dataset.train_images), features(dataset.test_images)
    mean = x_train.mean(0, keepdims=True)
    return x_train - mean, dataset.train_labels, x_test - mean, dataset.test_labels


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


def run_protocol(
    args: Any,
    run_all: Callable[[Any], list[dict]],
    summarize: Callable[[list[dict], Any], list[dict]],
    write_outputs: Callable[[list[dict], list[dict], Any, str, Stopwatch], None],
) -> dict:
    """The outline of a protocol experiment: every run trained (or found finished), their
    summary table, then the experiment's own tables, figures and report in ``args.output_dir``.

    Returns ``dict(runs=..., table=..., seconds=...)``.
    """
    out, clock = start(args.output_dir)
    runs = run_all(args)
    table = summarize(runs, args)
    write_outputs(runs, table, args, out, clock)
    seconds = clock.seconds()
    print(f"wrote {out} in {seconds:.1f} s")
    return dict(runs=runs, table=table, seconds=seconds)


def start(output_dir: str) -> tuple[str, Stopwatch]:
    """Creates an experiment's output folder (files in it are overwritten) and starts its clock."""
    os.makedirs(output_dir, exist_ok=True)
    return output_dir, Stopwatch()


class Stopwatch:
    """A command's wall time and the machine's load averages, from its start."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.load_start = runtime.load_average()

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def loads(self) -> tuple[Any, Any]:
        """The load averages at the start and now."""
        return self.load_start, runtime.load_average()

    def machine_sentence(self) -> str:
        """The machine and its load at the start and now, for a report."""
        start, end = self.loads()
        return (
            f"Machine: {runtime.machine_line()}; load average (1/5/15 min) {start} at the start, "
            f"{end} at the end."
        )


def write_record(path: str, args: Any, seconds: float, **fields: Any) -> None:
    """The experiment's JSON record: its arguments (a dataclass), its wall time and ``fields``."""
    reporting.write_json(path, dict(args=dataclasses.asdict(args), seconds=seconds, **fields))
