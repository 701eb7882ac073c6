"""The data sets :func:`experiments.data.load_dataset` knows: per name, how to read it, its
number of classes and whether horizontal flips suit it."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from experiments.data import cifar, embedded, fashion_mnist
from experiments.data.dataset import Splits


@dataclasses.dataclass(frozen=True)
class DataSource:
    """How to read one data set, and what holds for all of it."""

    # data_dir (None: the TFDS default) -> the train and test splits.
    read: Callable[[str | os.PathLike | None], Splits]
    num_classes: int
    random_flip: bool  # Left-right symmetric images (objects, clothes), not digits.
    image_size: int  # Height and width of its (square) images, known before it is read.
    # Whether it reads a --data-dir (the embedded sets ship inside a package).
    reads_data_dir: bool = True


# The readers are looked up when called (not bound here), so that a replaced module function
# is the one that runs.
SOURCES: dict[str, DataSource] = {
    "cifar10": DataSource(lambda data_dir: cifar.load("cifar10", data_dir), 10, True, 32),
    "cifar100": DataSource(lambda data_dir: cifar.load("cifar100", data_dir), 100, True, 32),
    "mnist5k": DataSource(lambda data_dir: embedded.load_mnist5k(), 10, False, 28, False),
    "digits": DataSource(lambda data_dir: embedded.load_digits(), 10, False, 8, False),
    "fashion_mnist": DataSource(
        lambda data_dir: fashion_mnist.load(data_dir), fashion_mnist.NUM_CLASSES, True, 28
    ),
}

DATASETS: tuple[str, ...] = tuple(SOURCES)
