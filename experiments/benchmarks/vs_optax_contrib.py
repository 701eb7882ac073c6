"""sam_optax.sam against optax.contrib.sam (the JAX peer, opaque mode): step time and memory.

    python -m experiments.benchmarks.vs_optax_contrib                 # CPU: ResNet-18, b128
    python -m experiments.benchmarks.vs_optax_contrib --dtype bfloat16 --batch-size 512  # GPU
    python -m experiments.benchmarks.vs_optax_contrib --quick

Both run inside the same training step (``steps.make_train_step``: same model, batch,
augmentation, BatchNorm statistics from the first pass only) with the same base optimizer
(``add_decayed_weights(5e-4)``, SGD with momentum 0.9 and the cosine schedule):

* ours: ``chain(sam_optax.sam(0.05), add_decayed_weights, sgd)``;
* peer: ``optax.contrib.sam(chain(add_decayed_weights, sgd), chain(contrib.normalize(),
  sgd(0.05)), opaque_mode=True)``, its ``grad_fn(params, i)`` fed by the same gradient function.

Both compute w + 0.05 g / ||g|| and the gradient there, so after one step from the same state
the parameters agree to rounding (printed). Memory is the compiled executable's
``memory_analysis()`` (arguments + outputs + temporaries - aliased/donated bytes), plus the
optimizer state each keeps between steps. Target: not slower, no more memory.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from experiments import optimizers
from experiments.benchmarks import common, timing

STEPS_PER_EPOCH = 390


def optax_contrib_sam(
    rho: float, base: optax.GradientTransformation
) -> optax.GradientTransformationExtraArgs:
    """``optax.contrib.sam`` in opaque mode, adapted to ``update(..., grad_fn=f(params))``.

    ``make_train_step`` hands its optimizer a one-argument ``grad_fn``; the peer calls
    ``grad_fn(params, i)`` (i: the adversarial step), so the adapter drops ``i``. Nothing else
    changes: one adversarial step (``sync_period=2``), state reset every step (the defaults).
    """
    adversarial = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
    peer = optax.contrib.sam(base, adversarial, opaque_mode=True)

    def update_fn(updates, state, params=None, *, grad_fn: Callable | None = None, **extra: Any):
        del extra
        return peer.update(updates, state, params, grad_fn=lambda p, _: grad_fn(p))

    return optax.GradientTransformationExtraArgs(peer.init, update_fn)


def max_abs_difference(a: Any, b: Any) -> float:
    return float(
        max(
            jnp.max(jnp.abs(x - y))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )
    )


def run_model(model_name: str, args: argparse.Namespace, log=print):
    model_kwargs = common.model_kwargs(args.model_kwargs)
    model, variables = common.init_model(
        model_name, dtype=args.dtype, model_kwargs=model_kwargs, seed=args.seed
    )

    def config(optimizer: str):
        # The base optimizer of the peer is the sgd configuration's, which takes no rho.
        rho = {} if optimizer == "sgd" else {"rho": args.rho}
        return common.benchmark_config(
            model_name,
            optimizer,
            batch_size=args.batch_size,
            dtype=args.dtype,
            model_kwargs=model_kwargs,
            **rho,
        )

    transformations = {
        "sam_optax": (
            optimizers.build_optimizer(config("sam"), STEPS_PER_EPOCH, axis_name=None),
            True,
        ),
        "optax.contrib": (
            optax_contrib_sam(
                args.rho,
                optimizers.build_optimizer(config("sgd"), STEPS_PER_EPOCH, axis_name=None),
            ),
            True,
        ),
    }
    steps = common.compile_flax_steps(model_name, model, variables, transformations, args, log)

    # The first step from the same state: the two must agree (it also warms both up).
    for step in steps.values():
        jax.block_until_ready(step.bench().step())
    difference = max_abs_difference(
        steps["sam_optax"].state.params, steps["optax.contrib"].state.params
    )
    step_size = max_abs_difference(steps["sam_optax"].state.params, variables["params"])
    log(
        f"{model_name}: after one step, max |params ours - params peer| = {difference:.3g} "
        f"(the step itself moved the params by up to {step_size:.3g})"
    )

    samples = timing.interleave_with_args([s.bench() for s in steps.values()], args, log=log)
    rows = []
    for name, step in steps.items():
        stats = timing.summarize(samples[name])
        rows.append(
            {
                "model": model_name,
                "batch": args.batch_size,
                "dtype": args.dtype,
                "optimizer": name,
                **stats,
                "images_per_s": args.batch_size / stats["median_ms"] * 1e3,
                **step.analysis(),
                "opt_state_mib": common.tree_bytes(step.state.opt_state) / 2**20,
                "params_after_step1_max_abs_diff": difference,
                "step1_max_abs_update": step_size,
            }
        )
    ours, peer = rows
    comparison = {
        "model": model_name,
        "time ours/peer (wall)": ours["median_ms"] / peer["median_ms"],
        "time ours/peer (cpu)": ours["cpu_median_ms"] / peer["cpu_median_ms"],
        "memory ours-peer (MiB)": ours.get("total_mib", float("nan"))
        - peer.get("total_mib", float("nan")),
        "temp ours-peer (MiB)": ours.get("temp_mib", float("nan"))
        - peer.get("temp_mib", float("nan")),
        "opt state ours-peer (MiB)": ours["opt_state_mib"] - peer["opt_state_mib"],
        "params diff after 1 step": difference,
        "largest update of step 1": step_size,
    }
    comparison["not slower (wall)"] = "yes" if comparison["time ours/peer (wall)"] <= 1.0 else "NO"
    comparison["no more memory"] = "yes" if comparison["memory ours-peer (MiB)"] <= 0 else "NO"
    return rows, comparison, timing.samples_rows(samples, model=model_name)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_model_arguments(parser, models="resnet18")
    parser.add_argument("--rho", type=float, default=0.05)
    common.add_common_arguments(parser, rounds=4, warmup=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.model_kwargs = "small_cnn", common.QUICK_SMALL_CNN
        args.batch_size, args.rounds, args.warmup = 8, 3, 1

    loads = {"start": common.load_average()}
    rows, comparisons, raw = [], [], []
    for model_name in args.models.split(","):
        model_rows, comparison, model_samples = run_model(model_name, args)
        rows += model_rows
        comparisons.append(comparison)
        raw += model_samples
        loads[f"after {model_name}"] = common.load_average()
    notes = [
        "Medians over the timed rounds (round-robin, after warm-up); cpu = process CPU time.",
        "Memory columns (MiB) from the compiled step's memory_analysis(): total = argument + "
        "output + temp - alias (the donated training state is aliased). opt_state_mib: what "
        "each optimizer keeps between steps.",
    ]
    common.write_results(
        "vs_optax_contrib",
        args,
        title="sam_optax.sam vs optax.contrib.sam (opaque mode)",
        tables=[
            (
                "Step time and memory",
                rows,
                [
                    "model",
                    "batch",
                    "dtype",
                    "optimizer",
                    "n",
                    "median_ms",
                    "min_ms",
                    "cpu_median_ms",
                    "images_per_s",
                    "compile_s",
                    "argument_mib",
                    "output_mib",
                    "temp_mib",
                    "alias_mib",
                    "total_mib",
                    "opt_state_mib",
                    "xla_gflops",
                ],
            ),
            ("Comparison", comparisons, list(comparisons[0])),
        ],
        loads=loads,
        notes=notes,
        extra={"samples": raw},
        cpu_note=common.NO_GPU_ROWS,
    )


if __name__ == "__main__":
    main()
