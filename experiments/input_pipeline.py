"""The names of :mod:`experiments.data` under their former module, for code that imports them
from here: new code imports :mod:`experiments.data`."""

from experiments.data import (
    ASYMMETRIC_NOISE_MAPS,
    DATASETS,
    FASHION_MNIST_DEBIAN_DIR,
    LABEL_NOISE_MODES,
    Dataset,
    augment,
    check_labels,
    corrupt_labels,
    epoch_permutation,
    eval_batches,
    load_dataset,
    normalize,
    read_idx,
    train_batch_indices,
)

__all__ = [
    "ASYMMETRIC_NOISE_MAPS",
    "DATASETS",
    "FASHION_MNIST_DEBIAN_DIR",
    "LABEL_NOISE_MODES",
    "Dataset",
    "augment",
    "check_labels",
    "corrupt_labels",
    "epoch_permutation",
    "eval_batches",
    "load_dataset",
    "normalize",
    "read_idx",
    "train_batch_indices",
]
