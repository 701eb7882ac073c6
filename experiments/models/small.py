"""VGG-16 with BatchNorm, and the small networks that train fast on a CPU: a CNN and an MLP."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models.layers import (
    ZooModel,
    _classifier,
)

# --------------------------------------------------------------------------------------------
# VGG and the small CNN
# --------------------------------------------------------------------------------------------

VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M")
VGG16_CONFIG += (512, 512, 512, "M")


class VGG(ZooModel):
    """VGG with BatchNorm for CIFAR: conv3x3(+bias)-BN-ReLU stacks, max-pools, one linear layer."""

    config: Sequence[int | str]
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        conv, norm = self.conv_and_norm(train, conv_bias=True)
        for item in self.config:
            if item == "M":
                x = nn.max_pool(x, (2, 2), (2, 2))
            else:
                x = nn.relu(norm()(conv(int(item), (3, 3), padding=1)(x)))
        # A 32x32 input is 1x1 here, so this equals the reference's flatten.
        return _classifier(x, self.num_classes, self.dtype)


class SmallCNN(ZooModel):
    """conv3x3-BN-ReLU stages with a 2x2 max-pool between them, then global average pooling and
    a linear layer.

    Meant for the 28x28x1 sets (MNIST subset, Fashion-MNIST) and 8x8x1 digits: fast on CPU. The
    max-pools (28 -> 14 -> 7 -> 4) let the last stage see the whole image before the global
    average; the cheap fourth stage (4x4) is what lifts Fashion-MNIST from underfitting (79 %
    training accuracy after 3 epochs on 10,000 images with three stages, 86 % with four). With
    stride-2 convolutions and no pools, (32, 64, 64) underfit even mnist5k (85 % training
    accuracy after 5 epochs).
    """

    num_classes: int
    features: Sequence[int] = (16, 32, 64, 128)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        conv, norm = self.conv_and_norm(train)
        for index, features in enumerate(self.features):
            if index > 0:
                # SAME: odd sizes (7 -> 4) keep their last row and column.
                x = nn.max_pool(x, (2, 2), (2, 2), padding="SAME")
            x = nn.relu(norm()(conv(features, (3, 3), padding=1)(x)))
        return _classifier(x, self.num_classes, self.dtype)


class MLP(ZooModel):
    """Flatten, then Dense-ReLU layers of the `hidden` widths, then a linear classifier.

    No BatchNorm (so no ``batch_stats``): the fast CPU model of the label-noise table, where an
    MLP memorizes noisy labels in a few seconds per epoch while XLA:CPU convolutions take
    minutes. Dense layers use Flax's default (LeCun normal) initialization. ``bn_axis_name`` is
    accepted for a uniform interface and unused.
    """

    num_classes: int
    hidden: Sequence[int] = (512, 512)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = nn.relu(dense(width)(x))
        x = dense(self.num_classes, name="classifier")(x)
        return jnp.asarray(x, jnp.float32)
