"""sam_optax against PyTorch: a SAM training step of the CIFAR ResNet-18, images per second.

    python -m experiments.benchmarks.vs_torch                       # CPU, float32, batch 128
    python -m experiments.benchmarks.vs_torch --dtype bfloat16 --batch-size 512   # on a GPU
    python -m experiments.benchmarks.vs_torch --quick

Ours: the project's training step (``steps.make_train_step`` with
``chain(sam_optax.sam(0.05), add_decayed_weights(5e-4), sgd(momentum 0.9))``) under ``jax.jit``.
PyTorch: the same architecture (parameter counts checked equal) trained with the two-step SAM
optimizer and a closure, as PyTorch users write it (``experiments.benchmarks.torch_sam``), SGD
with momentum 0.9 and weight decay 5e-4. Same batch, same on-device augmentation, BatchNorm
statistics from the first pass on both sides, same precision.

Rows: on a CPU, PyTorch eager in NCHW with ``torch.set_num_threads(<cores>)`` (``--torch-compile``
adds a torch.compile row). On a GPU, PyTorch at its best: channels_last, with ``--dtype
bfloat16`` autocast to bf16 (AMP), eager and ``torch.compile(model)`` as a second row. Target on
the GPU: images/s at least 1.3x PyTorch eager.
"""

from __future__ import annotations

import os

# JAX and PyTorch share the GPU in this process: JAX must not grab 75 % of its memory upfront.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from experiments import models, optimizers  # noqa: E402
from experiments.benchmarks import common, timing  # noqa: E402

STEPS_PER_EPOCH = 390


def torch_bench(name, model, args, images, labels, *, amp_dtype, channels_last, device):
    import torch

    from experiments.benchmarks import torch_sam

    optimizer = torch_sam.SAM(
        model.parameters(),
        torch.optim.SGD,
        rho=args.rho,
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
    )
    mean = torch.tensor(common.CIFAR10_MEAN, device=device)
    std = torch.tensor(common.CIFAR10_STD, device=device)

    def step():
        return torch_sam.sam_train_step(
            model,
            optimizer,
            images,
            labels,
            mean,
            std,
            amp_dtype=amp_dtype,
            channels_last=channels_last,
        )

    def block(_):
        if device.type == "cuda":
            torch.cuda.synchronize()

    return timing.Bench(name, step, block)


COLUMNS = [
    "implementation",
    "batch",
    "precision",
    "device",
    "threads",
    "params",
    "n",
    "median_ms",
    "min_ms",
    "cpu_median_ms",
    "images_per_s",
    "ours_speedup",
    "ours_speedup_cpu_time",
    "compile_s",
    "first_two_steps_s",
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_model_arguments(parser, models=None)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument(
        "--torch-compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Add a torch.compile row (default: on a GPU only).",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch.set_num_threads (0: all cores)."
    )
    common.add_common_arguments(parser, rounds=4, warmup=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.model_kwargs = '{"num_filters": 4, "stage_sizes": [1, 1]}'
        args.batch_size, args.rounds, args.warmup = 4, 3, 1
    return args


def compile_ours(args, model_kwargs) -> tuple[common.FlaxStep, int]:
    """The project's SAM step of the ResNet-18, compiled, and the model's parameter count."""
    model, variables = common.init_model(
        "resnet18", dtype=args.dtype, model_kwargs=model_kwargs, seed=args.seed
    )
    config = common.benchmark_config(
        "resnet18", "sam", batch_size=args.batch_size, dtype=args.dtype, model_kwargs=model_kwargs
    )
    tx = optimizers.build_optimizer(config, STEPS_PER_EPOCH, axis_name=None)
    (ours,) = common.compile_flax_steps(
        "resnet18", model, variables, {"sam_optax (jax.jit)": (tx, True)}, args
    ).values()
    return ours, models.count_params(variables["params"])


def torch_models(model_kwargs, device, *, channels_last, amp_dtype, use_compile) -> dict:
    """Row name -> the PyTorch ResNet-18 (eager, and compiled when asked)."""
    import torch

    from experiments.benchmarks import torch_sam

    def torch_model():
        net = torch_sam.ResNet(
            num_blocks=tuple(model_kwargs.get("stage_sizes", (2, 2, 2, 2))),
            num_filters=model_kwargs.get("num_filters", 64),
        ).to(device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        return net

    eager_name = (
        "torch eager"
        + (" channels_last" if channels_last else "")
        + (" AMP bf16" if amp_dtype is not None else "")
    )
    nets = {eager_name: torch_model()}
    if use_compile:
        nets[eager_name.replace("eager", "torch.compile")] = torch.compile(torch_model())
    return nets


def first_two_steps_s(bench: timing.Bench) -> float:
    """Seconds of the first two steps, which build (torch.compile: compile) what later steps
    reuse."""
    start = time.perf_counter()
    for _ in range(2):
        bench.block(bench.step())
    return time.perf_counter() - start


def result_rows(benches, samples, ours, first_step_s, args, *, device, threads, params):
    """One row per implementation, with its speed-up of ours (the first row)."""
    rows = []
    for bench in benches:
        stats = timing.summarize(samples[bench.name])
        rows.append(
            {
                "implementation": bench.name,
                "batch": args.batch_size,
                "precision": args.dtype,
                "device": device.type,
                "threads": threads if device.type == "cpu" else None,
                "params": params,
                **stats,
                "images_per_s": args.batch_size / stats["median_ms"] * 1e3,
                "compile_s": ours.compile_s if bench.name == ours.name else None,
                "first_two_steps_s": first_step_s[bench.name],
            }
        )
    for row in rows:
        row["ours_speedup"] = rows[0]["images_per_s"] / row["images_per_s"]
        row["ours_speedup_cpu_time"] = row["cpu_median_ms"] / rows[0]["cpu_median_ms"]
    return rows


NOTES = [
    "ours_speedup = images/s of sam_optax / images/s of the row (medians, round-robin "
    "interleaved in one process); ours_speedup_cpu_time: the same from process CPU time.",
    "PyTorch uses a constant learning rate (ours: cosine schedule); this changes no cost.",
]
NO_GPU_NOTE = (
    "GPU rows (channels_last, AMP bf16, torch.compile) were not measured here (no GPU on this "
    "machine)."
)


def main(argv=None) -> None:
    args = parse_args(argv)

    import numpy as np
    import torch

    from experiments.benchmarks import torch_sam

    loads = {"start": common.load_average()}
    model_kwargs = common.model_kwargs(args.model_kwargs)
    on_gpu = torch.cuda.is_available() and jax.default_backend() == "gpu"
    device = torch.device("cuda" if on_gpu else "cpu")
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    use_compile = on_gpu if args.torch_compile is None else args.torch_compile
    amp_dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
    channels_last = on_gpu

    ours, flax_params = compile_ours(args, model_kwargs)

    # PyTorch, on the same batch.
    images_np, labels_np = common.synthetic_batch(args.batch_size, seed=args.seed)
    images = torch.from_numpy(np.ascontiguousarray(images_np)).to(device)
    labels = torch.from_numpy(labels_np.astype(np.int64)).to(device)
    nets = torch_models(
        model_kwargs,
        device,
        channels_last=channels_last,
        amp_dtype=amp_dtype,
        use_compile=use_compile,
    )
    torch_params = torch_sam.count_parameters(next(iter(nets.values())))
    if torch_params != flax_params:
        raise RuntimeError(f"Parameter counts differ: Flax {flax_params}, PyTorch {torch_params}.")

    benches = [ours.bench()]
    first_step_s = {ours.name: None}
    for name, net in nets.items():
        bench = torch_bench(
            name,
            net,
            args,
            images,
            labels,
            amp_dtype=amp_dtype,
            channels_last=channels_last,
            device=device,
        )
        first_step_s[name] = first_two_steps_s(bench)
        print(f"{name}: first two steps took {first_step_s[name]:.1f} s")
        benches.append(bench)

    samples = timing.interleave_with_args(benches, args)
    rows = result_rows(
        benches,
        samples,
        ours,
        first_step_s,
        args,
        device=device,
        threads=threads,
        params=flax_params,
    )
    loads["end"] = common.load_average()
    common.write_results(
        "vs_torch",
        args,
        title="sam_optax vs PyTorch SAM (two-step optimizer with closure), ResNet-18",
        tables=[("", rows, COLUMNS)],
        loads=loads,
        notes=NOTES if on_gpu else [*NOTES, NO_GPU_NOTE],
        extra={"samples": timing.samples_rows(samples)},
    )


if __name__ == "__main__":
    main()
