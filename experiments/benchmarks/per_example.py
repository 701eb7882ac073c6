"""What per-example SAM costs: its exact two-pass form and the one-pass head forms against SGD,
SAM and the ascent per micro-batch in a `lax.scan`.

    python -m experiments.benchmarks.per_example            # the frontier's MLP, batch 128
    python -m experiments.benchmarks.per_example --quick    # a tiny MLP: checks that it runs

Every configuration is one jitted training step (gradient, transformation, SGD update) of the
efficiency frontier's model, the 784-512-512-10 Flax MLP on a batch of 128 synthetic 28x28
images: ``sgd``; ``sam`` (two passes); ``m1_scan`` (``sam(...).update(None, ...,
micro_batches=...)`` with one example per micro-batch, the frontier's former m = 1);
``m1_vmap16`` (the same with ``micro_batch_chunk=16``: 16 ascents at once under `jax.vmap`);
``m1_exact`` and ``m16_exact`` (:func:`sam_optax.per_example.value_and_grad` and
:func:`sam_optax.per_example_sam`); ``head1`` and ``head2`` (:func:`sam_optax.per_example.sam_loss`
on the last one or two dense layers, one pass). Steps run round-robin (the timing protocol of
:mod:`experiments.benchmarks.timing`); the table gives the median step time relative to SGD's
and SAM's, XLA's FLOPs per step, and the compiled step's memory (``memory_analysis()``).
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import sam_optax
from experiments import runtime
from experiments.benchmarks import common, timing

RHO = 0.05
CONFIGS = ("sgd", "sam", "m1_scan", "m1_vmap16", "m1_exact", "m16_exact", "head1", "head2")


class MLP(nn.Module):
    """The frontier's model (experiments.models.MLP): flatten, Dense-ReLU layers, a classifier."""

    hidden: Sequence[int]
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


def make_steps(model: nn.Module, batch_size: int) -> dict:
    """One jitted ``step(params, opt_state, x, y) -> (params, opt_state)`` per configuration."""
    sgd = optax.sgd(0.1, momentum=0.9)

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    def plain(params, opt_state, x, y):
        updates, opt_state = sgd.update(jax.grad(loss_fn)(params, x, y), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def with_sam(tx, micro_batch, chunk, params, opt_state, x, y):
        if micro_batch:
            split = lambda v: v.reshape(-1, micro_batch, *v.shape[1:])  # noqa: E731
            updates, opt_state = tx.update(
                None, opt_state, params, grad_fn=lambda p, b: jax.grad(loss_fn)(p, *b),
                micro_batches=(split(x), split(y)), micro_batch_chunk=chunk,
            )  # fmt: skip
        else:
            grad_fn = lambda p: jax.grad(loss_fn)(p, x, y)  # noqa: E731
            updates, opt_state = tx.update(grad_fn(params), opt_state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), opt_state

    def exact(tx, group_size, params, opt_state, x, y):
        value_and_grad = sam_optax.per_example.value_and_grad(loss_fn, group_size=group_size)
        _, grads, sam_grad_fn = value_and_grad(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, sam_grad_fn=sam_grad_fn)
        return optax.apply_updates(params, updates), opt_state

    def head(last_layers, params, opt_state, x, y):
        shifted = sam_optax.per_example.sam_loss(loss_fn, RHO, last_layers=last_layers)
        grads = jax.grad(lambda p: shifted(p, x, y)[0])(params)
        updates, opt_state = sgd.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    sam = optax.chain(sam_optax.sam(RHO), sgd)
    per_example = optax.chain(sam_optax.per_example_sam(RHO), sgd)
    functions = {
        "sgd": (plain, sgd),
        "sam": (functools.partial(with_sam, sam, 0, 1), sam),
        "m1_scan": (functools.partial(with_sam, sam, 1, 1), sam),
        "m1_vmap16": (functools.partial(with_sam, sam, 1, min(16, batch_size)), sam),
        "m1_exact": (functools.partial(exact, per_example, 1), per_example),
        "m16_exact": (functools.partial(exact, per_example, min(16, batch_size)), per_example),
        "head1": (functools.partial(head, 1), sgd),
        "head2": (functools.partial(head, 2), sgd),
    }
    return {name: (jax.jit(fn, donate_argnums=(0, 1)), tx) for name, (fn, tx) in functions.items()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmarks.per_example", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    common.add_common_arguments(parser, rounds=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hidden", default="512,512", help="Hidden widths of the MLP.")
    args = parser.parse_args(argv)
    args.hidden = common.positive_ints(args.hidden, "--hidden")
    if args.quick:
        args.batch_size, args.hidden, args.rounds, args.warmup = 16, [16, 16], 2, 1
    if args.batch_size < 1 or args.batch_size % min(16, args.batch_size):
        parser.error(f"--batch-size must be a positive multiple of 16, got {args.batch_size}")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    loads = {"start": os.getloadavg()}
    model = MLP(tuple(args.hidden))
    keys = jax.random.split(jax.random.key(args.seed), 3)
    x = jax.random.normal(keys[0], (args.batch_size, 28, 28, 1))
    y = jax.random.randint(keys[1], (args.batch_size,), 0, 10)
    params = model.init(keys[2], x)["params"]
    benches, analysis = [], {}
    for name, (step, tx) in make_steps(model, args.batch_size).items():
        state = {"params": jax.tree.map(jnp.copy, params)}
        state["opt_state"] = tx.init(state["params"])
        compiled, seconds = timing.compile_timed(step, state["params"], state["opt_state"], x, y)
        analysis[name] = {
            "compile_s": seconds, **timing.cost(compiled), **timing.memory(compiled)
        }  # fmt: skip

        def run(step=compiled, state=state):
            state["params"], state["opt_state"] = step(state["params"], state["opt_state"], x, y)
            return state["params"]

        benches.append(timing.Bench(name, run))
    samples = timing.interleave_with_args(benches, args)
    loads["end"] = os.getloadavg()
    medians = {name: timing.summarize(s) for name, s in samples.items()}
    rows = [
        {
            "config": name,
            "median_ms": medians[name]["median_ms"],
            "vs_sgd": medians[name]["median_ms"] / medians["sgd"]["median_ms"],
            "vs_sam": medians[name]["median_ms"] / medians["sam"]["median_ms"],
            "cpu_vs_sam": medians[name]["cpu_median_ms"] / medians["sam"]["cpu_median_ms"],
            "gflops": analysis[name]["xla_gflops"],
            "flops_vs_sgd": analysis[name]["xla_gflops"] / analysis["sgd"]["xla_gflops"],
            "temp_mib": analysis[name].get("temp_mib", float("nan")),
            "compile_s": analysis[name]["compile_s"],
        }
        for name in CONFIGS
    ]
    common.write_results(
        "per_example",
        args,
        title=f"Per-example SAM's step cost: MLP {args.hidden}, batch {args.batch_size}",
        tables=[("", rows, list(rows[0]))],
        loads=loads,
        notes=[
            "median_ms: the median step time (wall clock) over the timed rounds; vs_sgd, vs_sam: "
            "its ratio to SGD's and SAM's; cpu_vs_sam: the same ratio of process CPU time, "
            "steadier on a shared machine.",
            "gflops: XLA's cost analysis of the compiled step (it counts a while loop's body "
            "once, so m1_scan's figure is one example's, not the step's); temp_mib: its "
            "temporary buffers (memory_analysis).",
        ],
        extra={"samples": timing.samples_rows(samples)},
        cpu_note="Not measured on a GPU yet.",
    )
    return rows


if __name__ == "__main__":
    runtime.run_command(main)
