"""Tables, numbers and figures: the one set of writers every script uses.

CSV, Markdown and JSON writers (atomic: a temporary file, then ``os.replace``), the two number
formats of the reports (analysis results and measurements), ``mean_std``, the command line that
reproduces a run, and matplotlib on the file-only Agg backend. Used by the run directory, the
sweep, the papers' experiments and the benchmarks.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shlex
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

Row = Mapping[str, Any]


# --------------------------------------------------------------------------------------------
# Numbers.
# --------------------------------------------------------------------------------------------


def format_number(value: Any) -> str:
    """Four significant digits, scientific notation for very small or large numbers (analysis
    results: losses, bounds, ratios)."""
    if isinstance(value, float | np.floating):
        if not np.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)


def format_measurement(value: Any) -> str:
    """Digits by magnitude, thousands separators, ``-`` for missing values (timings, rates)."""
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        magnitude = abs(value)
        if 0 < magnitude < 0.01:
            return f"{value:.2e}"
        if magnitude >= 100:
            return f"{value:,.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        return f"{value:.3f}"
    if value is None:
        return "-"
    return str(value)


def mean_std(values: Sequence[float], *, skip_nan: bool = False) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value), over seeds say.

    With `skip_nan`, NaNs are left out; otherwise a NaN makes both NaN.
    """
    array = np.asarray(values, np.float64)
    if array.size == 0:
        raise ValueError("mean_std of no values")
    mean, std = (np.nanmean, np.nanstd) if skip_nan else (np.mean, np.std)
    return float(mean(array)), float(std(array, ddof=1)) if array.size > 1 else 0.0


# --------------------------------------------------------------------------------------------
# Tables.
# --------------------------------------------------------------------------------------------


def columns_of(rows: Sequence[Row]) -> list[str]:
    """Every key of the rows, in order of first appearance."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


TEMP_SUFFIX = ".tmp"  # Atomic writes go through ``.<name>.<random>.tmp`` in the same folder.


@contextlib.contextmanager
def atomic_open(path: str, newline: str | None = None) -> Iterator[Any]:
    """A text file that replaces `path` only once it is completely written.

    The text goes to a temporary file in the same folder (so the rename stays on one file
    system), is flushed to disk, then ``os.replace``s `path`: a crash or a full disk leaves the
    previous file or the new one, never a truncated one. On error the temporary file goes.
    """
    folder, name = os.path.split(os.path.abspath(path))
    temp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
    # os.open with mode 0o666 keeps the umask's permissions (mkstemp would make it 0o600).
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temp)
        raise


def write_csv(path: str, rows: Sequence[Row]) -> None:
    """Rows as CSV with the union of their keys as columns; list values joined with ``;``."""
    with atomic_open(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns_of(rows))
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: ";".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()}
            )


def markdown_table(
    rows: Sequence[Row],
    columns: Sequence[str] | None = None,
    *,
    fmt: Callable[[Any], str] = format_number,
) -> str:
    """A Markdown table of `rows` (`columns`: default every key of the first row)."""
    columns = list(rows[0]) if columns is None else list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_table(rows: Sequence[Row], path_csv: str, path_md: str | None = None) -> None:
    """Rows as CSV and, optionally, as a Markdown table."""
    if not rows:
        raise ValueError("no rows to write")
    write_csv(path_csv, rows)
    if path_md is not None:
        write_text(path_md, markdown_table(rows) + "\n")


def write_json(path: str, payload: Any, *, indent: int = 2) -> None:
    """JSON with NumPy scalars and other numbers written as floats (atomically)."""
    with atomic_open(path) as f:
        json.dump(payload, f, indent=indent, default=float)


def write_jsonl(path: str, rows: Sequence[Any]) -> None:
    """One JSON value per line (atomically)."""
    with atomic_open(path) as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def write_text(path: str, text: str) -> None:
    """A text file (atomically)."""
    with atomic_open(path) as f:
        f.write(text)


# --------------------------------------------------------------------------------------------
# Provenance and figures.
# --------------------------------------------------------------------------------------------


def command_line(module: str | None = None, argv: Sequence[str] | None = None) -> str:
    """The shell command that reproduces a run: ``python -m module`` plus its flags.

    `module` defaults to the running ``__main__`` module, `argv` to ``sys.argv[1:]``.
    """
    if module is None:
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        program = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
    else:
        program = f"python -m {module}"
    flags = sys.argv[1:] if argv is None else list(argv)
    return " ".join([program, *map(shlex.quote, flags)])


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
