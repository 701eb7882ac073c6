"""Flax linen image classifiers for CIFAR-sized inputs (NHWC) and the small embedded data sets.

Every model takes ``__call__(x, train=True)`` on a batch of images ``x`` of shape
``(batch, height, width, channels)`` and returns float32 logits of shape ``(batch, num_classes)``.
BatchNorm statistics live in the ``batch_stats`` collection: apply with
``mutable=['batch_stats']`` when ``train=True``. Random streams: ``'dropout'`` (WideResNet with
``dropout_rate > 0``) and ``'shakedrop'`` (PyramidNet with ``shakedrop=True``), each needed only
when training.

The architectures follow the common public CIFAR references, so their parameter counts match:

* ResNet-18/34/50: kuangliu/pytorch-cifar (3x3 stem, no max-pool, stages 64/128/256/512).
* WideResNet: Zagoruyko & Komodakis (2016), pre-activation blocks (xternalz/WideResNet-pytorch).
* ResNeXt-29: Xie et al. (2017), CIFAR template with widen factor 4 (osmr/imgclsmob).
* PyramidNet: Han et al. (2017), basic blocks, additive widening, zero-padded shortcut
  (dyhan0920/PyramidNet-PyTorch); ShakeDrop of Yamada et al. (2018) as in google-research/sam.
* VGG-16 with BatchNorm: kuangliu/pytorch-cifar (conv biases, single linear classifier).

``dtype`` sets the computation dtype (e.g. ``jnp.bfloat16``); parameters are always float32 and
logits are always returned as float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "MODELS",
    "PUBLISHED_PARAM_COUNTS",
    "BasicBlock",
    "BottleneckBlock",
    "PyramidNet",
    "ResNeXt",
    "MLP",
    "ResNet",
    "ShakeDrop",
    "SmallCNN",
    "VGG",
    "WideResNet",
    "count_params",
    "create_model",
    "init_variables",
]

ModuleDef = Any
Dtype = Any

# PyTorch's kaiming_normal_(mode="fan_out", nonlinearity="relu"): an untruncated normal with
# variance 2 / (kh * kw * out_channels), the init used by the WRN and PyramidNet references.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# PyTorch BatchNorm's momentum 0.1 weighs the *new* statistic; Flax's momentum weighs the old.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def _conv_def(dtype: Dtype, *, use_bias: bool = False) -> ModuleDef:
    return functools.partial(
        nn.Conv,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_kernel_init,
    )


def _norm_def(train: bool, dtype: Dtype, axis_name: str | None) -> ModuleDef:
    return functools.partial(
        nn.BatchNorm,
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=jnp.float32,
        axis_name=axis_name,
    )


def _classifier(x: jax.Array, num_classes: int, dtype: Dtype) -> jax.Array:
    """Global average pooling, a linear layer, and float32 logits."""
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(num_classes, dtype=dtype, param_dtype=jnp.float32, name="classifier")(x)
    return jnp.asarray(x, jnp.float32)


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


# --------------------------------------------------------------------------------------------
# ResNet (kuangliu/pytorch-cifar)
# --------------------------------------------------------------------------------------------


def _projection_shortcut(block: nn.Module, x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """x, or a strided 1x1 conv + BN of it when the residual branch changed its shape."""
    if x.shape == shape:
        return x
    shortcut = block.conv(block.features, (1, 1), block.strides, padding=0, name="proj_conv")(x)
    return block.norm(name="proj_bn")(shortcut)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (post-activation); a 1x1 projection when the shape changes."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef

    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(self.features, (3, 3), self.strides, padding=1)(x)
        y = nn.relu(self.norm()(y))
        y = self.conv(self.features, (3, 3), padding=1)(y)
        y = self.norm()(y)
        return nn.relu(y + _projection_shortcut(self, x, y.shape))


class BottleneckBlock(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4; a 1x1 projection when the shape changes."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef

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
        shortcut = x
        if x.shape != y.shape:
            shortcut = self.conv(out_features, (1, 1), self.strides, padding=0, name="proj_conv")(x)
            shortcut = self.norm(name="proj_bn")(shortcut)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem conv (no max-pool), four stages of 64/128/256/512 filters."""

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int
    num_filters: int = 64
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        conv = _conv_def(self.dtype)
        norm = _norm_def(train, self.dtype, self.bn_axis_name)
        x = conv(self.num_filters, (3, 3), padding=1, name="stem_conv")(x)
        x = nn.relu(norm(name="stem_bn")(x))
        for stage, num_blocks in enumerate(self.stage_sizes):
            for block in range(num_blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = self.block_cls(self.num_filters * 2**stage, strides, conv=conv, norm=norm)(x)
        return _classifier(x, self.num_classes, self.dtype)


# --------------------------------------------------------------------------------------------
# WideResNet (pre-activation)
# --------------------------------------------------------------------------------------------


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 plus the shortcut."""

    features: int
    strides: int
    dropout_rate: float
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        activated = nn.relu(self.norm()(x))
        if x.shape[-1] == self.features and self.strides == 1:
            shortcut = x
        else:
            # As in the reference, the projection sees the pre-activated input.
            shortcut = self.conv(self.features, (1, 1), self.strides, padding=0, name="proj_conv")(
                activated
            )
        y = self.conv(self.features, (3, 3), self.strides, padding=1)(activated)
        y = nn.relu(self.norm()(y))
        if self.dropout_rate > 0:
            y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = self.conv(self.features, (3, 3), padding=1)(y)
        return y + shortcut


class WideResNet(nn.Module):
    """WRN-depth-k: three stages of 16k/32k/64k filters, (depth - 4) / 6 blocks each."""

    depth: int
    widen_factor: int
    num_classes: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        if (self.depth - 4) % 6 != 0 or self.depth < 10:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {self.depth}.")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}.")
        blocks_per_stage = (self.depth - 4) // 6
        conv = _conv_def(self.dtype)
        norm = _norm_def(train, self.dtype, self.bn_axis_name)
        x = conv(16, (3, 3), padding=1, name="stem_conv")(x)
        for stage, base in enumerate((16, 32, 64)):
            for block in range(blocks_per_stage):
                strides = 2 if stage > 0 and block == 0 else 1
                x = WideBasicBlock(
                    base * self.widen_factor, strides, self.dropout_rate, conv=conv, norm=norm
                )(x, train)
        x = nn.relu(norm(name="final_bn")(x))
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


class ResNeXt(nn.Module):
    """ResNeXt-depth (cardinality x base_width d) for CIFAR: outputs 256/512/1024 (widen 4)."""

    depth: int
    cardinality: int
    base_width: int
    num_classes: int
    widen_factor: int = 4
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        if (self.depth - 2) % 9 != 0 or self.depth < 11:
            raise ValueError(f"ResNeXt depth must be 9n + 2 with n >= 1, got {self.depth}.")
        blocks_per_stage = (self.depth - 2) // 9
        conv = _conv_def(self.dtype)
        norm = _norm_def(train, self.dtype, self.bn_axis_name)
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


# --------------------------------------------------------------------------------------------
# PyramidNet (+ ShakeDrop)
# --------------------------------------------------------------------------------------------


class ShakeDrop(nn.Module):
    """ShakeDrop on a residual branch (Yamada et al., 2018, Eq. 6), per example.

    Training: with keep probability `keep_prob` the branch passes unchanged, otherwise it is
    scaled by alpha ~ U[alpha_range] in the forward pass and by beta ~ U[beta_range] in the
    backward pass. Evaluation: the branch is scaled by its expected forward factor.
    """

    keep_prob: float
    alpha_range: tuple[float, float] = (-1.0, 1.0)
    beta_range: tuple[float, float] = (0.0, 1.0)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if not train:
            expected_alpha = 0.5 * (self.alpha_range[0] + self.alpha_range[1])
            scale = self.keep_prob + (1.0 - self.keep_prob) * expected_alpha
            return x * jnp.asarray(scale, x.dtype)
        gate_key, alpha_key, beta_key = jax.random.split(self.make_rng("shakedrop"), 3)
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        gate = jax.random.bernoulli(gate_key, self.keep_prob, shape).astype(x.dtype)
        alpha = jax.random.uniform(alpha_key, shape, x.dtype, *self.alpha_range)
        beta = jax.random.uniform(beta_key, shape, x.dtype, *self.beta_range)
        forward = gate + (1 - gate) * alpha
        backward = gate + (1 - gate) * beta
        # Value x * forward, gradient through x * backward.
        return x * backward + jax.lax.stop_gradient(x * forward - x * backward)


class PyramidBasicBlock(nn.Module):
    """BN-conv3x3-BN-ReLU-conv3x3-BN; shortcut avg-pooled when strided, zero-padded channels."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    shakedrop_keep_prob: float | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = self.norm()(x)
        y = self.conv(self.features, (3, 3), self.strides, padding=1)(y)
        y = nn.relu(self.norm()(y))
        y = self.conv(self.features, (3, 3), padding=1)(y)
        y = self.norm()(y)
        if self.shakedrop_keep_prob is not None:
            y = ShakeDrop(self.shakedrop_keep_prob)(y, train)
        shortcut = x
        if self.strides != 1:
            window = (self.strides, self.strides)
            # Like the reference's AvgPool2d(ceil_mode=True) on odd sizes: partial windows
            # average only the pixels they cover.
            shortcut = nn.avg_pool(
                shortcut, window, window, padding="SAME", count_include_pad=False
            )
        extra_channels = y.shape[-1] - shortcut.shape[-1]
        shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (0, extra_channels)))
        return y + shortcut


class PyramidNet(nn.Module):
    """PyramidNet-depth with widening `alpha` (basic blocks); optional ShakeDrop.

    The width grows by alpha / N per block over all N = 3 (depth - 2) / 6 blocks, from 16 to
    16 + alpha. With ``shakedrop=True`` block l of N keeps its branch with probability
    1 - (l / N) * shakedrop_final_drop and needs the ``'shakedrop'`` rng when training.
    """

    depth: int
    alpha: float
    num_classes: int
    shakedrop: bool = False
    shakedrop_final_drop: float = 0.5
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        if (self.depth - 2) % 6 != 0 or self.depth < 8:
            raise ValueError(
                f"PyramidNet (basic blocks) depth must be 6n + 2 with n >= 1, got {self.depth}."
            )
        if not 0.0 <= self.shakedrop_final_drop <= 1.0:
            raise ValueError(
                f"shakedrop_final_drop must be in [0, 1], got {self.shakedrop_final_drop}."
            )
        blocks_per_stage = (self.depth - 2) // 6
        num_blocks = 3 * blocks_per_stage
        add_rate = self.alpha / num_blocks
        conv = _conv_def(self.dtype)
        norm = _norm_def(train, self.dtype, self.bn_axis_name)
        # The reference has no ReLU after the stem's BatchNorm.
        x = conv(16, (3, 3), padding=1, name="stem_conv")(x)
        x = norm(name="stem_bn")(x)
        width = 16.0
        for index in range(num_blocks):
            width += add_rate
            strides = 2 if index in (blocks_per_stage, 2 * blocks_per_stage) else 1
            keep_prob = None
            if self.shakedrop:
                keep_prob = 1.0 - (index + 1) / num_blocks * self.shakedrop_final_drop
            x = PyramidBasicBlock(
                int(round(width)), strides, conv=conv, norm=norm, shakedrop_keep_prob=keep_prob
            )(x, train)
        x = nn.relu(norm(name="final_bn")(x))
        return _classifier(x, self.num_classes, self.dtype)


# --------------------------------------------------------------------------------------------
# VGG and the small CNN
# --------------------------------------------------------------------------------------------

VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M")
VGG16_CONFIG += (512, 512, 512, "M")


class VGG(nn.Module):
    """VGG with BatchNorm for CIFAR: conv3x3(+bias)-BN-ReLU stacks, max-pools, one linear layer."""

    config: Sequence[int | str]
    num_classes: int
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        conv = _conv_def(self.dtype, use_bias=True)
        norm = _norm_def(train, self.dtype, self.bn_axis_name)
        for item in self.config:
            if item == "M":
                x = nn.max_pool(x, (2, 2), (2, 2))
            else:
                x = nn.relu(norm()(conv(int(item), (3, 3), padding=1)(x)))
        # A 32x32 input is 1x1 here, so this equals the reference's flatten.
        return _classifier(x, self.num_classes, self.dtype)


class SmallCNN(nn.Module):
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
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        conv = _conv_def(self.dtype)
        norm = _norm_def(train, self.dtype, self.bn_axis_name)
        for index, features in enumerate(self.features):
            if index > 0:
                # SAME: odd sizes (7 -> 4) keep their last row and column.
                x = nn.max_pool(x, (2, 2), (2, 2), padding="SAME")
            x = nn.relu(norm()(conv(features, (3, 3), padding=1)(x)))
        return _classifier(x, self.num_classes, self.dtype)


class MLP(nn.Module):
    """Flatten, then Dense-ReLU layers of the `hidden` widths, then a linear classifier.

    No BatchNorm (so no ``batch_stats``): the fast CPU model of the label-noise table, where an
    MLP memorizes noisy labels in a few seconds per epoch while XLA:CPU convolutions take
    minutes. Dense layers use Flax's default (LeCun normal) initialization.
    """

    num_classes: int
    hidden: Sequence[int] = (512, 512)
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None  # accepted for a uniform interface; no BatchNorm here

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = nn.relu(dense(width)(x))
        x = dense(self.num_classes, name="classifier")(x)
        return jnp.asarray(x, jnp.float32)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock),
    # He et al.'s CIFAR ResNet-8 layout (one basic block per stage, 16/32/64 filters) on the
    # stem and blocks above: the small residual network that trains (and compiles) fast on CPU.
    "resnet8": functools.partial(
        ResNet, stage_sizes=(1, 1, 1), block_cls=BasicBlock, num_filters=16
    ),
    "resnet34": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock),
    "resnet50": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock),
    "wrn28_10": functools.partial(WideResNet, depth=28, widen_factor=10),
    "wrn16_8": functools.partial(WideResNet, depth=16, widen_factor=8),
    "resnext29_32x4d": functools.partial(ResNeXt, depth=29, cardinality=32, base_width=4),
    "pyramidnet110_270": functools.partial(PyramidNet, depth=110, alpha=270),
    "vgg16_bn": functools.partial(VGG, config=VGG16_CONFIG),
    "small_cnn": SmallCNN,
    "mlp": MLP,
}

# Parameter counts for 10 classes (BatchNorm scales and offsets included, running statistics
# not). Published figures are rounded; where a reference implementation's exact count is known
# it is given and our models reproduce it exactly (see tests/test_models.py).
PUBLISHED_PARAM_COUNTS: dict[str, int] = {
    # kuangliu/pytorch-cifar ResNet18/34/50, as counted by PyTorch (commonly quoted as
    # 11.2M / 21.3M / 23.5M).
    "resnet18": 11_173_962,
    "resnet34": 21_282_122,
    "resnet50": 23_520_842,
    # Zagoruyko & Komodakis 2016 (Wide Residual Networks), Table: WRN-28-10 36.5M,
    # WRN-16-8 11.0M. Exact WRN-28-10 count of osmr/imgclsmob's wrn28_10_cifar10: 36,479,194.
    "wrn28_10": 36_479_194,
    "wrn16_8": 11_000_000,
    # osmr/imgclsmob resnext29_32x4d_cifar10 (its test asserts weight_count == 4,775,754).
    "resnext29_32x4d": 4_775_754,
    # Han et al. 2017 (Deep Pyramidal Residual Networks), Table: PyramidNet-110 alpha=270, 28.3M.
    # The official code's exact count (and imgclsmob's pyramidnet110_a270_cifar10) is 28,485,477.
    "pyramidnet110_270": 28_300_000,
    # kuangliu/pytorch-cifar VGG('VGG16') (conv biases, one linear layer), commonly 14.7M.
    "vgg16_bn": 14_728_266,
}


def _accepted_fields(factory: Callable[..., nn.Module]) -> set[str]:
    module_cls = factory.func if isinstance(factory, functools.partial) else factory
    return {field.name for field in dataclasses.fields(module_cls)} - {"parent", "name"}


def create_model(
    name: str, *, num_classes: int, dtype: Dtype = jnp.float32, **kwargs: Any
) -> nn.Module:
    """Builds the model registered as `name` in `MODELS`.

    Args:
      name: one of `MODELS`' keys, e.g. "resnet18".
      num_classes: number of output logits.
      dtype: computation dtype (e.g. jnp.bfloat16); parameters stay float32, logits are float32.
      **kwargs: further fields of the model, e.g. `dropout_rate` (WideResNet), `shakedrop`
        (PyramidNet), `bn_axis_name` (all: average BatchNorm statistics over a mapped axis).

    Returns:
      An unbound Flax linen module.
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}.")
    _check_positive("num_classes", num_classes)
    factory = MODELS[name]
    unknown = set(kwargs) - _accepted_fields(factory)
    if unknown:
        accepted = sorted(_accepted_fields(factory) - {"num_classes", "dtype"})
        raise TypeError(
            f"Model {name!r} does not take {sorted(unknown)}; its options are: {accepted}."
        )
    return factory(num_classes=num_classes, dtype=dtype, **kwargs)


def _rbg_key(rng: jax.Array) -> jax.Array:
    """An 'rbg' PRNG key seeded from `rng` (a typed or a raw uint32 key).

    Each 'rbg' draw is one XLA RngBitGenerator op, while each threefry draw is an unrolled hash
    that XLA:CPU compiles slowly: about 0.2 s per parameter, 20 s for ResNet-18's init.
    """
    return jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="rbg")


def init_variables(model: nn.Module, rng: jax.Array, input_shape: Sequence[int]) -> dict[str, Any]:
    """Initializes `model`'s variables: ``{'params': ..., 'batch_stats': ...}``.

    Args:
      model: a module from `create_model`.
      rng: a PRNG key.
      input_shape: NHWC shape of an input batch, e.g. (1, 32, 32, 3); an HWC shape gets a batch
        of one. The batch size does not change the variables.

    Cheap even for the large models: jitted, so XLA drops the unused forward computation, and
    drawn with the 'rbg' PRNG seeded from `rng`, which compiles much faster than threefry. The
    values are a deterministic function of `rng` on a given backend, but differ from
    ``model.init(rng, x)``'s.
    """
    shape = tuple(int(dim) for dim in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4:
        raise ValueError(
            f"input_shape must be NHWC (batch, height, width, channels) or HWC, got {shape}."
        )
    # train=False: no batch statistics are computed and no dropout/shakedrop rng is needed.
    init = jax.jit(lambda key, x: model.init(_rbg_key(key), x, train=False))
    variables = init(rng, jnp.zeros(shape, jnp.float32))
    # A model without BatchNorm (the MLP) has no batch_stats: an empty collection keeps the
    # train state's structure the same for every model.
    return {collection: variables.get(collection, {}) for collection in ("params", "batch_stats")}


def count_params(params: Any) -> int:
    """Total number of scalars in a pytree of arrays (or of `jax.ShapeDtypeStruct`s)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))
