"""WideResNet (Zagoruyko & Komodakis, 2016) and PyramidNet with ShakeDrop (Han et al., 2017;
Yamada et al., 2018)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models.layers import (
    ModuleDef,
    ZooModel,
    _classifier,
)

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


class WideResNet(ZooModel):
    """WRN-depth-k: three stages of 16k/32k/64k filters, (depth - 4) / 6 blocks each."""

    depth: int
    widen_factor: int
    num_classes: int
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        if (self.depth - 4) % 6 != 0 or self.depth < 10:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {self.depth}.")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}.")
        blocks_per_stage = (self.depth - 4) // 6
        conv, norm = self.conv_and_norm(train)
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


class PyramidNet(ZooModel):
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
        conv, norm = self.conv_and_norm(train)
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
