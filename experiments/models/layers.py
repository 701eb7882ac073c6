"""The pieces every model of the zoo shares: initializers, BatchNorm, the classifier head."""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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


class ZooModel(nn.Module):
    """The fields every model of the zoo shares, keyword-only so each model's own fields keep
    their positions: the computation dtype (parameters stay float32) and the mapped axis over
    which BatchNorm averages its statistics (``None``: per device)."""

    dtype: Dtype = dataclasses.field(default=jnp.float32, kw_only=True)
    bn_axis_name: str | None = dataclasses.field(default=None, kw_only=True)

    def conv_and_norm(self, train: bool, *, conv_bias: bool = False) -> tuple[ModuleDef, ModuleDef]:
        """The model's convolution and BatchNorm constructors in training or evaluation mode."""
        return _conv_def(self.dtype, use_bias=conv_bias), _norm_def(
            train, self.dtype, self.bn_axis_name
        )
