"""On-device augmentation and normalization of uint8 image batches, under ``jit``.

CIFAR-sized data sets fit in accelerator memory as uint8 (CIFAR-10's training split is 150 MB),
so the training loop keeps them there, gathers a batch with the indices from
:func:`experiments.data.batches.train_batch_indices` and augments it with :func:`augment`
(per-example randomness from one key). No host-side input pipeline and no TensorFlow are needed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


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
