"""Memory of SAM with gradient accumulation: the compiled step's temporaries against k.

For k micro-batches of m images, compiles (no run needed) one SAM step in four ways and reads
XLA's memory analysis of each:

* ``per_micro_batch``: ``sam(...).update(None, ..., grad_fn=per_batch_grad_fn,
  micro_batches=...)``, each micro-batch ascending from its own gradient (a ``lax.scan``);
* ``global``: ``grad_fn = sam_optax.accumulate_grad_fn(per_batch_grad_fn, micro_batches)``, the
  ascent from the mean gradient (a ``lax.scan``; SAM on the whole batch);
* ``vmap``: ``sam(axis_name="m")`` under ``jax.vmap`` over the micro-batches (m-sharpness, all k
  micro-batches' activations alive at once), for contrast;
* ``whole_batch``: plain SAM on the k m images at once, for contrast.

The scans' temporaries should stay flat in k (one micro-batch's activations), the others grow
linearly. Writes ``accumulation_memory.json`` and ``.md`` to ``--out-dir``
(``runs/benchmarks`` by default)::

  python -m experiments.benchmarks.accumulation_memory [--micro-batch 32] [--ks 1,2,4,8,16]
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import jax.numpy as jnp
import optax

import sam_optax
from experiments import reporting
from experiments.benchmarks import common

MODES = ("per_micro_batch", "global", "vmap", "whole_batch")


def init_params(key: jax.Array, width: int, classes: int = 10) -> dict:
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "conv1": jax.random.normal(k1, (3, 3, 3, width)) * 0.2,
        "conv2": jax.random.normal(k2, (3, 3, width, width)) * 0.1,
        "dense": jax.random.normal(k3, (width, classes)) * 0.1,
    }


def loss_fn(params: dict, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    images, labels = batch
    dims = ("NHWC", "HWIO", "NHWC")
    x = jax.lax.conv_general_dilated(
        images, params["conv1"], (1, 1), "SAME", dimension_numbers=dims
    )
    x = jax.nn.relu(x)
    x = jax.lax.conv_general_dilated(x, params["conv2"], (1, 1), "SAME", dimension_numbers=dims)
    logits = jax.nn.relu(x).mean(axis=(1, 2)) @ params["dense"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def step_fn(mode: str, tx: optax.GradientTransformationExtraArgs):
    batch_grad_fn = jax.grad(loss_fn)

    def step(params, opt_state, micro_batches):
        if mode == "per_micro_batch":
            updates, opt_state = tx.update(
                None, opt_state, params, grad_fn=batch_grad_fn, micro_batches=micro_batches
            )
        elif mode == "global":
            grad_fn = sam_optax.accumulate_grad_fn(batch_grad_fn, micro_batches)
            updates, opt_state = tx.update(grad_fn(params), opt_state, params, grad_fn=grad_fn)
        elif mode == "whole_batch":
            batch = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), micro_batches)
            grad_fn = lambda p: batch_grad_fn(p, batch)  # noqa: E731
            updates, opt_state = tx.update(grad_fn(params), opt_state, params, grad_fn=grad_fn)
        else:  # vmap: sam(axis_name="m") over the micro-batches

            def one(batch):
                grad_fn = lambda p: batch_grad_fn(p, batch)  # noqa: E731
                return tx.update(grad_fn(params), opt_state, params, grad_fn=grad_fn)

            updates, opt_state = jax.vmap(one, axis_name="m", out_axes=None)(micro_batches)
        return optax.apply_updates(params, updates), opt_state

    return step


def measure(mode: str, k: int, micro_batch: int, size: int, width: int) -> dict:
    tx_kwargs = dict(stable=True, axis_name="m") if mode == "vmap" else dict(stable=True)
    tx = optax.chain(sam_optax.sam(0.05, **tx_kwargs), optax.sgd(0.1, momentum=0.9))
    params = init_params(jax.random.key(0), width)
    opt_state = tx.init(params)
    micro_batches = (
        jax.ShapeDtypeStruct((k, micro_batch, size, size, 3), jnp.float32),
        jax.ShapeDtypeStruct((k, micro_batch), jnp.int32),
    )
    compiled = jax.jit(step_fn(mode, tx)).lower(params, opt_state, micro_batches).compile()
    analysis = compiled.memory_analysis()
    return dict(
        mode=mode,
        k=k,
        micro_batch=micro_batch,
        batch=k * micro_batch,
        temp_bytes=int(analysis.temp_size_in_bytes),
        argument_bytes=int(analysis.argument_size_in_bytes),
        output_bytes=int(analysis.output_size_in_bytes),
    )


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    ks = sorted({row["k"] for row in rows})
    table = {(row["mode"], row["k"]): row["temp_bytes"] for row in rows}
    lines = [
        "# SAM with gradient accumulation: compiled temporaries (MiB) against k",
        "",
        f"Micro-batch {args.micro_batch} images of {args.size}x{args.size}x3, a 2-layer CNN of "
        f"width {args.width}, StableSAM + SGD momentum, float32; XLA's memory analysis of the "
        f"compiled step on {jax.devices()[0].platform} (jax {jax.__version__}, "
        f"{platform.machine()}).",
        "",
        "| mode | " + " | ".join(f"k = {k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for mode in MODES:
        cells = [f"{table[mode, k] / 2**20:.2f}" for k in ks]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "`per_micro_batch` and `global` scan over the micro-batches: their temporaries hold one",
        "micro-batch's activations whatever k is. `vmap` and `whole_batch` hold all k at once.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=16, help="image height and width")
    parser.add_argument("--width", type=int, default=32, help="CNN channels")
    parser.add_argument("--ks", default="1,2,4,8,16", help="numbers of micro-batches")
    parser.add_argument("--out-dir", default=os.path.join("runs", "benchmarks"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.micro_batch, args.size, args.width, args.ks = 4, 8, 4, "1,4"
    ks = common.positive_ints(args.ks, "--ks")
    rows = [measure(mode, k, args.micro_batch, args.size, args.width) for mode in MODES for k in ks]
    report = markdown(rows, args)
    print(report)
    os.makedirs(args.out_dir, exist_ok=True)
    reporting.write_json(
        os.path.join(args.out_dir, "accumulation_memory.json"), dict(config=vars(args), rows=rows)
    )
    reporting.write_text(os.path.join(args.out_dir, "accumulation_memory.md"), report)
    return rows


if __name__ == "__main__":
    main()
