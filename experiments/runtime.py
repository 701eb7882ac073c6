"""What every command line of the experiments shares: exit statuses, the one mapping from an
exception to a status, the console log, and the description of the machine a result was
measured on.

Exit statuses: 0 done, 1 the run could not go on (e.g. a checkpoint that cannot be written),
2 bad input (flags, data, output folder), 3 diverged (NaN or infinite loss or parameters).
"""

from __future__ import annotations

import contextlib
import enum
import importlib.metadata
import math
import os
import platform
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from experiments import config as config_lib


class ExitStatus(enum.IntEnum):
    """The exit status of ``train``, ``sweep`` and the papers' scripts."""

    OK = 0
    RUN_FAILED = 1
    BAD_INPUT = 2
    DIVERGED = 3


def exit_status(error: BaseException) -> ExitStatus | None:
    """The status that `error` ends a command line with; None for an unexpected error (a bug,
    which keeps its traceback)."""
    from experiments import run_dir  # imports JAX: not needed before a run fails

    bad_input = (config_lib.ConfigError, FileExistsError, FileNotFoundError, PermissionError)
    if isinstance(error, bad_input):
        # Flag, output-folder and data problems: the message says what to do.
        return ExitStatus.BAD_INPUT
    if isinstance(error, run_dir.RunError | OSError) or _is_peer_failure(error):
        return ExitStatus.RUN_FAILED
    return None


def _is_peer_failure(error: BaseException) -> bool:
    """Whether `error` is a failed computation of a multi-process run: its collectives fail when
    another process dies (gloo: 'Connection reset by peer', 'Connection closed by peer')."""
    if "jax" not in sys.modules:
        return False
    import jax

    return isinstance(error, jax.errors.JaxRuntimeError) and jax.process_count() > 1


def _peer_failure_message(error: BaseException) -> str:
    import jax

    # XLA repeats this prefix once per queued step that the failure cancelled.
    cause = str(error).replace("Error dispatching computation: ", "").splitlines()[0]
    return (
        f"a computation of this {jax.process_count()}-process run failed, most likely because "
        f"another process stopped ({cause}). Restart every process with --resume: the run "
        "continues from its last complete checkpoint."
    )


def fail(message: Any, status: ExitStatus) -> NoReturn:
    """Prints one ``error: ...`` line and exits with `status`, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(int(status))


def fail_on(error: BaseException) -> NoReturn:
    """Exits with `error`'s status and message; re-raises an error that has no status."""
    status = exit_status(error)
    if status is None:
        raise error
    if _is_peer_failure(error):
        print(f"error: {_peer_failure_message(error)}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Exit now: JAX's shutdown at interpreter exit would wait for the dead process and then
        # abort this one. The output folder's lock and the checkpoints are closed by now.
        os._exit(int(status))
    fail(error, status)


# --------------------------------------------------------------------------------------------
# Stop signals.
# --------------------------------------------------------------------------------------------

# The signals that stop a run for --resume, as the message names them.
STOP_SIGNALS: dict[int, str] = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT (Ctrl-C)"}


def stop_message(signum: int, *, resumable: bool = True) -> str:
    """The one line a run stopped by `signum` prints."""
    hint = "; continue with --resume." if resumable else "."
    return f"error: stopped by {STOP_SIGNALS[signum]}{hint}"


class _Deferral:
    depth = 0  # nested stop_signals_deferred blocks
    pending: int | None = None  # a stop signal that arrived inside one


def stop(signum: int) -> None:
    """Ends the run for a stop signal (one ``error:`` line, exit status 128 + `signum`), at once
    or, inside :func:`stop_signals_deferred`, once the block has completed."""
    if _Deferral.depth:
        _Deferral.pending = signum
        return
    print(stop_message(signum), file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def stop_signals_deferred() -> Iterator[None]:
    """A block that a stop signal does not break off (a checkpoint write): the run stops when
    it has completed. A block that fails raises its own error; the signal is then dropped."""
    _Deferral.depth += 1
    signum = None
    try:
        yield
    finally:
        _Deferral.depth -= 1
        if not _Deferral.depth:
            signum, _Deferral.pending = _Deferral.pending, None
    if signum is not None:
        stop(signum)


def log(*args: Any) -> None:
    """Prints on the main process, above any progress bar."""
    from experiments.parallel import is_main_process  # imports JAX

    if is_main_process():
        from tqdm.auto import tqdm

        tqdm.write(" ".join(str(a) for a in args), file=sys.stdout)


def run_command(main: Callable[[], Any]) -> None:
    """Runs a script's `main` as a command line: a known error ends it with its exit status and
    one ``error: ...`` line (:func:`exit_status`)."""
    try:
        main()
    except Exception as e:
        fail_on(e)


# --------------------------------------------------------------------------------------------
# The machine.
# --------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """CPU model, core count, accelerators and library versions of this process."""
    import jax

    devices = jax.devices()
    info = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_backend": jax.default_backend(),
        "jax_devices": f"{len(devices)} x {devices[0].device_kind}",
    }
    for package in ("jax", "jaxlib", "flax", "optax", "torch"):
        info[package] = _version(package)
    return info


def machine_line() -> str:
    """One line about the machine: CPU, core count, JAX backend and devices."""
    import jax

    devices = jax.devices()
    return (
        f"{_cpu_model()}, {os.cpu_count()} cores, JAX {jax.__version__} on {len(devices)} "
        f"{devices[0].platform} device(s)"
    )


def load_average() -> tuple[float, float, float]:
    """``os.getloadavg()`` (1, 5, 15 minutes), so that a busy machine's noise is visible; NaN
    where the OS keeps none."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return (math.nan, math.nan, math.nan)
    return (round(one, 2), round(five, 2), round(fifteen, 2))
