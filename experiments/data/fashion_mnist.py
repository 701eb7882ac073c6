"""Fashion-MNIST (Zalando; 60,000 training and 10,000 test images, 28x28x1, 10 classes): the
four original IDX files (gzipped or not) in ``data_dir``, else a TFDS copy there. Without a
``data_dir``, the default location (TFDS's) and then the Debian package's folder
:data:`FASHION_MNIST_DEBIAN_DIR`; a ``data_dir`` that was given is the only place looked."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Mapping

import numpy as np

from experiments.data.dataset import Splits, check_labels, resolve_data_dir
from experiments.data.tfds_source import try_load_tfds

NUM_CLASSES = 10

# Where the Debian/Ubuntu package `dataset-fashion-mnist` installs the four gzipped IDX files.
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"

# Split -> (images file, labels file), without the optional ".gz".
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FASHION_MNIST_SIZES = {"train": 60000, "test": 10000}
# IDX type code of unsigned bytes, the only type the MNIST-format files use.
_IDX_UBYTE = 0x08


def load(data_dir: str | os.PathLike | None) -> Splits:
    """Fashion-MNIST's train and test splits, from the first place that holds them: the IDX
    files or a TFDS copy in `data_dir`; with no `data_dir`, the default location's, then the
    Debian package's folder. The splits' ``origin`` names the folder read."""
    folder = resolve_data_dir(data_dir)
    # A folder that was named and does not hold the data is a mistake, not a reason to read
    # another copy.
    candidates = (folder,) if data_dir is not None else (folder, FASHION_MNIST_DEBIAN_DIR)
    for candidate in candidates:
        paths = _find_idx_files(candidate)
        if any(path is not None for path in paths.values()):
            missing = [name for name, path in paths.items() if path is None]
            if missing:
                # A folder with some of the files is an incomplete copy, not an absent one.
                raise FileNotFoundError(
                    f"{candidate} holds only some of Fashion-MNIST's IDX files: {missing} "
                    f"(or their .gz) are missing. Download them from {FASHION_MNIST_URL}/."
                )
            return _read_fashion_mnist_idx(paths)._replace(origin=candidate)
    splits, tfds_problem = try_load_tfds("fashion_mnist", folder)
    if splits is not None:
        return splits
    raise FileNotFoundError(
        _missing_fashion_mnist_message(folder, tfds_problem, given=data_dir is not None)
    )


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


def _read_fashion_mnist_idx(paths: Mapping[str, str | None]) -> Splits:
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
        check_labels(labels, NUM_CLASSES, labels_path)
        arrays += [images[..., None], labels]
    return Splits(*arrays)


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


def _missing_fashion_mnist_message(data_dir: str, tfds_problem: str, *, given: bool) -> str:
    files = ", ".join(f"{name}[.gz]" for names in _FASHION_MNIST_FILES.values() for name in names)
    debian = (
        f"  (not {FASHION_MNIST_DEBIAN_DIR}/, the Debian package's copy: it is read only when "
        "no data_dir (--data-dir) is given)\n"
        if given
        else f"  * the same files in {FASHION_MNIST_DEBIAN_DIR}/ (Debian package)\n"
    )
    return (
        "fashion_mnist was not found. Looked for:\n"
        f"  * the four IDX files ({files}) in data_dir={data_dir!r}\n"
        f"{debian}"
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
