"""The data order: seeded training batches of indices and padded evaluation batches."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order of the training examples in ``epoch``: a function of (seed, epoch) only, so a
    run resumed at any epoch sees the same data order as an uninterrupted one."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}.")
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    return rng.permutation(num_examples).astype(np.int32)


def train_batch_indices(seed: int, epoch: int, num_examples: int, batch_size: int) -> np.ndarray:
    """[steps_per_epoch, batch_size] int32 indices of one epoch; the last partial batch is
    dropped, so ``steps_per_epoch = num_examples // batch_size`` and shapes stay static."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    steps = num_examples // batch_size
    if steps == 0:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {num_examples} training examples: "
            "no full batch fits. Pass a smaller batch_size."
        )
    permutation = epoch_permutation(seed, epoch, num_examples)
    return permutation[: steps * batch_size].reshape(steps, batch_size)


def eval_batches(num_examples: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(indices, mask)`` covering ``range(num_examples)`` in order, every example once.

    Each batch has exactly ``batch_size`` int32 indices (so one compiled evaluation step serves
    all batches); the last batch is padded with index 0 and its float32 ``mask`` is 0 there, so
    sums weighted by ``mask`` count every example exactly once.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    for start in range(0, num_examples, batch_size):
        stop = min(start + batch_size, num_examples)
        indices = np.zeros(batch_size, np.int32)
        indices[: stop - start] = np.arange(start, stop)
        mask = np.zeros(batch_size, np.float32)
        mask[: stop - start] = 1.0
        yield indices, mask
