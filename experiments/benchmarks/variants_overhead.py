"""Step time of the SAM variants, as ratios to SGD and to SAM, in one interleaved run.

    python -m experiments.benchmarks.variants_overhead                     # MLP, CPU, ~2 min
    python -m experiments.benchmarks.variants_overhead --model resnet18 --batch-size 256  # GPU
    python -m experiments.benchmarks.variants_overhead --quick             # smoke run, seconds

Configurations, each ``chain(<variant>, sgd(0.1, momentum=0.9))`` on the same model, batch and
training step (forward-backward with BatchNorm statistics from the first pass, the optimizer,
the parameter update; the state is donated):

* ``sgd``: the base optimizer alone (one forward-backward pass per step);
* ``sam``, ``ssam`` (StableSAM), ``gsam``, ``fsam`` (Friendly SAM), ``vasso``: two passes;
* ``looksam``: ``looksam(k=K)``, the second pass on one step in K: (K + 1) / (2K) of SAM;
* ``sam_every_k``: ``sam`` with the rho schedule ``rho if t % K == 0 else 0``, the second pass
  skipped at run time on the other steps: also (K + 1) / (2K) of SAM.

LookSAM's and the schedule's steps alternate between one and two passes, so every timed sample
is a cycle of K consecutive steps (one SAM step in each), for every configuration alike: the
medians are of cycles, and the per-step times are the cycle times divided by K. The
configurations run round-robin, in a fresh random order each round, after warm-up rounds
(``experiments.benchmarks.timing.interleave``). The optimizer updates are also timed alone, to
separate each variant's own arithmetic from the passes.

The default model is an MLP (3072-1024-1024-10) because of a known XLA:CPU problem
(jax-ml/jax#12868): convolutions inside a ``lax.cond`` (or ``while``) branch run through a much
slower code path than the same convolutions outside it. With a convolutional model on a CPU, a
second pass behind LookSAM's or a rho schedule's ``lax.cond`` therefore costs many times a
normal pass (about 20x for ``small_cnn`` at batch 64 on a 2-core machine), and those rows do not
show the pass count. GPUs do not have this problem: use ``--model`` with a zoo model there.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

import sam_optax
from experiments import models
from experiments.benchmarks import common, timing

DEFAULT_OUTPUT_DIR = os.path.join("runs", "benchmarks")


# The default model: the zoo's MLP at these widths (no convolution, see the module docstring).
MLP_WIDTHS = (1024, 1024)


def init_model(name: str, model_kwargs: Mapping[str, Any], seed: int) -> tuple[Any, Any]:
    """`name` is a model of experiments.models; returns the model and its variables. For "mlp",
    the hidden widths are ``features`` (or the zoo's ``hidden``), by default :data:`MLP_WIDTHS`."""
    if name == "mlp" and "hidden" not in model_kwargs:
        model_kwargs = dict(model_kwargs)
        model_kwargs["hidden"] = tuple(model_kwargs.pop("features", MLP_WIDTHS))
    return common.init_model(name, model_kwargs=model_kwargs, seed=seed)


def variant_transforms(rho: float, k: int) -> dict[str, tuple[Callable[[], Any], bool]]:
    """name -> (a factory of the transformation in front of the base optimizer or None, whether
    the step passes `grad_fn`)."""

    def every_k(count):
        return jnp.where(count % k == 0, rho, 0.0)

    return {
        "sgd": (lambda: None, False),
        "sam": (lambda: sam_optax.sam(rho), True),
        "ssam": (lambda: sam_optax.sam(rho, stable=True), True),
        "gsam": (lambda: sam_optax.gsam(rho, alpha=0.1), True),
        "looksam": (lambda: sam_optax.looksam(rho, k=k, alpha=0.7), True),
        "fsam": (lambda: sam_optax.friendly_sam(rho, sigma=1.0, lmbda=0.9), True),
        "vasso": (lambda: sam_optax.vasso(rho, theta=0.9), True),
        "sam_every_k": (lambda: sam_optax.sam(every_k), True),
    }


# Expected cost in passes relative to SAM (two passes per step).
def expected_vs_sam(name: str, k: int) -> float:
    if name == "sgd":
        return 0.5
    if name in ("looksam", "sam_every_k"):
        return (k + 1) / (2 * k)
    return 1.0


def make_tx(factory: Callable[[], Any]) -> optax.GradientTransformation:
    """The variant in front of the base optimizer (SGD with momentum 0.9)."""
    front, base = factory(), optax.sgd(0.1, momentum=0.9)
    return base if front is None else optax.chain(front, base)


def make_step(model: Any, tx: optax.GradientTransformation, *, is_sam: bool) -> Callable:
    """One training step: (params, batch_stats, opt_state), images, labels -> new state, loss."""

    def loss_fn(params, batch_stats, images, labels):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
            logits, new_state = model.apply(variables, images, train=True, mutable=["batch_stats"])
            new_stats = new_state["batch_stats"]
        else:
            logits, new_stats = model.apply(variables, images, train=True), batch_stats
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, new_stats

    def step(state, images, labels):
        params, batch_stats, opt_state = state
        x = images.astype(jnp.float32) / 255.0 - 0.5
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, x, labels
        )
        if is_sam:
            # The second pass keeps the first pass's BatchNorm statistics.
            def grad_fn(p):
                return jax.grad(lambda q: loss_fn(q, batch_stats, x, labels)[0])(p)

            updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
        else:
            updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), new_stats, opt_state), loss

    return step


class Cycle:
    """A compiled training step run `k` times per timed sample, with its own (donated) state."""

    def __init__(self, name, model, variables, tx, *, is_sam, images, labels, k):
        self.name, self.k = name, k
        params = jax.tree.map(jnp.copy, variables["params"])
        batch_stats = jax.tree.map(jnp.copy, variables.get("batch_stats", {}))
        self.state = (params, batch_stats, tx.init(params))
        self.images, self.labels = images, labels
        jitted = jax.jit(make_step(model, tx, is_sam=is_sam), donate_argnums=0)
        self.compiled, self.compile_s = timing.compile_timed(jitted, self.state, images, labels)

    def bench(self) -> timing.Bench:
        def run():
            loss = None
            for _ in range(self.k):
                self.state, loss = self.compiled(self.state, self.images, self.labels)
            return loss

        return timing.Bench(self.name, run)


class UpdateCycle:
    """The optimizer update alone (no forward-backward pass), `k` steps per timed sample.

    `grad_fn` is replaced by a cheap gradient that depends on the perturbed weights,
    g + 1e-3 w, so that the ascent is computed but the second pass costs one elementwise op:
    what remains is each variant's own arithmetic (norms, inner products, buffers) and its
    control flow, free of the forward-backward passes and of most of their noise.
    """

    def __init__(self, name, tx, params, *, is_sam, k):
        self.name, self.k = name, k

        def update(params, opt_state, grads):
            if is_sam:
                grad_fn = lambda p: jax.tree.map(lambda g, w: g + 1e-3 * w, grads, p)  # noqa: E731
                updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
            else:
                updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        self.params = jax.tree.map(jnp.copy, params)
        self.opt_state = tx.init(self.params)
        self.grads = jax.tree.map(lambda w: 1e-3 + 1e-2 * w, params)
        jitted = jax.jit(update, donate_argnums=(0, 1))
        self.compiled, _ = timing.compile_timed(jitted, self.params, self.opt_state, self.grads)

    def bench(self) -> timing.Bench:
        def run():
            for _ in range(self.k):
                self.params, self.opt_state = self.compiled(self.params, self.opt_state, self.grads)
            return self.params

        return timing.Bench(self.name, run)


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def rows_from(
    stats: Mapping[str, Mapping[str, float]],
    update_stats: Mapping[str, Mapping[str, float]],
    cycles: Mapping[str, Cycle],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    rows = []
    for name, s in stats.items():
        update_ms = update_stats[name]["median_ms"] / args.k
        rows.append(
            {
                "model": args.model,
                "batch": args.batch_size,
                "config": name,
                "step_ms": s["median_ms"] / args.k,
                "vs_sgd": ratio(s["median_ms"], stats["sgd"]["median_ms"]),
                "vs_sam": ratio(s["median_ms"], stats["sam"]["median_ms"]),
                "expected_vs_sam": expected_vs_sam(name, args.k),
                "cpu_vs_sgd": ratio(s["cpu_median_ms"], stats["sgd"]["cpu_median_ms"]),
                "cpu_vs_sam": ratio(s["cpu_median_ms"], stats["sam"]["cpu_median_ms"]),
                "update_alone_ms": update_ms,
                "update_extra_vs_sam": ratio(
                    update_ms - update_stats["sam"]["median_ms"] / args.k,
                    stats["sam"]["median_ms"] / args.k,
                ),
                "cycles": s["n"],
                "cycle_median_ms": s["median_ms"],
                "cycle_p25_ms": s["p25_ms"],
                "cycle_p75_ms": s["p75_ms"],
                "compile_s": cycles[name].compile_s,
            }
        )
    return rows


COLUMNS = [
    "model",
    "batch",
    "config",
    "step_ms",
    "vs_sgd",
    "vs_sam",
    "expected_vs_sam",
    "cpu_vs_sgd",
    "cpu_vs_sam",
    "update_alone_ms",
    "update_extra_vs_sam",
    "cycles",
    "cycle_p25_ms",
    "cycle_p75_ms",
    "compile_s",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="mlp",
        help="mlp (no convolution, see above) or a model of experiments.models.",
    )
    parser.add_argument("--model-kwargs", default="", help="JSON, e.g. '{\"features\": [16, 32]}'.")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--k", type=int, default=5, help="LookSAM's k and the SAM-every-k period.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed rounds first.")
    parser.add_argument("--rounds", type=int, default=15, help="Timed rounds (one cycle each).")
    parser.add_argument(
        "--max-minutes", type=float, default=None, help="Stop timing after this many minutes."
    )
    parser.add_argument(
        "--update-rounds", type=int, default=30, help="Rounds of the updates timed alone."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output-dir",
        "--out-dir",
        dest="out_dir",
        default=DEFAULT_OUTPUT_DIR,
        help="Where to write CSV, markdown and JSON.",
    )
    parser.add_argument("--quick", action="store_true", help="A tiny CNN, a few rounds (seconds).")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.model_kwargs = "small_cnn", '{"features": [8, 16]}'
        args.batch_size, args.rounds, args.warmup, args.update_rounds = 8, 3, 1, 3
    if args.k < 1:
        parser.error("--k must be >= 1")
    if args.model not in models.MODELS:
        parser.error(f"--model must be mlp or one of {sorted(models.MODELS)}")
    return args


def notes(args: argparse.Namespace) -> list[str]:
    return [
        f"Each sample is a cycle of k = {args.k} consecutive steps of one configuration (one "
        "SAM step per cycle for looksam and sam_every_k); step_ms is the median cycle / k.",
        "vs_sgd, vs_sam: ratios of the median cycle times (wall clock); cpu_*: of the median "
        "process CPU times (steadier on a shared machine).",
        "expected_vs_sam: the pass count relative to SAM's two passes per step: 0.5 for SGD, "
        f"(k + 1) / (2k) = {(args.k + 1) / (2 * args.k):.2f} for looksam and sam_every_k.",
        "Base optimizer: SGD with momentum 0.9; rho "
        f"{args.rho}; GSAM alpha 0.1; LookSAM alpha 0.7; Friendly SAM sigma 1, lmbda 0.9; "
        "VaSSO theta 0.9. Synthetic CIFAR-shaped uint8 batch.",
        "update_alone_ms: the optimizer update alone per step (the second pass replaced by one "
        "elementwise op), timed in a separate interleaved run; update_extra_vs_sam: its excess "
        "over SAM's update as a share of a SAM step, i.e. what the variant's own arithmetic adds "
        "to vs_sam beyond the pass count.",
    ]


def time_steps(model, variables, images, labels, args, loads) -> tuple[dict, dict]:
    """Every variant's training step, compiled and timed in cycles of k steps: the compiled
    cycles and the samples per name."""
    cycles = {}
    for name, (factory, is_sam) in variant_transforms(args.rho, args.k).items():
        cycles[name] = Cycle(
            name,
            model,
            variables,
            make_tx(factory),
            is_sam=is_sam,
            images=images,
            labels=labels,
            k=args.k,
        )
        print(f"{name}: compiled in {cycles[name].compile_s:.1f} s", flush=True)
    loads["compiled"] = common.load_average()
    samples = timing.interleave_with_args(
        [c.bench() for c in cycles.values()], args, seed=args.seed
    )
    loads["steps timed"] = common.load_average()
    return cycles, samples


def time_updates(params, args) -> dict[str, dict[str, float]]:
    """Every variant's optimizer update timed alone: its statistics per name."""
    print(f"Optimizer updates alone ({args.update_rounds} rounds)", flush=True)
    updates = [
        UpdateCycle(name, make_tx(factory), params, is_sam=is_sam, k=args.k)
        for name, (factory, is_sam) in variant_transforms(args.rho, args.k).items()
    ]
    update_samples = timing.interleave(
        [u.bench() for u in updates],
        warmup=2,
        rounds=args.update_rounds,
        seed=args.seed,
        log=lambda _: None,
    )
    return {name: timing.summarize(values) for name, values in update_samples.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model_kwargs = common.model_kwargs(args.model_kwargs)
    model, variables = init_model(args.model, model_kwargs, args.seed)
    images, labels = common.synthetic_batch(args.batch_size, seed=args.seed)
    images, labels = jnp.asarray(images), jnp.asarray(labels)

    loads = {"start": common.load_average()}
    cycles, samples = time_steps(model, variables, images, labels, args, loads)
    stats = {name: timing.summarize(values) for name, values in samples.items()}
    update_stats = time_updates(variables["params"], args)
    loads["end"] = common.load_average()
    common.write_results(
        "variants_overhead",
        args,
        title="Step time of the SAM variants relative to SGD and SAM",
        tables=[("", rows_from(stats, update_stats, cycles, args), COLUMNS)],
        loads=loads,
        notes=notes(args),
        extra={"samples": timing.samples_rows(samples, model=args.model)},
    )


if __name__ == "__main__":
    main()
