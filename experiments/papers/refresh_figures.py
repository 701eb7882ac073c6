"""Re-runs the papers' experiments into ``experiments/figures/``, the figures the README shows.

    python -m experiments.papers.refresh_figures            # all of them
    python -m experiments.papers.refresh_figures quadratic  # some of them

The small ones take a few minutes on a CPU; ``label_noise`` (the optimizers' table on
Fashion-MNIST), ``late_phase_fashion`` and ``efficiency`` (the efficient-SAM frontier) train
through the harness and take about 40, 15 and 45 minutes on an idle 2-core CPU (their runs are
kept under ``<folder>/runs/``, git-ignored, and reused when the command is repeated);
``efficiency_per_example`` and ``efficiency_full`` are the frontier's per-example methods in the
first regime and in the second (``--preset fashion-full``, the full training set).

Each experiment runs with its default flags (the quadratic once more with gradient noise) and
writes its PNG figures and Markdown report to ``experiments/figures/<name>/``; the CSV and JSON
files written beside them are git-ignored.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence

from experiments.papers import (
    efficiency,
    instability,
    label_noise,
    late_phase,
    late_phase_fashion,
    quadratic,
)

FIGURES_DIR = os.path.join("experiments", "figures")

# Folder name -> (main function, flags).
FIGURES: dict[str, tuple[Callable[[Sequence[str]], dict], list[str]]] = {
    "quadratic": (quadratic.main, []),
    "quadratic_noisy": (quadratic.main, ["--noise-std", "0.01"]),
    "instability": (instability.main, []),
    "late_phase": (late_phase.main, []),
    "label_noise": (label_noise.main, []),
    "late_phase_fashion": (late_phase_fashion.main, []),
    "efficiency": (efficiency.main, []),
    "efficiency_per_example": (efficiency.main, ["--methods", *efficiency.PER_EXAMPLE_METHODS]),
    "efficiency_full": (
        efficiency.main,
        ["--preset", "fashion-full", "--methods", *efficiency.PER_EXAMPLE_METHODS[:-1]],
    ),
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.papers.refresh_figures", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"Figure folders to refresh: {', '.join(FIGURES)}."
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(FIGURES))
    if unknown:
        parser.error(f"unknown figure folders {unknown}; choose from {', '.join(FIGURES)}")
    for name in args.names or FIGURES:
        run, flags = FIGURES[name]
        print(f"== {name} ==")
        run([*flags, "--output-dir", os.path.join(FIGURES_DIR, name)])


if __name__ == "__main__":
    main()
