"""The one entry point, :func:`load_dataset`: a data source's splits, a validation split held
out of its training split, an optional training subset and label noise, and the normalization
statistics of what is left for training."""

from __future__ import annotations

import numpy as np

from experiments.data.dataset import Dataset, Splits, check_labels
from experiments.data.label_noise import ASYMMETRIC_NOISE_MAPS, check_label_noise, corrupt_labels
from experiments.data.sources import DATASETS, SOURCES


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    validation_size: int = 5000,
    split_seed: int = 0,
    train_size: int | None = None,
    label_noise: float = 0.0,
    label_noise_mode: str = "symmetric",
    label_noise_seed: int = 0,
) -> Dataset:
    """Loads a data set into memory and holds ``validation_size`` training images out.

    Args:
      name: one of :data:`DATASETS`.
      data_dir: where to look for CIFAR (a TFDS data directory, or a folder holding the CIFAR
        python version or its archive) or Fashion-MNIST (a folder with the four IDX files, or a
        TFDS data directory). Defaults to ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``, like
        TFDS. Ignored by ``mnist5k`` and ``digits``.
      validation_size: number of training images held out for validation (0 for none).
      split_seed: seed of the permutation that picks the validation images (and the
        ``train_size`` subset: the validation split does not depend on ``train_size``).
      train_size: keep only this many of the remaining training images (``None``: all).
      label_noise: fraction of the training labels to corrupt, in [0, 1); see
        :func:`corrupt_labels`. Validation and test labels stay clean.
      label_noise_mode: ``"symmetric"`` or ``"asymmetric"`` (:data:`ASYMMETRIC_NOISE_MAPS`).
      label_noise_seed: seed of the corrupted labels' choice.

    Returns:
      A :class:`Dataset`; with label noise, ``noisy_labels`` counts the changed training labels
      and ``clean_train_labels`` holds the labels before corruption.

    Raises:
      ValueError: unknown ``name``, a ``validation_size``/``train_size`` that leaves no training
        images, bad label-noise arguments, labels outside ``[0, num_classes)``, or a corrupt
        data file (the message names it).
      FileNotFoundError: CIFAR or Fashion-MNIST data not found; the message says how to get it.
    """
    _check_arguments(name, validation_size, train_size, label_noise, label_noise_mode)
    source = SOURCES[name]
    splits = source.read(data_dir)
    # Out-of-range labels would index past the one-hot targets and train silently on garbage.
    check_labels(splits.train_labels, source.num_classes, f"{name} training split")
    check_labels(splits.test_labels, source.num_classes, f"{name} test split")
    train_idx, val_idx = _held_out_indices(name, splits, validation_size, train_size, split_seed)
    train_images = splits.train_images[train_idx]
    clean_train_labels = splits.train_labels[train_idx]
    train_labels = clean_train_labels
    if label_noise > 0:
        train_labels = corrupt_labels(
            clean_train_labels,
            label_noise,
            source.num_classes,
            label_noise_seed,
            mode=label_noise_mode,
            mapping=ASYMMETRIC_NOISE_MAPS.get(name),
        )
    mean, std = _channel_mean_std(train_images)
    return Dataset(
        name=name,
        train_images=train_images,
        train_labels=train_labels,
        val_images=splits.train_images[val_idx],
        val_labels=splits.train_labels[val_idx],
        test_images=splits.test_images,
        test_labels=splits.test_labels,
        num_classes=source.num_classes,
        mean=mean,
        std=std,
        random_flip=source.random_flip,
        noisy_labels=int(np.count_nonzero(train_labels != clean_train_labels)),
        clean_train_labels=clean_train_labels if label_noise > 0 else None,
        origin=splits.origin,
    )


def _check_arguments(
    name: str,
    validation_size: int,
    train_size: int | None,
    label_noise: float,
    label_noise_mode: str,
) -> None:
    if name not in DATASETS:
        raise ValueError(f"Unknown data set {name!r}; choose one of {DATASETS}.")
    if validation_size < 0:
        raise ValueError(f"validation_size must be >= 0, got {validation_size}.")
    if train_size is not None and train_size < 1:
        raise ValueError(f"train_size must be >= 1 (or None for all), got {train_size}.")
    check_label_noise(label_noise, label_noise_mode)


def _held_out_indices(
    name: str, splits: Splits, validation_size: int, train_size: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, validation indices) into ``splits``' training split."""
    num_train = len(splits.train_labels)
    if validation_size >= num_train:
        raise ValueError(
            f"validation_size={validation_size} leaves no training images: {name} has "
            f"{num_train} training images. Pass a smaller validation_size."
        )
    train_idx, val_idx = _validation_split(num_train, validation_size, seed)
    if train_size is not None:
        if train_size > len(train_idx):
            raise ValueError(
                f"train_size={train_size} is more than the {len(train_idx)} training images "
                f"{name} has after holding out {validation_size} for validation."
            )
        train_idx = _training_subset(num_train, validation_size, train_size, seed)
    return train_idx, val_idx


def _validation_split(
    num_examples: int, validation_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices), disjoint, each in increasing order."""
    permutation = np.random.default_rng(seed).permutation(num_examples)
    return np.sort(permutation[validation_size:]), np.sort(permutation[:validation_size])


def _training_subset(
    num_examples: int, validation_size: int, train_size: int, seed: int
) -> np.ndarray:
    """The first ``train_size`` training indices of :func:`_validation_split`'s permutation,
    sorted: disjoint from its validation indices, and nested (a smaller subset is a prefix)."""
    permutation = np.random.default_rng(seed).permutation(num_examples)
    return np.sort(permutation[validation_size : validation_size + train_size])


def _channel_mean_std(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and standard deviation of uint8 images, from value histograms
    (no float copy of the whole data set)."""
    values = np.arange(256, dtype=np.float64)
    means, stds = [], []
    for channel in range(images.shape[-1]):
        counts = np.bincount(images[..., channel].ravel(), minlength=256).astype(np.float64)
        total = counts.sum()
        mean = (counts @ values) / total
        variance = (counts @ (values - mean) ** 2) / total
        means.append(float(mean))
        stds.append(float(np.sqrt(variance)))
    return tuple(means), tuple(stds)
