"""GPU throughput of the real training step: images/s, model-FLOPs utilization, compile time, and
whole-epoch wall time through the real training loop (``trainer.train_and_evaluate``).

    python -m experiments.benchmarks.gpu_throughput                 # on a GPU (bf16)
    python -m experiments.benchmarks.gpu_throughput --peak-tflops 989 --batch-sizes 128,512
    python -m experiments.benchmarks.gpu_throughput --quick         # CPU smoke run, seconds

For ResNet-18 and WRN-28-10 with sgd, sam and stable_sam at batch 128 and 512 in bfloat16: the
jitted data-parallel step of ``trainer.create_experiment`` (the uint8 data set on the device, the
batch gathered and augmented there: the host sends nothing per step), timed round-robin per model.
MFU is
model FLOPs per second over ``--peak-tflops`` (default 989, H100 SXM dense bf16), with the model
FLOPs counted two ways: the published forward FLOPs per image (ResNet-18 1.11 G, WRN-28-10 10.5 G)
x 3 for a training pass x the passes (1 for sgd, 2 for SAM), and XLA's cost analysis of the
compiled step. The epoch rows run ``trainer.train_and_evaluate`` for one epoch of synthetic
CIFAR-shaped uint8 data (progress bar off), whose images/s next to the step's shows whether input
or the Python loop is a bottleneck (a ratio near 1 says no).
"""

from __future__ import annotations

import argparse
import tempfile

import jax

from experiments import runtime, trainer
from experiments.benchmarks import common, timing

PASSES = {"sgd": 1, "sam": 2, "stable_sam": 2}


def _config(model_name: str, optimizer: str, batch: int, args, **fields):
    """The benchmark's TrainConfig of one model, optimizer and batch size."""
    return common.benchmark_config(
        model_name,
        optimizer,
        batch_size=batch,
        dtype=args.dtype,
        model_kwargs=args.model_kwargs_dict,
        num_devices=args.num_devices,
        **fields,
    )


def run_model(model_name: str, args, dataset, log=print) -> list[dict]:
    steps: dict[tuple[str, int], common.TrainerStep] = {}
    for batch in args.batch_sizes:
        for optimizer in args.optimizers:
            config = _config(model_name, optimizer, batch, args)
            name = f"{optimizer} b{batch}"
            steps[(optimizer, batch)] = common.TrainerStep(
                name, trainer.create_experiment(config, dataset)
            )
            log(f"{model_name} {name}: compiled in {steps[(optimizer, batch)].compile_s:.1f} s")
    samples = timing.interleave_with_args([s.bench() for s in steps.values()], args, log=log)
    peak = args.peak_tflops * 1e12
    published = common.PUBLISHED_FWD_GFLOPS.get(model_name)
    if args.model_kwargs_dict:
        published = None  # a modified architecture: the published count does not apply
    rows = []
    for (optimizer, batch), step in steps.items():
        stats = timing.summarize(samples[step.name])
        seconds = stats["median_ms"] / 1e3
        xla_gflops = timing.cost(step.executable)["xla_gflops"]
        model_gflops = (
            published * 3 * PASSES.get(optimizer, 2) * batch if published is not None else None
        )
        rows.append(
            {
                "model": model_name,
                "optimizer": optimizer,
                "batch": batch,
                "dtype": args.dtype,
                "devices": step.experiment.mesh.devices.size,
                **stats,
                "images_per_s": batch / seconds,
                "compile_s": step.compile_s,
                "model_gflops_per_step": model_gflops,
                "mfu_published": model_gflops * 1e9 / seconds / peak if model_gflops else None,
                "xla_gflops_per_step": xla_gflops,
                "mfu_xla": xla_gflops * 1e9 / seconds / peak,
            }
        )
    return rows


def run_epoch(model_name: str, optimizer: str, batch: int, args, dataset) -> dict:
    """One epoch of the real loop (``trainer.train_and_evaluate``); its summary's timings."""
    with tempfile.TemporaryDirectory() as output_dir:
        config = _config(
            model_name,
            optimizer,
            batch,
            args,
            epochs=1,
            output_dir=output_dir,
            overwrite=True,
        )
        summary = trainer.train_and_evaluate(config, dataset=dataset)
    return {
        "model": model_name,
        "optimizer": optimizer,
        "batch": batch,
        "dtype": args.dtype,
        "train_images": len(dataset.train_labels),
        "epoch_s": summary["train_time_s"],
        "epoch_images_per_s": summary["images_per_s"],
        "compile_s": summary["compile_time_s"],
        "wall_s_incl_setup_eval_checkpoint": summary["wall_time_s"],
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_model_arguments(
        parser, models="resnet18,wrn28_10", batch_size=None, dtype="bfloat16"
    )
    parser.add_argument("--optimizers", default="sgd,sam,stable_sam")
    parser.add_argument("--batch-sizes", default="128,512")
    parser.add_argument("--num-devices", type=int, default=1, help="0: all devices.")
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="Dense peak (H100 SXM bf16: 989)."
    )
    parser.add_argument(
        "--train-images", type=int, default=50_000, help="Synthetic training set size."
    )
    parser.add_argument(
        "--epoch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Also time one whole epoch through trainer.train_and_evaluate per model and "
        "optimizer, at the largest batch size.",
    )
    parser.add_argument(
        "--allow-cpu", action="store_true", help="Run the full sizes even without a GPU."
    )
    common.add_common_arguments(parser, rounds=30, warmup=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.model_kwargs = "small_cnn", common.QUICK_SMALL_CNN
        args.batch_sizes, args.train_images = "8,16", 64
        args.rounds, args.warmup, args.dtype = 3, 1, "float32"
    return args


def epoch_rows_of(model_name: str, step_rows: list[dict], args, dataset) -> list[dict]:
    """One whole epoch per optimizer at the largest batch size, next to its step rate."""
    batch = max(args.batch_sizes)
    rows = []
    for optimizer in args.optimizers:
        row = run_epoch(model_name, optimizer, batch, args, dataset)
        step_row = next(
            r
            for r in step_rows
            if (r["model"], r["optimizer"], r["batch"]) == (model_name, optimizer, batch)
        )
        row["step_images_per_s"] = step_row["images_per_s"]
        row["epoch / step images_per_s"] = row["epoch_images_per_s"] / step_row["images_per_s"]
        rows.append(row)
    return rows


def notes(args) -> list[str]:
    return [
        f"Peak for MFU: {args.peak_tflops:g} TFLOP/s. mfu_published uses the published forward "
        "FLOPs per 32x32 image x 3 (training) x passes (sgd 1, SAM 2); mfu_xla uses the compiled "
        "step's cost_analysis() FLOPs.",
        "Step rows: the jitted data-parallel step with the on-device input pipeline (gather + "
        "augment from the uint8 set on the device), medians of round-robin interleaved steps.",
        "Epoch rows: trainer.train_and_evaluate for 1 epoch (compile excluded, evaluation and "
        "checkpoint after the timed epoch); 'epoch / step images_per_s' near 1 means the loop "
        "and input add nothing.",
    ]


def main(argv=None) -> None:
    args = parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    if not (on_gpu or args.quick or args.allow_cpu):
        runtime.fail(
            "gpu_throughput measures a GPU and JAX sees none. Run it with --quick for a smoke "
            "run on the CPU, or --allow-cpu to time the full sizes anyway.",
            runtime.ExitStatus.BAD_INPUT,
        )
    args.batch_sizes = common.positive_ints(args.batch_sizes, "--batch-sizes")
    args.optimizers = args.optimizers.split(",")
    args.model_kwargs_dict = common.model_kwargs(args.model_kwargs)

    loads = {"start": common.load_average()}
    dataset = common.synthetic_dataset(
        args.train_images, num_test=max(args.batch_sizes), seed=args.seed
    )
    step_rows, epoch_rows = [], []
    for model_name in args.models.split(","):
        step_rows += run_model(model_name, args, dataset)
        loads[f"after {model_name} steps"] = common.load_average()
        if args.epoch:
            epoch_rows += epoch_rows_of(model_name, step_rows, args, dataset)
            loads[f"after {model_name} epochs"] = common.load_average()

    tables = [("Steps", step_rows, list(step_rows[0]))]
    if epoch_rows:
        tables.append(
            ("Whole epoch through trainer.train_and_evaluate", epoch_rows, list(epoch_rows[0]))
        )
    loads["end"] = common.load_average()
    common.write_results(
        "gpu_throughput",
        args,
        title="Training throughput, MFU, compile time and whole-epoch time",
        tables=tables,
        loads=loads,
        notes=notes(args),
        cpu_note="No GPU on this machine: these rows are a CPU smoke run at a tiny size, not GPU "
        "measurements.",
    )


if __name__ == "__main__":
    main()
