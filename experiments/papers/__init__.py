"""The papers' small experiments (CPU, minutes): ``python -m experiments.papers.<name>``.

* :mod:`~experiments.papers.quadratic` -- SAM's learning-rate regime on a quadratic (StableSAM);
* :mod:`~experiments.papers.instability` -- training instability of SAM and its cure (StableSAM);
* :mod:`~experiments.papers.late_phase` -- SAM late in training (Zhou et al.), the quick MLP;
* :mod:`~experiments.papers.late_phase_fashion` -- the same on Fashion-MNIST with a small ResNet,
  through the training harness;
* :mod:`~experiments.papers.label_noise` -- every SAM variant against SGD on Fashion-MNIST with
  clean and noisy labels (the StableSAM paper's table at CPU scale), through the harness.

Each writes PNG figures, CSV, JSON and a Markdown report to ``runs/papers/<name>/`` by default.
``python -m experiments.papers.refresh_figures`` re-runs them into ``experiments/figures/``, the
figures the README shows.
"""
