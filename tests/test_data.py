"""Tests of experiments/data/: loading (TFDS, the CIFAR python version, the embedded sets),
splits, on-device augmentation, and the data order."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import data as ip
from experiments.data import cifar, fashion_mnist

# ----------------------------------------------------------------------------------------------
# Fake CIFAR in the original python-version layout.


def _write_batch(path, images, labels, label_key: bytes) -> None:
    """One pickle laid out like the real ones: b'data' [N, 3072] uint8 rows of CHW images."""
    batch = {
        b"batch_label": b"fake batch",
        b"data": images.transpose(0, 3, 1, 2).reshape(len(images), 3072),
        label_key: [int(label) for label in labels],
        b"filenames": [f"{i}.png".encode() for i in range(len(images))],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def _fake_images(rng, first_id: int, num: int) -> np.ndarray:
    """Random non-zero images whose pixel [0, 0, 0] is a unique id, to track them."""
    images = rng.integers(1, 256, (num, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(first_id, first_id + num)
    return images


def write_fake_cifar10(root, per_batch: int = 4):
    """Writes root/cifar-10-batches-py/; returns (train images, labels, test images, labels)."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    train_images, train_labels = [], []
    for i in range(5):
        images = _fake_images(rng, 1 + i * per_batch, per_batch)
        labels = rng.integers(0, 10, per_batch)
        _write_batch(os.path.join(folder, f"data_batch_{i + 1}"), images, labels, b"labels")
        train_images.append(images)
        train_labels.append(labels)
    test_images = _fake_images(rng, 200, per_batch)
    test_labels = rng.integers(0, 10, per_batch)
    _write_batch(os.path.join(folder, "test_batch"), test_images, test_labels, b"labels")
    return np.concatenate(train_images), np.concatenate(train_labels), test_images, test_labels


def write_fake_cifar100(root, num_train: int = 12, num_test: int = 3):
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder)
    rng = np.random.default_rng(1)
    train_images = _fake_images(rng, 1, num_train)
    train_labels = rng.integers(0, 100, num_train)
    test_images = _fake_images(rng, 100, num_test)
    test_labels = rng.integers(0, 100, num_test)
    _write_batch(os.path.join(folder, "train"), train_images, train_labels, b"fine_labels")
    _write_batch(os.path.join(folder, "test"), test_images, test_labels, b"fine_labels")
    return train_images, train_labels, test_images, test_labels


def _ids(images: np.ndarray) -> list[int]:
    return [int(i) for i in images[:, 0, 0, 0]]


def _assert_uint8_nhwc(ds: ip.Dataset, shape: tuple[int, int, int]) -> None:
    for images, labels in [
        (ds.train_images, ds.train_labels),
        (ds.val_images, ds.val_labels),
        (ds.test_images, ds.test_labels),
    ]:
        assert images.dtype == np.uint8 and images.shape[1:] == shape
        assert labels.dtype == np.int32 and labels.shape == (len(images),)
        if len(labels):
            assert 0 <= labels.min() and labels.max() < ds.num_classes


# ----------------------------------------------------------------------------------------------
# CIFAR.


def test_cifar10_python_folder(tmp_path):
    train_x, train_y, test_x, test_y = write_fake_cifar10(tmp_path)
    ds = ip.load_dataset("cifar10", data_dir=str(tmp_path), validation_size=5)
    _assert_uint8_nhwc(ds, (32, 32, 3))
    assert (len(ds.train_labels), len(ds.val_labels), len(ds.test_labels)) == (15, 5, 4)
    assert ds.num_classes == 10 and ds.random_flip
    # The images are decoded exactly (CHW rows -> HWC) and stay paired with their labels.
    np.testing.assert_array_equal(ds.test_images, test_x)
    np.testing.assert_array_equal(ds.test_labels, test_y)
    for images, labels in [(ds.train_images, ds.train_labels), (ds.val_images, ds.val_labels)]:
        rows = np.array(_ids(images)) - 1
        np.testing.assert_array_equal(images, train_x[rows])
        np.testing.assert_array_equal(labels, train_y[rows])


def test_cifar10_data_dir_is_the_python_folder_itself(tmp_path):
    write_fake_cifar10(tmp_path)
    ds = ip.load_dataset(
        "cifar10", data_dir=str(tmp_path / "cifar-10-batches-py"), validation_size=0
    )
    assert len(ds.train_labels) == 20 and len(ds.val_labels) == 0
    assert ds.val_images.shape == (0, 32, 32, 3)


def test_cifar10_python_archive(tmp_path):
    train_x, train_y, test_x, test_y = write_fake_cifar10(tmp_path / "src")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    ds = ip.load_dataset("cifar10", data_dir=str(tmp_path), validation_size=0)
    np.testing.assert_array_equal(ds.train_images, train_x)
    np.testing.assert_array_equal(ds.train_labels, train_y)
    np.testing.assert_array_equal(ds.test_images, test_x)
    np.testing.assert_array_equal(ds.test_labels, test_y)


def test_cifar100_python_folder_and_archive(tmp_path):
    train_x, train_y, test_x, test_y = write_fake_cifar100(tmp_path / "folder")
    ds = ip.load_dataset("cifar100", data_dir=str(tmp_path / "folder"), validation_size=0)
    assert ds.num_classes == 100 and ds.random_flip
    np.testing.assert_array_equal(ds.train_images, train_x)
    np.testing.assert_array_equal(ds.train_labels, train_y)  # b'fine_labels'
    np.testing.assert_array_equal(ds.test_labels, test_y)

    with tarfile.open(tmp_path / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "folder" / "cifar-100-python", arcname="cifar-100-python")
    from_archive = ip.load_dataset("cifar100", data_dir=str(tmp_path), validation_size=2)
    assert len(from_archive.train_labels) == 10 and len(from_archive.val_labels) == 2
    np.testing.assert_array_equal(from_archive.test_images, test_x)


def test_cifar_default_data_dir_honours_tfds_data_dir(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    assert len(ip.load_dataset("cifar10", validation_size=0).train_labels) == 20


@pytest.mark.parametrize(
    "name, archive",
    [("cifar10", "cifar-10-python.tar.gz"), ("cifar100", "cifar-100-python.tar.gz")],
)
def test_missing_cifar_names_the_commands_that_get_it(tmp_path, name, archive):
    with pytest.raises(FileNotFoundError) as error:
        ip.load_dataset(name, data_dir=str(tmp_path))
    message = str(error.value)
    assert str(tmp_path) in message
    assert 'pip install -e ".[prepare]"' in message
    assert (
        f"tfds.builder('{name}', data_dir='{tmp_path}')"
        ".download_and_prepare(file_format='array_record')" in message
    )
    assert f"https://www.cs.toronto.edu/~kriz/{archive}" in message
    assert os.path.join(str(tmp_path), archive) in message


@pytest.mark.parametrize("name, num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_through_tfds_mock_data_source(tmp_path, name, num_classes):
    # mock_data patches tfds.data_source too. The metadata files are not in the pip wheel, so
    # policy AUTO falls back to USE_CODE and `split=None` would give no splits; the loader names
    # its splits explicitly. The mock's train and test splits hold the same examples.
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=20):
        ds = ip.load_dataset(name, data_dir=str(tmp_path), validation_size=5)
    _assert_uint8_nhwc(ds, (32, 32, 3))
    assert (len(ds.train_labels), len(ds.val_labels), len(ds.test_labels)) == (15, 5, 20)
    assert ds.num_classes == num_classes and ds.random_flip
    assert len(ds.mean) == len(ds.std) == 3


def _prepare_fake_tfds_cifar10(data_dir, num_train: int, num_test: int):
    """A real TFDS cifar10 directory in the array_record format, written without TensorFlow:
    a builder with cifar10's name, version and features, fed PNG bytes made with PIL."""
    tfds = pytest.importorskip("tensorflow_datasets")
    pil_image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    splits = {
        "train": (_fake_images(rng, 1, num_train), rng.integers(0, 10, num_train)),
        "test": (_fake_images(rng, 100, num_test), rng.integers(0, 10, num_test)),
    }

    def png(image):
        buffer = io.BytesIO()
        pil_image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()

    class Cifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "cifar10"
        VERSION = tfds.core.Version("3.0.2")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "image": tfds.features.Image(shape=(32, 32, 3)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in splits}

        def _generate_examples(self, split):
            for i, (image, label) in enumerate(zip(*splits[split], strict=True)):
                yield f"{split}_{i}", {"id": f"{split}_{i}", "image": png(image), "label": label}

    Cifar10(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return splits


def test_cifar10_prepared_array_record_without_tensorflow(tmp_path):
    splits = _prepare_fake_tfds_cifar10(tmp_path, num_train=12, num_test=4)
    ds = ip.load_dataset("cifar10", data_dir=str(tmp_path), validation_size=2)
    assert (len(ds.train_labels), len(ds.val_labels), len(ds.test_labels)) == (10, 2, 4)
    # TFDS shuffles the records when it writes them: compare example by example via their ids.
    for images, labels in [
        (ds.train_images, ds.train_labels),
        (ds.val_images, ds.val_labels),
        (ds.test_images, ds.test_labels),
    ]:
        for image, label in zip(images, labels, strict=True):
            source_images, source_labels = splits["train" if image[0, 0, 0] < 100 else "test"]
            row = int(image[0, 0, 0]) - (1 if image[0, 0, 0] < 100 else 100)
            np.testing.assert_array_equal(image, source_images[row])
            assert label == source_labels[row]


# ----------------------------------------------------------------------------------------------
# Splits and statistics.


def test_validation_split_is_seeded_disjoint_and_deterministic(tmp_path):
    write_fake_cifar10(tmp_path)
    load = lambda seed: ip.load_dataset(
        "cifar10", data_dir=str(tmp_path), validation_size=5, split_seed=seed
    )
    first, again, other = load(0), load(0), load(1)
    assert set(_ids(first.train_images)).isdisjoint(_ids(first.val_images))
    assert set(_ids(first.train_images)) | set(_ids(first.val_images)) == set(range(1, 21))
    np.testing.assert_array_equal(first.val_images, again.val_images)
    np.testing.assert_array_equal(first.train_labels, again.train_labels)
    assert set(_ids(first.val_images)) != set(_ids(other.val_images))
    np.testing.assert_array_equal(first.test_images, other.test_images)  # test split untouched


def test_mean_and_std_come_from_the_training_split(tmp_path):
    write_fake_cifar10(tmp_path)
    ds = ip.load_dataset("cifar10", data_dir=str(tmp_path), validation_size=5)
    pixels = ds.train_images.astype(np.float64)
    np.testing.assert_allclose(ds.mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(ds.std, pixels.std(axis=(0, 1, 2)), rtol=1e-12)
    assert all(isinstance(v, float) for v in ds.mean + ds.std)


def test_validation_size_must_leave_training_images():
    with pytest.raises(ValueError, match="validation_size"):
        ip.load_dataset("digits", validation_size=1438)  # digits has 1,438 training images
    with pytest.raises(ValueError, match="validation_size"):
        ip.load_dataset("digits", validation_size=-1)


def test_unknown_name_lists_the_data_sets():
    with pytest.raises(ValueError) as error:
        ip.load_dataset("imagenet")
    assert all(name in str(error.value) for name in ip.DATASETS)


def _class_counts(labels, num_classes=10):
    return np.bincount(labels, minlength=num_classes)


def test_mnist5k_offline_stratified():
    ds = ip.load_dataset("mnist5k", validation_size=500)
    _assert_uint8_nhwc(ds, (28, 28, 1))
    assert (len(ds.train_labels), len(ds.val_labels), len(ds.test_labels)) == (3500, 500, 1000)
    assert ds.num_classes == 10 and not ds.random_flip
    np.testing.assert_array_equal(_class_counts(ds.test_labels), np.full(10, 100))
    train_and_val = _class_counts(ds.train_labels) + _class_counts(ds.val_labels)
    np.testing.assert_array_equal(train_and_val, np.full(10, 400))
    assert ds.train_images.max() == 255
    # The test split is fixed: it does not depend on split_seed.
    other = ip.load_dataset("mnist5k", validation_size=500, split_seed=1)
    np.testing.assert_array_equal(ds.test_images, other.test_images)


def test_digits_offline_stratified():
    from sklearn.datasets import load_digits

    all_counts = _class_counts(load_digits().target)
    ds = ip.load_dataset("digits", validation_size=200)
    _assert_uint8_nhwc(ds, (8, 8, 1))
    assert (len(ds.train_labels), len(ds.val_labels), len(ds.test_labels)) == (1238, 200, 359)
    assert ds.num_classes == 10 and not ds.random_flip
    assert ds.train_images.max() == 255 and ds.train_images.min() == 0
    test_counts = _class_counts(ds.test_labels)
    assert np.all(np.abs(test_counts - 0.2 * all_counts) < 1)  # floor or ceil of each share
    np.testing.assert_array_equal(
        test_counts + _class_counts(ds.train_labels) + _class_counts(ds.val_labels), all_counts
    )


# ----------------------------------------------------------------------------------------------
# Augmentation and normalization.


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(1, 256, (24, 6, 6, 3), dtype=np.uint8)


def test_augment_keeps_shape_and_dtype(images):
    key = jax.random.key(0)
    for kwargs in [{}, dict(cutout=3)]:  # the other settings are checked below
        out = ip.augment(key, jnp.asarray(images), **kwargs)
        assert out.shape == images.shape and out.dtype == jnp.uint8


def test_augment_identity_without_crop_flip_or_cutout(images):
    out = ip.augment(jax.random.key(0), images, pad=0, flip=False)
    np.testing.assert_array_equal(np.asarray(out), images)


def test_augment_flip_flips_some_examples(images):
    out = np.asarray(ip.augment(jax.random.key(1), images, pad=0, flip=True))
    flipped = [np.array_equal(o, x[:, ::-1]) for o, x in zip(out, images, strict=True)]
    kept = [np.array_equal(o, x) for o, x in zip(out, images, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped) and any(kept)


def test_augment_crop_is_a_shifted_copy_with_zero_border(images):
    pad = 2
    out = np.asarray(ip.augment(jax.random.key(2), images, pad=pad, flip=False))
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = set()
    for o, p in zip(out, padded, strict=True):
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if np.array_equal(o, p[dy : dy + 6, dx : dx + 6])
        ]
        assert len(matches) == 1  # images have no zeros, so the border pins the offset
        offsets.add(matches[0])
    assert len(offsets) > 3  # each example draws its own offset


def test_augment_cutout_zeroes_one_clipped_square(images):
    size = 3
    out = np.asarray(ip.augment(jax.random.key(3), images, pad=0, flip=False, cutout=size))
    for o, x in zip(out, images, strict=True):
        zero = np.all(o == 0, axis=-1)
        assert np.array_equal(o[~zero], x[~zero]) and not np.any(o[~zero] == 0)
        rows, cols = np.flatnonzero(zero.any(axis=1)), np.flatnonzero(zero.any(axis=0))
        assert zero.sum() == len(rows) * len(cols)  # a rectangle...
        assert np.all(np.diff(rows) == 1) and np.all(np.diff(cols) == 1)
        # ... the size x size square, clipped when its centre is near the border.
        assert 2 <= len(rows) <= size and 2 <= len(cols) <= size


def test_augment_works_inside_jit(images):
    step = jax.jit(lambda key, x: ip.augment(key, x, pad=1, cutout=2))
    out = step(jax.random.key(0), images)
    assert out.shape == images.shape and out.dtype == jnp.uint8


def test_normalize(images):
    mean, std = (120.0, 110.0, 100.0), (60.0, 61.0, 62.0)
    expected = (images.astype(np.float32) - np.array(mean)) / np.array(std)
    out = ip.normalize(images, mean, std)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6, atol=1e-6)
    half = ip.normalize(images, mean, std, dtype=jnp.bfloat16)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), expected, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------------------------
# Data order.


def test_epoch_permutation_deterministic_and_varies_by_epoch():
    first = ip.epoch_permutation(0, 3, 100)
    np.testing.assert_array_equal(first, ip.epoch_permutation(0, 3, 100))
    np.testing.assert_array_equal(np.sort(first), np.arange(100))
    assert not np.array_equal(first, ip.epoch_permutation(0, 4, 100))
    assert not np.array_equal(first, ip.epoch_permutation(1, 3, 100))


def test_train_batch_indices_drop_the_remainder():
    batches = ip.train_batch_indices(0, 0, 103, 10)
    assert batches.shape == (10, 10) and batches.dtype == np.int32
    assert len(np.unique(batches)) == 100
    np.testing.assert_array_equal(batches.ravel(), ip.epoch_permutation(0, 0, 103)[:100])
    with pytest.raises(ValueError, match="batch_size"):
        ip.train_batch_indices(0, 0, 5, 10)


@pytest.mark.parametrize("num_examples, batch_size", [(10, 4), (8, 4), (3, 8), (0, 4)])
def test_eval_batches_count_every_example_once(num_examples, batch_size):
    batches = list(ip.eval_batches(num_examples, batch_size))
    assert len(batches) == -(-num_examples // batch_size)
    for indices, mask in batches:
        assert indices.shape == mask.shape == (batch_size,)
        assert indices.dtype == np.int32 and mask.dtype == np.float32
        assert np.all((0 <= indices) & (indices < max(num_examples, 1)))
    counted = [i for indices, mask in batches for i, m in zip(indices, mask, strict=True) if m]
    assert counted == list(range(num_examples))
    assert sum(float(mask.sum()) for _, mask in batches) == num_examples


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST from IDX files.

IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: 0x0000 0x08 ndim, big-endian dims, the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def _write_file(path, data: bytes, gz: bool) -> None:
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_fake_fashion_mnist(folder, num_train: int = 30, num_test: int = 10, gz: bool = True):
    """Writes the four IDX files; returns (train images, labels, test images, labels)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8)
    test_x = rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8)
    # Unique ids in pixel [0, 0] to track the examples through the splits.
    train_x[:, 0, 0] = np.arange(1, num_train + 1)
    test_x[:, 0, 0] = np.arange(100, 100 + num_test)
    train_y = np.arange(num_train, dtype=np.uint8) % 10
    test_y = np.arange(num_test, dtype=np.uint8) % 10
    suffix = ".gz" if gz else ""
    for name, array in zip(IDX_NAMES, (train_x, train_y, test_x, test_y), strict=True):
        _write_file(folder / (name + suffix), _idx_bytes(array), gz)
    return train_x, train_y, test_x, test_y


@pytest.fixture
def no_debian_folder(tmp_path, monkeypatch):
    """Points the Debian package's folder at an empty one, so the tests do not depend on it."""
    empty = tmp_path / "no-debian-package"
    empty.mkdir()
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_DEBIAN_DIR", str(empty))
    return empty


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_idx_files(tmp_path, no_debian_folder, gz):
    train_x, train_y, test_x, test_y = write_fake_fashion_mnist(tmp_path / "fm", gz=gz)
    ds = ip.load_dataset("fashion_mnist", data_dir=str(tmp_path / "fm"), validation_size=6)
    _assert_uint8_nhwc(ds, (28, 28, 1))
    assert (len(ds.train_labels), len(ds.val_labels), len(ds.test_labels)) == (24, 6, 10)
    assert ds.num_classes == 10 and ds.random_flip and ds.noisy_labels == 0
    np.testing.assert_array_equal(ds.test_images[..., 0], test_x)
    np.testing.assert_array_equal(ds.test_labels, test_y)
    for images, labels in [(ds.train_images, ds.train_labels), (ds.val_images, ds.val_labels)]:
        rows = images[:, 0, 0, 0].astype(int) - 1
        np.testing.assert_array_equal(images[..., 0], train_x[rows])
        np.testing.assert_array_equal(labels, train_y[rows])


def test_fashion_mnist_falls_back_to_the_debian_folder(tmp_path, monkeypatch):
    _, _, test_x, _ = write_fake_fashion_mnist(tmp_path / "debian")
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_DEBIAN_DIR", str(tmp_path / "debian"))
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "empty"))  # the default location
    ds = ip.load_dataset("fashion_mnist", validation_size=5)
    np.testing.assert_array_equal(ds.test_images[..., 0], test_x)
    assert ds.origin == str(tmp_path / "debian") and str(tmp_path / "debian") in ds.describe()


def test_a_given_fashion_mnist_folder_is_the_only_one_read(tmp_path, monkeypatch):
    write_fake_fashion_mnist(tmp_path / "debian")
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_DEBIAN_DIR", str(tmp_path / "debian"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="read only when no data_dir"):
        ip.load_dataset("fashion_mnist", data_dir=str(tmp_path / "empty"), validation_size=5)
    write_fake_fashion_mnist(tmp_path / "mine")
    ds = ip.load_dataset("fashion_mnist", data_dir=str(tmp_path / "mine"), validation_size=5)
    assert ds.origin == str(tmp_path / "mine")


def test_the_description_says_what_was_read():
    ds = ip.load_dataset("digits", validation_size=200)
    assert "Dataset(" not in ds.describe()
    assert ds.describe() == (
        "digits from scikit-learn's copy: 1,238 training, 200 validation and 359 test images "
        "of 8x8x1, 10 classes"
    )


def test_fashion_mnist_missing_names_the_commands_that_get_it(tmp_path, no_debian_folder):
    with pytest.raises(FileNotFoundError) as error:
        ip.load_dataset("fashion_mnist", data_dir=str(tmp_path))
    message = str(error.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert (
        f"tfds.builder('fashion_mnist', data_dir='{tmp_path}')"
        ".download_and_prepare(file_format='array_record')" in message
    )
    assert str(tmp_path) in message and str(no_debian_folder) in message
    assert all(name in message for name in IDX_NAMES)


def test_fashion_mnist_incomplete_folder_names_the_missing_files(tmp_path, no_debian_folder):
    write_fake_fashion_mnist(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        ip.load_dataset("fashion_mnist", data_dir=str(tmp_path))


def _corrupt(folder, name: str, data: bytes, gz: bool = True) -> str:
    path = folder / (name + (".gz" if gz else ""))
    _write_file(path, data, gz)
    return str(path)


_LABELS = np.arange(30, dtype=np.uint8) % 10
_IMAGES = np.zeros((30, 28, 28), np.uint8)


@pytest.mark.parametrize(
    "name, data, gz, message",
    [
        # Not gzip although named .gz.
        ("train-images-idx3-ubyte", _idx_bytes(_IMAGES), False, "not a valid gzip"),
        # Bad magic numbers: an int32 type code, and a label file with 3 dimensions.
        ("train-images-idx3-ubyte", b"\0\0\x0c\x03" + _idx_bytes(_IMAGES)[4:], True, "magic"),
        ("train-labels-idx1-ubyte", _idx_bytes(_IMAGES), True, "magic"),
        # Wrong image size.
        ("train-images-idx3-ubyte", _idx_bytes(np.zeros((30, 32, 32), np.uint8)), True, "28x28"),
        # Truncated data, and a header cut short.
        ("train-images-idx3-ubyte", _idx_bytes(_IMAGES)[:-5], True, "truncated"),
        ("t10k-labels-idx1-ubyte", b"\0\0\x08", True, "shorter than an IDX header"),
        # As many labels as images, or it is not the right pair.
        ("train-labels-idx1-ubyte", _idx_bytes(_LABELS[:29]), True, "29 labels"),
        # Labels must be classes 0-9.
        ("t10k-labels-idx1-ubyte", _idx_bytes(np.full(10, 10, np.uint8)), True, "label 10"),
    ],
)
def test_fashion_mnist_corrupt_file_names_the_file(
    tmp_path, no_debian_folder, name, data, gz, message
):
    write_fake_fashion_mnist(tmp_path)
    if not gz:
        os.remove(tmp_path / (name + ".gz"))
        # The plain bytes under the .gz name.
        (tmp_path / (name + ".gz")).write_bytes(data)
        path = str(tmp_path / (name + ".gz"))
    else:
        path = _corrupt(tmp_path, name, data)
    with pytest.raises(ValueError, match=message) as error:
        ip.load_dataset("fashion_mnist", data_dir=str(tmp_path), validation_size=5)
    assert path in str(error.value)


def test_gzip_data_without_the_gz_name_says_so(tmp_path, no_debian_folder):
    write_fake_fashion_mnist(tmp_path)
    os.rename(tmp_path / "t10k-images-idx3-ubyte.gz", tmp_path / "t10k-images-idx3-ubyte")
    with pytest.raises(ValueError, match="rename it") as error:
        ip.load_dataset("fashion_mnist", data_dir=str(tmp_path), validation_size=5)
    assert str(tmp_path / "t10k-images-idx3-ubyte") in str(error.value)


def test_truncated_gzip_names_the_file(tmp_path, no_debian_folder):
    write_fake_fashion_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match="not a valid gzip") as error:
        ip.load_dataset("fashion_mnist", data_dir=str(tmp_path), validation_size=5)
    assert str(path) in str(error.value)


@pytest.mark.skipif(
    not os.path.isdir(ip.FASHION_MNIST_DEBIAN_DIR),
    reason="needs the Debian package dataset-fashion-mnist",
)
def test_real_fashion_mnist_from_the_debian_package():
    ds = ip.load_dataset("fashion_mnist", validation_size=5000)
    _assert_uint8_nhwc(ds, (28, 28, 1))
    assert (len(ds.train_labels), len(ds.val_labels), len(ds.test_labels)) == (55000, 5000, 10000)
    np.testing.assert_array_equal(_class_counts(ds.test_labels), np.full(10, 1000))


# ----------------------------------------------------------------------------------------------
# Label validation, training subsets and label noise.


def test_out_of_range_labels_are_refused(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path)
    real = cifar.load

    def with_a_bad_label(name, data_dir):
        splits = real(name, data_dir)
        labels = splits.train_labels.copy()
        labels[3] = 10
        return splits._replace(train_labels=labels)

    monkeypatch.setattr(cifar, "load", with_a_bad_label)
    with pytest.raises(ValueError, match="cifar10 training split: label 10 at index 3"):
        ip.load_dataset("cifar10", data_dir=str(tmp_path), validation_size=5)


@pytest.mark.parametrize("bad", [-1, 10])
def test_check_labels_names_the_origin_and_the_value(bad):
    labels = np.array([0, 3, bad, 9])
    with pytest.raises(ValueError, match=rf"somewhere: label {bad} at index 2 lies outside"):
        ip.check_labels(labels, 10, "somewhere")
    ip.check_labels(np.array([0, 9]), 10, "fine")
    ip.check_labels(np.array([], np.int32), 10, "empty")


def test_train_size_is_a_seeded_nested_subset_disjoint_from_validation(tmp_path):
    write_fake_cifar10(tmp_path)
    load = lambda size, seed=0: ip.load_dataset(
        "cifar10", data_dir=str(tmp_path), validation_size=5, split_seed=seed, train_size=size
    )
    full, small, smaller = load(None), load(8), load(4)
    assert (len(small.train_labels), len(smaller.train_labels)) == (8, 4)
    np.testing.assert_array_equal(small.val_images, full.val_images)
    assert set(_ids(smaller.train_images)) <= set(_ids(small.train_images))
    assert set(_ids(small.train_images)) <= set(_ids(full.train_images))
    np.testing.assert_array_equal(load(8).train_images, small.train_images)
    assert set(_ids(load(8, seed=1).train_images)) != set(_ids(small.train_images))
    pixels = small.train_images.astype(np.float64)
    np.testing.assert_allclose(small.mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-12)
    with pytest.raises(ValueError, match="train_size"):
        load(16)
    with pytest.raises(ValueError, match="train_size"):
        load(0)


@pytest.mark.parametrize("rate, num", [(0.4, 1000), (0.25, 7), (0.0, 50), (0.999, 20)])
def test_symmetric_noise_changes_exactly_round_rate_n_labels(rate, num):
    labels = np.random.default_rng(0).integers(0, 10, num).astype(np.int32)
    noisy = ip.corrupt_labels(labels, rate, 10, seed=3)
    assert noisy.dtype == np.int32 and noisy.shape == labels.shape
    assert np.count_nonzero(noisy != labels) == round(rate * num)  # never the same class
    assert noisy.min() >= 0 and noisy.max() < 10
    np.testing.assert_array_equal(noisy, ip.corrupt_labels(labels, rate, 10, seed=3))
    assert labels.base is None or not np.shares_memory(noisy, labels)


def test_symmetric_noise_is_uniform_over_the_other_classes():
    labels = np.zeros(20000, np.int32)
    noisy = ip.corrupt_labels(labels, 0.9, 10, seed=0)
    counts = np.bincount(noisy, minlength=10)
    assert counts[0] == 2000
    np.testing.assert_allclose(counts[1:] / 18000, np.full(9, 1 / 9), atol=0.01)


def test_noise_is_seeded():
    labels = np.arange(1000, dtype=np.int32) % 10
    first = ip.corrupt_labels(labels, 0.3, 10, seed=0)
    assert not np.array_equal(first, ip.corrupt_labels(labels, 0.3, 10, seed=1))
    asym = ip.corrupt_labels(labels, 0.3, 10, seed=0, mode="asymmetric")
    np.testing.assert_array_equal(
        asym, ip.corrupt_labels(labels, 0.3, 10, seed=0, mode="asymmetric")
    )


def test_asymmetric_noise_follows_the_map_per_class():
    labels = np.repeat(np.arange(10, dtype=np.int32), 100)
    mapping = ip.ASYMMETRIC_NOISE_MAPS["fashion_mnist"]
    assert mapping[0] == 6 and mapping[2] == 4 and mapping[5] == 7  # T-shirt->Shirt etc.
    noisy = ip.corrupt_labels(labels, 0.3, 10, seed=0, mode="asymmetric", mapping=mapping)
    for c in range(10):
        changed = noisy[labels == c][noisy[labels == c] != c]
        if c in mapping:
            assert len(changed) == 30 and np.all(changed == mapping[c])
        else:
            assert len(changed) == 0
    # Without a map: c -> c + 1 mod K, every class.
    shifted = ip.corrupt_labels(labels, 0.5, 10, seed=0, mode="asymmetric")
    changed = shifted != labels
    assert changed.sum() == 500
    np.testing.assert_array_equal(shifted[changed], (labels[changed] + 1) % 10)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rate=1.0), "label_noise"),
        (dict(rate=-0.1), "label_noise"),
        (dict(rate=float("nan")), "label_noise"),
        (dict(mode="pairs"), "label_noise_mode"),
        (dict(num_classes=1), "at least 2 classes"),
        (dict(labels=np.array([0, 12])), "label 12"),
        (dict(mode="asymmetric", mapping={1: 1}), "mapping"),
    ],
)
def test_corrupt_labels_rejects_bad_arguments(kwargs, message):
    args = dict(labels=np.array([0, 1, 2]), rate=0.5, num_classes=10, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        ip.corrupt_labels(**args)


@pytest.mark.parametrize("mode", ["symmetric", "asymmetric"])
def test_load_dataset_corrupts_only_the_training_labels(tmp_path, no_debian_folder, mode):
    write_fake_fashion_mnist(tmp_path, num_train=200, num_test=20)
    load = lambda **kw: ip.load_dataset(
        "fashion_mnist", data_dir=str(tmp_path), validation_size=40, **kw
    )
    clean = load()
    noisy = load(label_noise=0.5, label_noise_mode=mode, label_noise_seed=1)
    np.testing.assert_array_equal(noisy.train_images, clean.train_images)
    np.testing.assert_array_equal(noisy.clean_train_labels, clean.train_labels)
    changed = np.count_nonzero(noisy.train_labels != clean.train_labels)
    assert noisy.noisy_labels == changed > 0
    if mode == "symmetric":
        assert changed == 80
    for split in ("val", "test"):
        np.testing.assert_array_equal(
            getattr(noisy, f"{split}_labels"), getattr(clean, f"{split}_labels")
        )
        np.testing.assert_array_equal(
            getattr(noisy, f"{split}_images"), getattr(clean, f"{split}_images")
        )
    assert "noisy_labels=" in repr(noisy) and clean.clean_train_labels is None
    with pytest.raises(ValueError, match="label_noise"):
        load(label_noise=1.0)


def test_each_data_set_has_one_source_with_its_class_count():
    assert ip.DATASETS == ("cifar10", "cifar100", "mnist5k", "digits", "fashion_mnist")
    assert {name: source.num_classes for name, source in ip.SOURCES.items()} == {
        "cifar10": 10,
        "cifar100": 100,
        "mnist5k": 10,
        "digits": 10,
        "fashion_mnist": 10,
    }
