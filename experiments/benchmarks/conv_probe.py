"""Where the time of a CPU training step goes: one 3x3 convolution, forward and backward, in
XLA (JAX) and in PyTorch (oneDNN), at the four stage shapes of the CIFAR ResNet-18.

    python -m experiments.benchmarks.conv_probe                    # batch 128, float32
    XLA_FLAGS=--xla_cpu_use_onednn=true python -m experiments.benchmarks.conv_probe --no-torch

Explains the ``vs_torch`` ratio on a CPU: SAM's arithmetic is a fraction of a percent of a step
(see ``overhead``), so the step time is the convolutions', and those are the backend's. Each row
is one convolution (stride 1, same padding, NHWC in JAX, NCHW in PyTorch) with the gradients of
both its input and its kernel, as in training; GFLOP/s counts 3 x 2 x MACs.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import common, timing

# (spatial size, channels) of the 3x3 convolutions in ResNet-18's four stages on 32x32 inputs.
RESNET18_STAGES = ((32, 64), (16, 128), (8, 256), (4, 512))


def jax_bench(batch: int, size: int, channels: int, seed: int) -> timing.Bench:
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, size, size, channels), np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, channels, channels), np.float32) * 0.05)
    cotangent = jnp.asarray(rng.standard_normal((batch, size, size, channels), np.float32))

    def loss(x, w):
        y = jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.sum(y * cotangent)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    jax.block_until_ready(grad(x, w))
    return timing.Bench(f"xla {size}x{size}x{channels}", lambda: grad(x, w))


def torch_bench(batch: int, size: int, channels: int, seed: int) -> timing.Bench:
    import torch

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=generator, requires_grad=True)
    w = torch.randn(channels, channels, 3, 3, generator=generator) * 0.05
    w.requires_grad_(True)
    cotangent = torch.randn(batch, channels, size, size, generator=generator)

    def step():
        x.grad = w.grad = None
        y = torch.nn.functional.conv2d(x, w, padding=1)
        y.backward(cotangent)
        return w.grad

    return timing.Bench(f"torch {size}x{size}x{channels}", step, block=lambda _: None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True)
    common.add_common_arguments(parser, rounds=5, warmup=1)
    args = parser.parse_args(argv)
    stages = RESNET18_STAGES
    if args.quick:
        args.batch_size, args.rounds, stages = 2, 3, RESNET18_STAGES[-1:]
    use_torch = args.torch
    if use_torch:
        try:
            import torch

            torch.set_num_threads(os.cpu_count())
        except ImportError:
            use_torch = False

    loads = {"start": common.load_average()}
    rows = []
    for size, channels in stages:
        benches = [jax_bench(args.batch_size, size, channels, args.seed)]
        if use_torch:
            benches.append(torch_bench(args.batch_size, size, channels, args.seed))
        samples = timing.interleave(
            benches, warmup=args.warmup, rounds=args.rounds, log=lambda _: None
        )
        gflop = 3 * 2 * args.batch_size * size * size * channels * channels * 9 / 1e9
        medians = {}
        for bench in benches:
            stats = timing.summarize(samples[bench.name])
            medians[bench.name.split()[0]] = stats["median_ms"]
            rows.append(
                {
                    "library": bench.name.split()[0],
                    "shape": f"{args.batch_size}x{size}x{size}x{channels}",
                    "gflop_fwd_bwd": gflop,
                    **stats,
                    "gflop_per_s": gflop / stats["median_ms"] * 1e3,
                }
            )
        if "torch" in medians:
            for row in rows[-len(benches) :]:
                row["time / torch"] = row["median_ms"] / medians["torch"]
        print(rows[-1] if not use_torch else rows[-2:], flush=True)
    loads["end"] = common.load_average()
    notes = [
        "One 3x3 convolution, stride 1: gradients with respect to input and kernel "
        "(time / torch > 1: XLA slower).",
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}.",
    ]
    common.write_results(
        "conv_probe",
        args,
        title="One convolution, forward and backward: XLA:CPU vs PyTorch (oneDNN)",
        tables=[("", rows, list(rows[-1]))],
        loads=loads,
        notes=notes,
    )


if __name__ == "__main__":
    main()
