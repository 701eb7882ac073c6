"""Label noise on a training split: a seeded fraction of the labels replaced by wrong ones."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from experiments.data.dataset import check_labels

LABEL_NOISE_MODES: tuple[str, ...] = ("symmetric", "asymmetric")

# Asymmetric ("pair") label noise: class -> the class it is mistaken for, between look-alike
# classes, in the style of Patrini et al. (2017) for CIFAR-10 and MNIST. Classes not listed keep
# their labels. Data sets without a map here use c -> (c + 1) mod num_classes.
ASYMMETRIC_NOISE_MAPS: dict[str, dict[int, int]] = {
    # T-shirt -> Shirt, Pullover -> Coat, Coat -> Pullover, Sandal -> Sneaker,
    # Sneaker -> Ankle boot, Ankle boot -> Sandal.
    "fashion_mnist": {0: 6, 2: 4, 4: 2, 5: 7, 7: 9, 9: 5},
    # truck -> automobile, bird -> airplane, deer -> horse, cat <-> dog.
    "cifar10": {9: 1, 2: 0, 4: 7, 3: 5, 5: 3},
    # 2 -> 7, 3 -> 8, 5 <-> 6, 7 -> 1.
    "mnist5k": {2: 7, 3: 8, 5: 6, 6: 5, 7: 1},
    "digits": {2: 7, 3: 8, 5: 6, 6: 5, 7: 1},
}


def check_label_noise(rate: float, mode: str) -> None:
    """Raises ValueError unless ``rate`` is in [0, 1) and ``mode`` in :data:`LABEL_NOISE_MODES`."""
    if not (math.isfinite(rate) and 0.0 <= rate < 1.0):
        raise ValueError(f"label_noise must be a finite fraction in [0, 1), got {rate}.")
    if mode not in LABEL_NOISE_MODES:
        raise ValueError(f"label_noise_mode must be one of {LABEL_NOISE_MODES}, got {mode!r}.")


def corrupt_labels(
    labels: np.ndarray,
    rate: float,
    num_classes: int,
    seed: int,
    *,
    mode: str = "symmetric",
    mapping: Mapping[int, int] | None = None,
) -> np.ndarray:
    """Labels with a seeded fraction ``rate`` replaced by wrong ones (a new int32 array).

    * ``symmetric``: exactly ``round(rate * N)`` labels, chosen uniformly, each replaced by a
      class drawn uniformly from the ``num_classes - 1`` *other* classes.
    * ``asymmetric``: for every class ``c`` in ``mapping``, exactly ``round(rate * N_c)`` of its
      ``N_c`` labels become ``mapping[c]`` (a fixed look-alike class); classes not in
      ``mapping`` keep their labels. ``mapping=None`` means ``c -> (c + 1) mod num_classes``.

    A pure function of its arguments: the same seed gives the same labels.

    Raises:
      ValueError: ``rate`` outside [0, 1), an unknown ``mode``, fewer than 2 classes, labels
        outside ``[0, num_classes)``, or a mapping to itself or out of range.
    """
    check_label_noise(rate, mode)
    if num_classes < 2:
        raise ValueError(f"Label noise needs at least 2 classes, got num_classes={num_classes}.")
    labels = np.asarray(labels)
    check_labels(labels, num_classes, "corrupt_labels")
    noisy = labels.astype(np.int32, copy=True)
    # [seed, 1], not seed: a stream apart from the validation split's, which the same seed
    # value (split_seed) may drive.
    rng = np.random.default_rng([seed, 1])
    if mode == "symmetric":
        count = round(rate * len(labels))
        chosen = rng.choice(len(labels), size=count, replace=False)
        # An offset in [1, K) modulo K: uniform over the other classes, never the same one.
        offsets = rng.integers(1, num_classes, size=count)
        noisy[chosen] = (noisy[chosen] + offsets) % num_classes
        return noisy
    if mapping is None:
        mapping = {c: (c + 1) % num_classes for c in range(num_classes)}
    for source, target in sorted(mapping.items()):
        if source == target or not (0 <= source < num_classes and 0 <= target < num_classes):
            raise ValueError(
                f"Bad asymmetric noise mapping {source} -> {target} for {num_classes} classes."
            )
        members = np.flatnonzero(labels == source)
        count = round(rate * len(members))
        noisy[rng.choice(members, size=count, replace=False)] = target
    return noisy
