"""CIFAR-10 and CIFAR-100: a TFDS copy prepared in the ``array_record`` format, or else the
original CIFAR "python version" (the pickles that torchvision also uses), as a folder
(``cifar-10-batches-py/``, ``cifar-100-python/``) or as the ``.tar.gz`` archive."""

from __future__ import annotations

import os
import pickle
import tarfile
import zlib
from collections.abc import Sequence

import numpy as np

from experiments.data.dataset import Splits, resolve_data_dir
from experiments.data.tfds_source import try_load_tfds

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


def load(name: str, data_dir: str | os.PathLike | None) -> Splits:
    """The train and test splits of ``name`` (``cifar10`` or ``cifar100``) under ``data_dir``."""
    data_dir = resolve_data_dir(data_dir)
    splits, tfds_problem = try_load_tfds(name, data_dir)
    if splits is not None:
        return splits
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


def _load_cifar_python_folder(name: str, folder: str) -> Splits:
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

    return Splits(*read(spec["train_files"]), *read(spec["test_files"]), folder)


def _load_cifar_python_archive(name: str, archive: str) -> Splits:
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


def _read_cifar_python_archive(name: str, archive: str) -> Splits:
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

        return Splits(*read(spec["train_files"]), *read(spec["test_files"]), archive)


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
