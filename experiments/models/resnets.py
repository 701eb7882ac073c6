"""ResNets (kuangliu/pytorch-cifar) and ResNeXt-29 (Xie et al., 2017)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from experiments.models.layers import (
    ModuleDef,
    ZooModel,
    _classifier,
)

# --------------------------------------------------------------------------------------------
# ResNet (kuangliu/pytorch-cifar)
# --------------------------------------------------------------------------------------------


def _projection_shortcut(block: nn.Module, x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """x, or a strided 1x1 conv + BN of it when the residual branch changed its shape."""
    if x.shape == shape:
        return x
    shortcut = block.conv(shape[-1], (1, 1), block.strides, padding=0, name="proj_conv")(x)
    return block.norm(name="proj_bn")(shortcut)


class ResidualBlock(nn.Module):
    """The fields of a ResNet block: its filters (times `expansion` at its output), the stride
    of its strided convolution, and the model's convolution and BatchNorm constructors."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef

    expansion = 1


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions (post-activation); a 1x1 projection when the shape changes."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(self.features, (3, 3), self.strides, padding=1)(x)
        y = nn.relu(self.norm()(y))
        y = self.conv(self.features, (3, 3), padding=1)(y)
        y = self.norm()(y)
        return nn.relu(y + _projection_shortcut(self, x, y.shape))


class BottleneckBlock(ResidualBlock):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4; a 1x1 projection when the shape changes."""

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_features = self.features * self.expansion
        y = self.conv(self.features, (1, 1), padding=0)(x)
        y = nn.relu(self.norm()(y))
        y = self.conv(self.features, (3, 3), self.strides, padding=1)(y)
        y = nn.relu(self.norm()(y))
        y = self.conv(out_features, (1, 1), padding=0)(y)
        y = self.norm()(y)
        return nn.relu(y + _projection_shortcut(self, x, y.shape))


class ResNet(ZooModel):
    """CIFAR ResNet: 3x3 stem conv (no max-pool), four stages of 64/128/256/512 filters."""

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int
    num_filters: int = 64

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        conv, norm = self.conv_and_norm(train)
        x = conv(self.num_filters, (3, 3), padding=1, name="stem_conv")(x)
        x = nn.relu(norm(name="stem_bn")(x))
        for stage, num_blocks in enumerate(self.stage_sizes):
            for block in range(num_blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = self.block_cls(self.num_filters * 2**stage, strides, conv=conv, norm=norm)(x)
        return _classifier(x, self.num_classes, self.dtype)


# --------------------------------------------------------------------------------------------
# ResNeXt (CIFAR template of Xie et al.)
# --------------------------------------------------------------------------------------------


class ResNeXtBlock(nn.Module):
    """1x1 reduce to `width`, grouped 3x3 (strided), 1x1 expand; projection on shape change."""

    features: int
    width: int
    cardinality: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(self.width, (1, 1), padding=0)(x)
        y = nn.relu(self.norm()(y))
        y = self.conv(
            self.width, (3, 3), self.strides, padding=1, feature_group_count=self.cardinality
        )(y)
        y = nn.relu(self.norm()(y))
        y = self.conv(self.features, (1, 1), padding=0)(y)
        y = self.norm()(y)
        return nn.relu(y + _projection_shortcut(self, x, y.shape))


class ResNeXt(ZooModel):
    """ResNeXt-depth (cardinality x base_width d) for CIFAR: outputs 256/512/1024 (widen 4)."""

    depth: int
    cardinality: int
    base_width: int
    num_classes: int
    widen_factor: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        if (self.depth - 2) % 9 != 0 or self.depth < 11:
            raise ValueError(f"ResNeXt depth must be 9n + 2 with n >= 1, got {self.depth}.")
        blocks_per_stage = (self.depth - 2) // 9
        conv, norm = self.conv_and_norm(train)
        x = conv(64, (3, 3), padding=1, name="stem_conv")(x)
        x = nn.relu(norm(name="stem_bn")(x))
        for stage in range(3):
            features = 64 * self.widen_factor * 2**stage
            # Bottleneck width per group doubles with the stage: d, 2d, 4d.
            width = self.cardinality * self.base_width * 2**stage
            for block in range(blocks_per_stage):
                strides = 2 if stage > 0 and block == 0 else 1
                x = ResNeXtBlock(features, width, self.cardinality, strides, conv=conv, norm=norm)(
                    x
                )
        return _classifier(x, self.num_classes, self.dtype)
