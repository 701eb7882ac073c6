"""Benchmarks of sam-optax: scripts, never timed unit tests.

Each script prints a table and writes ``<name>.csv``, ``<name>.md`` and ``<name>.json`` (rows,
raw samples, machine description and load averages) to ``runs/benchmarks/`` or ``--out-dir``;
the recorded measurements are in ``results/`` here (``--out-dir experiments/benchmarks/results``):

* ``python -m experiments.benchmarks.overhead`` -- SAM's cost over its floor of two
  forward-backward passes: sam / (2 x sgd), ssam / sam, rho-0 steps / sgd.
* ``python -m experiments.benchmarks.vs_optax_contrib`` -- against ``optax.contrib.sam``
  (opaque mode): step time and compiled memory.
* ``python -m experiments.benchmarks.vs_torch`` -- against a PyTorch SAM step written the way
  PyTorch users write it (the two-step optimizer with a closure).
* ``python -m experiments.benchmarks.gpu_throughput`` -- images/s, model-FLOPs utilization,
  compile time and whole-epoch wall time through the real training loop (for a GPU).
* ``python -m experiments.benchmarks.scaling`` -- the sharded SAM step on 1, 2, 4, 8 simulated
  CPU devices against one device doing the same work.
* ``python -m experiments.benchmarks.conv_probe`` -- one convolution forward and backward in
  XLA:CPU and PyTorch: where a CPU step's time goes.
* ``python -m experiments.benchmarks.run_all`` -- all of the above, one after the other.

Every script takes ``--quick`` (a tiny model and batch, seconds; what the smoke tests run) and
``--out-dir``. Ratios are taken in one process, configurations interleaved (each once per
round, in a random order), from medians of the steps after warm-up; compile time is reported
apart. See README.md here for the recorded tables.
"""
