"""What the benchmark scripts share: machine description, the Flax training step under test,
command-line arguments and result files (timing and compiled-step analysis:
:mod:`experiments.benchmarks.timing`)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import config as config_lib
from experiments import data, models, reporting, runtime, steps, trainer
from experiments.benchmarks import timing

# Where a script writes by default (git-ignored). The measurements the READMEs cite are kept in
# experiments/benchmarks/results/, refreshed with --out-dir experiments/benchmarks/results.
RESULTS_DIR = os.path.join("runs", "benchmarks")
# The note of a CPU run of a benchmark whose tables have rows for a GPU.
NO_GPU_ROWS = "GPU rows were not measured here (no GPU on this machine)."

# CIFAR-10's per-channel mean and std in [0, 255] units (the benchmark data are synthetic, the
# normalization is what a real run does).
CIFAR10_MEAN = (125.3, 123.0, 113.9)
CIFAR10_STD = (63.0, 62.1, 66.7)
CIFAR_SHAPE = (32, 32, 3)

# Forward FLOPs per 32x32 image (2 x MACs), as published for the CIFAR variants of the models.
PUBLISHED_FWD_GFLOPS = {"resnet18": 1.11, "wrn28_10": 10.5}

# --quick: the zoo's small CNN cut down to two narrow layers, so that compiling its SAM step
# takes seconds on a CPU.
QUICK_SMALL_CNN = '{"features": [8, 16]}'


# --------------------------------------------------------------------------------------------
# The machine.
# --------------------------------------------------------------------------------------------


# One home for the machine's description (re-exported: the scripts call common.*).
machine_info = runtime.machine_info
load_average = runtime.load_average


# --------------------------------------------------------------------------------------------
# The Flax training step under test (the project's own, from experiments.trainer).
# --------------------------------------------------------------------------------------------


def benchmark_config(
    model: str,
    optimizer: str,
    *,
    batch_size: int = 128,
    dtype: str = "float32",
    model_kwargs: Mapping[str, Any] | None = None,
    **overrides: Any,
):
    """A resolved ``TrainConfig`` for CIFAR-10-shaped data (nothing is loaded)."""
    from experiments import config as config_lib

    config = config_lib.TrainConfig(
        dataset="cifar10",
        model=model,
        optimizer=optimizer,
        batch_size=batch_size,
        dtype=dtype,
        model_kwargs=json.dumps(dict(model_kwargs or {})),
        epochs=overrides.pop("epochs", 200),
        output_dir=overrides.pop("output_dir", "/tmp/unused"),
        progress=False,
        **overrides,
    )
    return config_lib.resolve(config)


def jnp_dtype(name: str) -> Any:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def call_compiled(
    name: str, compiled: Callable, jitted: Callable | None, *args: Any
) -> tuple[Callable, Any]:
    """``compiled(*args)``, or ``jitted(*args)`` should JAX refuse the call to the ahead-of-time
    compiled executable; returns what to call from now on and the outputs."""
    try:
        return compiled, compiled(*args)
    except TypeError as error:
        if jitted is None or compiled is jitted:
            raise
        # E.g. "Computation compiled for 210 inputs but called with 170". The arguments are
        # checked before anything runs (nothing is donated yet), so the jitted function can take
        # over; it compiles on this call.
        print(
            f"WARNING {name}: the AOT executable refused the call ({error}); "
            "falling back to jax.jit, this step includes a compile.",
            flush=True,
        )
        return jitted, jitted(*args)


@dataclasses.dataclass
class FlaxStep:
    """A compiled single-device training step with its own state and batch."""

    name: str
    compiled: Any
    state: Any
    images: jax.Array
    labels: jax.Array
    key: jax.Array
    compile_s: float
    # The jitted function the executable came from, kept alive with it (and used instead of the
    # executable should JAX refuse a call to the ahead-of-time compiled one).
    jitted: Callable | None = None

    def __post_init__(self):
        self.executable = self.compiled  # what analysis() reads, whatever runs the steps

    def bench(self) -> timing.Bench:
        def step():
            args = (self.state, self.images, self.labels, self.key)
            self.compiled, (self.state, metrics) = call_compiled(
                self.name, self.compiled, self.jitted, *args
            )
            return self.state, metrics

        return timing.Bench(self.name, step)

    def analysis(self) -> dict[str, Any]:
        ops = timing.hlo_op_counts(self.executable)
        return {
            "compile_s": self.compile_s,
            **timing.cost(self.executable),
            **timing.memory(self.executable),
            **{f"hlo_{op}": ops.get(op, 0) for op in timing.HLO_OPS_OF_INTEREST},
        }


def init_model(
    model_name: str,
    *,
    num_classes: int = 10,
    dtype: str = "float32",
    model_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    image_shape: Sequence[int] = CIFAR_SHAPE,
) -> tuple[Any, dict[str, Any]]:
    """The Flax model of the zoo and its initial variables."""
    model = models.create_model(
        model_name, num_classes=num_classes, dtype=jnp_dtype(dtype), **dict(model_kwargs or {})
    )
    variables = models.init_variables(model, jax.random.PRNGKey(seed), (1, *image_shape))
    return model, variables


def synthetic_batch(
    batch_size: int, image_shape: Sequence[int] = CIFAR_SHAPE, num_classes: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images and int32 labels (timing does not depend on the pixel values)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch_size, *image_shape), dtype=np.uint8)
    labels = rng.integers(0, num_classes, (batch_size,), dtype=np.int32)
    return images, labels


def flax_step(
    name: str,
    model: Any,
    variables: Mapping[str, Any],
    tx: optax.GradientTransformationExtraArgs,
    *,
    sam: bool,
    batch_size: int,
    dtype: str = "float32",
    num_classes: int = 10,
    image_shape: Sequence[int] = CIFAR_SHAPE,
    seed: int = 0,
) -> FlaxStep:
    """Compiles ``steps.make_train_step`` (single device, state donated) for one config.

    The state gets fresh copies of `variables`, so configurations never share (donated)
    buffers. The step augments and normalizes the uint8 batch on the device, as in training.
    """
    preprocess = steps.Preprocess(mean=CIFAR10_MEAN, std=CIFAR10_STD, dtype=jnp_dtype(dtype))
    step_fn = steps.make_train_step(model, tx, preprocess, num_classes=num_classes, axis_name=None)
    params = jax.tree.map(jnp.copy, variables["params"])
    state = steps.TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        batch_stats=jax.tree.map(jnp.copy, variables.get("batch_stats", {})),
        opt_state=tx.init(params),
    )
    images, labels = synthetic_batch(batch_size, image_shape, num_classes, seed)
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    key = jax.random.PRNGKey(seed + 1)
    jitted = jax.jit(step_fn, donate_argnums=0)
    compiled, seconds = timing.compile_timed(jitted, state, images, labels, key)
    return FlaxStep(name, compiled, state, images, labels, key, seconds, jitted)


def compile_flax_steps(
    model_name: str,
    model: Any,
    variables: Mapping[str, Any],
    transformations: Mapping[str, tuple[optax.GradientTransformationExtraArgs, bool]],
    args: argparse.Namespace,
    log: Callable[[str], None] = print,
) -> dict[str, FlaxStep]:
    """:func:`flax_step` for each ``name -> (tx, sam)``, at the batch size, dtype and seed of the
    command line, logging each compile time."""
    compiled = {}
    for name, (tx, sam) in transformations.items():
        compiled[name] = flax_step(
            name,
            model,
            variables,
            tx,
            sam=sam,
            batch_size=args.batch_size,
            dtype=args.dtype,
            seed=args.seed,
        )
        log(f"{model_name} {name}: compiled in {compiled[name].compile_s:.1f} s")
    return compiled


class TrainerStep:
    """The compiled data-parallel step of an ``Experiment`` (``trainer.create_experiment``),
    with its (donated) state: the step the training loop runs, input pipeline included."""

    def __init__(self, name: str, experiment: trainer.Experiment):
        self.name = name
        self.experiment = experiment
        self.state = experiment.state
        self.split = experiment.splits["train"]
        self.indices = experiment.epoch_indices(0)
        self.compiled, self.compile_s = timing.compile_timed(
            experiment.train_step, self.state, self.split.images, self.split.labels, self.indices
        )
        self.executable = self.compiled  # what the analyses read, whatever runs the steps

    def bench(self) -> timing.Bench:
        def step():
            self.compiled, (self.state, metrics) = call_compiled(
                self.name,
                self.compiled,
                self.experiment.train_step,
                self.state,
                self.split.images,
                self.split.labels,
                self.indices,
            )
            return self.state, metrics

        return timing.Bench(self.name, step)


def tree_bytes(tree: Any) -> int:
    """Bytes held by the arrays of a pytree."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def synthetic_dataset(
    num_train: int,
    *,
    num_test: int = 0,
    image_shape: Sequence[int] = CIFAR_SHAPE,
    num_classes: int = 10,
    seed: int = 0,
) -> data.Dataset:
    """A CIFAR-shaped uint8 data set of random pixels, for the real training loop."""
    train_images, train_labels = synthetic_batch(num_train, image_shape, num_classes, seed)
    test_images, test_labels = synthetic_batch(num_test, image_shape, num_classes, seed + 1)
    empty_images = np.zeros((0, *image_shape), np.uint8)
    return data.Dataset(
        name="cifar10",
        train_images=train_images,
        train_labels=train_labels,
        val_images=empty_images,
        val_labels=np.zeros((0,), np.int32),
        test_images=test_images,
        test_labels=test_labels,
        num_classes=num_classes,
        mean=CIFAR10_MEAN[: image_shape[-1]],
        std=CIFAR10_STD[: image_shape[-1]],
        random_flip=True,
    )


# --------------------------------------------------------------------------------------------
# Command line and result files.
# --------------------------------------------------------------------------------------------


def add_model_arguments(
    parser: argparse.ArgumentParser,
    *,
    models: str | None,
    batch_size: int | None = 128,
    dtype: str = "float32",
) -> None:
    """``--models`` (comma-separated; left out where `models` is None), ``--model-kwargs``,
    ``--batch-size`` (left out where `batch_size` is None) and ``--dtype``."""
    if models is not None:
        parser.add_argument("--models", default=models)
    parser.add_argument("--model-kwargs", default="", help="JSON, e.g. '{\"num_filters\": 16}'.")
    if batch_size is not None:
        parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--dtype", default=dtype, choices=("float32", "bfloat16"))


def positive_ints(text: str, flag: str) -> list[int]:
    """A flag's comma-separated positive integers (``1,2,4``); anything else ends the script with
    exit status 2."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        runtime.fail(
            f"{flag} takes comma-separated positive integers such as 1,2,4, got {text!r}.",
            runtime.ExitStatus.BAD_INPUT,
        )
    return values


def model_kwargs(text: str) -> dict[str, Any]:
    """The --model-kwargs JSON as a dict; a bad one ends the script with exit status 2."""
    try:
        return config_lib.model_kwargs(text)
    except ValueError as e:
        runtime.fail(e, runtime.ExitStatus.BAD_INPUT)


def add_common_arguments(parser: argparse.ArgumentParser, *, rounds: int, warmup: int = 1) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="A tiny model and batch, a few steps: checks that the script runs (seconds).",
    )
    parser.add_argument(
        "--out-dir", default=RESULTS_DIR, help="Where to write CSV, markdown and JSON results."
    )
    parser.add_argument("--warmup", type=int, default=warmup, help="Untimed rounds first.")
    parser.add_argument(
        "--rounds", type=int, default=rounds, help="Timed rounds (one step per config each)."
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="Stop timing a group of configurations after this many minutes (at least 3 rounds).",
    )
    parser.add_argument("--seed", type=int, default=0)


def machine_markdown(machine: Mapping[str, Any], loads: Mapping[str, Any]) -> str:
    versions = ", ".join(
        f"{p} {machine[p]}" for p in ("jax", "jaxlib", "flax", "optax", "torch") if machine.get(p)
    )
    return (
        f"Machine: {machine['cpu_model']}, {machine['cpu_cores']} cores, "
        f"{machine.get('memory_gib')} GiB; JAX backend {machine['jax_backend']} "
        f"({machine['jax_devices']}); Python {machine['python']}; {versions}.\n"
        f"Load average (1/5/15 min): "
        + "; ".join(f"{k} {v[0]:.2f}/{v[1]:.2f}/{v[2]:.2f}" for k, v in loads.items())
        + "."
    )


def write_results(
    benchmark: str,
    args: argparse.Namespace,
    *,
    title: str,
    tables: Sequence[tuple[str, Sequence[Mapping[str, Any]], Sequence[str]]],
    loads: Mapping[str, Any],
    notes: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
    cpu_note: str | None = None,
) -> None:
    """Prints the tables and writes, in ``args.out_dir``, ``<name>.csv`` (the first table, every
    column; further tables as ``<name>_<heading>.csv``), ``<name>.md`` (all tables, machine,
    command, notes) and ``<name>.json`` (everything); the name is the benchmark's, with
    ``_quick`` under ``--quick``. `cpu_note`: the last note of a run on a CPU, saying which
    rows a GPU would add (e.g. :data:`NO_GPU_ROWS`)."""
    name = f"{benchmark}_quick" if args.quick else benchmark
    out_dir = args.out_dir
    os.makedirs(out_dir, exist_ok=True)
    machine = machine_info()
    if cpu_note and machine["jax_backend"] == "cpu":
        notes = [*notes, cpu_note]
    command = reporting.command_line()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"# {title}", "", f"`{command}` ({stamp})", "", machine_markdown(machine, loads), ""]
    for heading, rows, columns in tables:
        if heading:
            parts += [f"## {heading}", ""]
        parts += [reporting.markdown_table(rows, columns, fmt=reporting.format_measurement), ""]
    if notes:
        parts += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    text = "\n".join(parts)
    print("\n" + text)

    for index, (heading, rows, _) in enumerate(tables):
        suffix = "" if index == 0 else "_" + re.sub(r"[^a-z0-9]+", "_", heading.lower()).strip("_")
        reporting.write_csv(os.path.join(out_dir, f"{name}{suffix}.csv"), rows)
    reporting.write_text(os.path.join(out_dir, f"{name}.md"), text)
    payload = {
        "title": title,
        "command": command,
        "time": stamp,
        "machine": machine,
        "load_average": loads,
        "tables": {heading or "main": list(rows) for heading, rows, _ in tables},
        "notes": list(notes),
        **(extra or {}),
    }
    reporting.write_json(os.path.join(out_dir, f"{name}.json"), payload, indent=1)
    print(f"Wrote {os.path.join(out_dir, name)}.{{csv,md,json}}")
