"""The papers' small experiments (CPU, minutes): ``python -m experiments.papers.<name>``.

* :mod:`~experiments.papers.quadratic` -- SAM's learning-rate regime on a quadratic (StableSAM);
* :mod:`~experiments.papers.instability` -- training instability of SAM and its cure (StableSAM);
* :mod:`~experiments.papers.late_phase` -- SAM late in training (Zhou et al.).

Each writes PNG figures, CSV, JSON and a Markdown report to ``runs/papers/<name>/`` by default.
``python -m experiments.papers.refresh_figures`` re-runs them into ``experiments/figures/``, the
figures the README shows.
"""
