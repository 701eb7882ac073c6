r"""SAM late in training on real data (Zhou et al., ICLR 2025): Fashion-MNIST, a small ResNet.

The harness version of :mod:`experiments.papers.late_phase` (which stays the quick MLP one):
every run goes through :func:`experiments.trainer.train_and_evaluate` with a residual network
(``resnet8``: one basic block per stage; 8/16/32 filters by default) on a Fashion-MNIST
training subset. Three arms, several seeds each: SGD throughout, SAM throughout, and SGD with SAM
switched on for the last few epochs (``sam_start_epoch``: rho is 0 before it, and the second
gradient pass is skipped at run time). The learning rate drops x0.1 at mid-training, as in the
MLP version.

At the end of each run, from its final checkpoint: the top Hessian eigenvalue of the training
loss (cross-entropy without weight decay, BatchNorm in evaluation mode) on a fixed subset of the
training set, evaluated in chunks by ``sam_optax.sharpness``, and the test accuracy.

Run: ``python -m experiments.papers.late_phase_fashion`` (files in
runs/papers/late_phase_fashion/; each run under ``runs/<arm>-s<seed>``, skipped when done with
the same config).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import config as config_lib
from experiments import input_pipeline, optimizer_registry, reporting, runtime, steps, trainer
from experiments.config import TrainConfig
from experiments.papers import cached_runs, common
from sam_optax import sharpness

NAME = "late_phase_fashion"
SAM = "sam"  # the variant switched on late (Zhou et al. use Foret et al.'s SAM)


@dataclasses.dataclass(frozen=True)
class LatePhaseFashionConfig:
    """The experiment's settings (its flags, defaults filled in), fixed once parsed."""

    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    model: str = "resnet8"
    model_kwargs: str = '{"num_filters": 8}'
    train_size: int = 2000
    validation_size: int = 0  # no early stopping here: the final state is measured
    epochs: int = 12
    sam_epochs: int = 3
    batch_size: int = 128
    learning_rate: float = 0.1
    lr_drop_epoch: int = 6
    weight_decay: float = 5e-4
    rho: float = 0.05
    label_noise: float = 0.0
    seeds: int = 3
    hessian_size: int = 256
    hessian_chunk: int = 128
    lanczos_iters: int = 10
    eval_every: int = 2
    output_dir: str = os.path.join(common.OUTPUT_ROOT, NAME)
    command: str = ""  # the command line that reproduces the run


def parse_args(argv: Sequence[str] | None = None) -> LatePhaseFashionConfig:
    d = LatePhaseFashionConfig()
    p = argparse.ArgumentParser(
        prog=f"python -m experiments.papers.{NAME}",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", choices=config_lib.DATASETS, default=d.dataset)
    p.add_argument("--data-dir", default=None, help="Folder with the data set's files.")
    p.add_argument("--model", choices=config_lib.MODELS, default=d.model)
    p.add_argument("--model-kwargs", default=d.model_kwargs, help="Model options as JSON.")
    p.add_argument("--train-size", type=int, default=d.train_size, help="Training subset size.")
    p.add_argument("--validation-size", type=int, default=d.validation_size)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument(
        "--sam-epochs", type=int, default=d.sam_epochs, help="SAM for the last this many epochs."
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument(
        "--lr-drop-epoch", type=int, default=None, help="x0.1 at this epoch (default: epochs/2)."
    )
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--rho", type=float, default=d.rho, help="SAM radius once SAM is on.")
    p.add_argument("--label-noise", type=float, default=d.label_noise)
    p.add_argument("--seeds", type=int, default=d.seeds)
    p.add_argument(
        "--hessian-size", type=int, default=d.hessian_size, help="Training images of the Hessian."
    )
    p.add_argument("--hessian-chunk", type=int, default=d.hessian_chunk)
    p.add_argument("--lanczos-iters", type=int, default=d.lanczos_iters)
    p.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help="Test accuracy every N epochs (and at the end): the 10,000 test images cost about "
        "as much as a training epoch.",
    )
    p.add_argument("--output-dir", default=d.output_dir)
    args = p.parse_args(argv)
    if not 0 < args.sam_epochs < args.epochs:
        p.error(f"--sam-epochs must lie in (0, --epochs={args.epochs}), got {args.sam_epochs}")
    lr_drop = args.epochs // 2 if args.lr_drop_epoch is None else args.lr_drop_epoch
    if not 0 < lr_drop < args.epochs:
        p.error(f"--lr-drop-epoch must lie in (0, {args.epochs}), got {lr_drop}")
    if min(args.seeds, args.hessian_size, args.hessian_chunk, args.eval_every) < 1:
        p.error("--seeds, --hessian-size, --hessian-chunk and --eval-every must be >= 1")
    return common.config_from_args(
        LatePhaseFashionConfig,
        args,
        lr_drop_epoch=lr_drop,
        command=reporting.command_line(f"experiments.papers.{NAME}", argv),
    )


def arms(args: LatePhaseFashionConfig) -> dict[str, tuple[str, int]]:
    """Arm name -> (optimizer, SAM start epoch)."""
    return {
        "sgd": (optimizer_registry.BASELINE, 0),
        "sam": (SAM, 0),
        "late": (SAM, args.epochs - args.sam_epochs),
    }


def arm_label(arm: str, args: LatePhaseFashionConfig) -> str:
    return {
        "sgd": "SGD only",
        "sam": "SAM throughout",
        "late": f"SGD, SAM for the last {args.sam_epochs} epochs",
    }[arm]


def run_config(args: LatePhaseFashionConfig, arm: str, seed: int) -> TrainConfig:
    optimizer, start = arms(args)[arm]
    return TrainConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        validation_size=args.validation_size,
        train_size=args.train_size,
        label_noise=args.label_noise,
        model=args.model,
        model_kwargs=args.model_kwargs,
        optimizer=optimizer,
        rho=args.rho if optimizer != optimizer_registry.BASELINE else None,
        sam_start_epoch=start,
        learning_rate=args.learning_rate,
        lr_schedule="multistep",
        lr_milestones=str(args.lr_drop_epoch),
        weight_decay=args.weight_decay,
        epochs=args.epochs,
        batch_size=args.batch_size,
        crop_padding=0,
        flip=False,
        seed=seed,
        eval_every=args.eval_every,
        checkpoint_every=args.epochs,  # only the final state is measured
        keep_checkpoints=1,
        progress=False,
        output_dir=os.path.join(args.output_dir, "runs", f"{arm}-s{seed}"),
    )


def make_measure(experiment: trainer.Experiment, dataset: input_pipeline.Dataset, args):
    """``measure(params, batch_stats, key) -> dict``: training loss and top Hessian eigenvalue
    on the first `hessian_size` training images (the same images for every run)."""
    size = min(args.hessian_size, len(dataset.train_labels))
    data = (
        jnp.asarray(dataset.train_images[:size]),
        jnp.asarray(dataset.train_labels[:size].astype(np.int32)),
    )
    chunks, rest = sharpness.chunk_dataset(data, min(args.hessian_chunk, size))
    model, num_classes = experiment.model, dataset.num_classes

    @jax.jit
    def measure(params, batch_stats, key):
        def batch_loss(p, batch):
            images, labels = batch
            x = input_pipeline.normalize(images, dataset.mean, dataset.std, jnp.float32)
            # Evaluation mode: the loss is a function of the weights alone.
            logits = model.apply({"params": p, "batch_stats": batch_stats}, x, train=False)
            return steps.cross_entropy(logits, labels, num_classes).mean()

        loss_fn = sharpness.dataset_loss_fn(batch_loss, chunks, remainder=rest)
        top = sharpness.top_hessian_eigenvalues(
            loss_fn, params, k=1, key=key, num_iters=args.lanczos_iters
        )[0]
        return dict(train_loss=loss_fn(params), top_eigenvalue=top)

    return measure


def run_all(args: LatePhaseFashionConfig) -> list[dict[str, Any]]:
    rows = []
    dataset, measure = None, None
    for arm in arms(args):
        for seed in range(args.seeds):
            config = config_lib.resolve(run_config(args, arm, seed))
            if dataset is None:
                dataset = trainer.load_dataset(config)  # the same data for every run
            summary, metrics, trained = cached_runs.run_or_load(config, dataset)
            experiment, state = cached_runs.final_state(config, dataset)
            if measure is None:
                measure = make_measure(experiment, dataset, args)
            params = jax.device_get(state.params)
            batch_stats = jax.device_get(state.batch_stats)
            values = measure(params, batch_stats, jax.random.key(seed))
            row = dict(
                arm=arm,
                run=arm_label(arm, args),
                sam_start_epoch=config.sam_start_epoch if arm != "sgd" else args.epochs,
                seed=seed,
                trained=trained,
                test_acc=summary["final_test_accuracy"],
                train_acc=summary["final_train_accuracy"],
                **{k: float(v) for k, v in values.items()},
                wall_time_s=summary["wall_time_s"],
                curve=[m.get("test_accuracy", np.nan) for m in metrics],
            )
            rows.append(row)
            print(
                f"{arm} s{seed}: {'trained' if trained else 'done already'}, test "
                f"{row['test_acc']:.4f}, top eigenvalue {row['top_eigenvalue']:.4g}, "
                f"train loss {row['train_loss']:.4g}",
                flush=True,
            )
    return rows


def summarize(rows, args) -> list[dict]:
    summary = []
    for arm in arms(args):
        runs = [r for r in rows if r["arm"] == arm]
        entry = dict(run=arm_label(arm, args), arm=arm, seeds=len(runs))
        for key in ("test_acc", "top_eigenvalue", "train_loss"):
            entry[f"{key}_mean"], entry[f"{key}_std"] = reporting.mean_std([r[key] for r in runs])
        summary.append(entry)
    return summary


def gap_closed(summary, key: str) -> float:
    """(SGD only - late) / (SGD only - SAM throughout) of the seeds' means of `key`.

    A ratio of means, not a mean of per-seed ratios: a seed whose SGD and SAM runs happen to end
    close together would otherwise dominate the mean.
    """
    mean = {s["arm"]: s[f"{key}_mean"] for s in summary}
    gap = mean["sgd"] - mean["sam"]
    return (mean["sgd"] - mean["late"]) / gap if gap else float("nan")


def verdict(rows, summary, args) -> list[str]:
    """What the numbers say about the claim (late SAM reaches SAM's sharpness and accuracy)."""
    by = {s["arm"]: s for s in summary}
    sgd, sam, late = by["sgd"], by["sam"], by["late"]
    sharp = gap_closed(summary, "top_eigenvalue")
    acc = gap_closed(summary, "test_acc")
    lines = [
        f"- Top Hessian eigenvalue: SGD only {sgd['top_eigenvalue_mean']:.3g} ± "
        f"{sgd['top_eigenvalue_std']:.2g}, SAM throughout {sam['top_eigenvalue_mean']:.3g} ± "
        f"{sam['top_eigenvalue_std']:.2g}, SAM for the last {args.sam_epochs} epochs "
        f"{late['top_eigenvalue_mean']:.3g} ± {late['top_eigenvalue_std']:.2g} "
        f"({100 * sharp:.0f} % of the gap between the SGD and SAM means closed).",
        f"- Test accuracy: SGD only {100 * sgd['test_acc_mean']:.2f} ± "
        f"{100 * sgd['test_acc_std']:.2f} %, SAM throughout {100 * sam['test_acc_mean']:.2f} ± "
        f"{100 * sam['test_acc_std']:.2f} %, late SAM {100 * late['test_acc_mean']:.2f} ± "
        f"{100 * late['test_acc_std']:.2f} %.",
    ]
    sam_flatter = sam["top_eigenvalue_mean"] + sam["top_eigenvalue_std"] < (
        sgd["top_eigenvalue_mean"] - sgd["top_eigenvalue_std"]
    )
    if not sam_flatter:
        lines.append(
            "- Not testable at this scale: SAM throughout does not end clearly flatter than SGD "
            "(the eigenvalues' error bars overlap), so there is no gap for late SAM to close."
        )
    elif sharp >= 0.8:
        accuracy = " and test accuracy."
        if acc < 0.8:
            accuracy = f" (test accuracy: {100 * acc:.0f} % of the gap)."
        lines.append(
            f"- The claim holds here for sharpness: {args.sam_epochs} late epochs of SAM reach "
            "most of SAM-throughout's flatness" + accuracy
        )
    elif sharp > 0:
        lines.append(
            f"- Partly: late SAM moves the sharpness {100 * sharp:.0f} % of the way toward "
            "SAM-throughout's, not all of it."
        )
    else:
        lines.append("- Not reproduced here: late SAM does not move the sharpness toward SAM's.")
    return lines


def plot(rows, summary, args, out) -> None:
    plt = reporting.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = list(arms(args))
    colors = {"sgd": common.BASELINE_COLOR, "sam": optimizer_registry.get(SAM).color, "late": "C2"}
    x = np.arange(len(names))
    for ax, key, label, scale in (
        (axes[0], "test_acc", "final test accuracy (%)", 100.0),
        (axes[1], "top_eigenvalue", "top Hessian eigenvalue (training loss)", 1.0),
    ):
        means = [scale * s[f"{key}_mean"] for s in summary]
        stds = [scale * s[f"{key}_std"] for s in summary]
        ax.bar(x, means, yerr=stds, capsize=3, color=[colors[n] for n in names], alpha=0.8)
        for i, name in enumerate(names):
            values = [scale * r[key] for r in rows if r["arm"] == name]
            ax.plot(np.full(len(values), i), values, "k.", ms=4)
        ax.set_xticks(x, [arm_label(n, args) for n in names], rotation=15, ha="right", fontsize=8)
        ax.set_ylabel(label)
    lows = [100 * r["test_acc"] for r in rows]
    axes[0].set_ylim(min(lows) - 2, max(lows) + 1)
    axes[0].set_title(f"mean ± std over {args.seeds} seeds (dots: each seed)")
    axes[1].set_title(f"sharpness on {args.hessian_size} training images")
    for name in names:
        curves = np.array([r["curve"] for r in rows if r["arm"] == name], dtype=np.float64)
        epochs = np.arange(1, curves.shape[1] + 1)
        evaluated = np.all(np.isfinite(curves), axis=0)  # epochs without evaluation are NaN
        axes[2].plot(
            epochs[evaluated],
            100 * curves.mean(0)[evaluated],
            ".-",
            color=colors[name],
            label=arm_label(name, args),
        )
    axes[2].axvline(args.lr_drop_epoch, color="gray", ls=":", lw=1, label="lr x0.1")
    axes[2].axvline(args.epochs - args.sam_epochs, color="C2", ls=":", lw=1, label="SAM on")
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel("test accuracy (%), mean over seeds")
    axes[2].legend(fontsize=7)
    fig.suptitle(
        f"{args.dataset}: {args.model} {args.model_kwargs}, {args.train_size} training images, "
        f"{args.epochs} epochs, lr {args.learning_rate:g} (x0.1 at {args.lr_drop_epoch}), "
        f"wd {args.weight_decay:g}, rho {args.rho:g}"
    )
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{NAME}.png"), dpi=80)
    plt.close(fig)


def write_report(rows, summary, args, seconds, loads, out) -> None:
    table = [
        dict(
            run=s["run"],
            test_acc=f"{100 * s['test_acc_mean']:.2f} ± {100 * s['test_acc_std']:.2f}",
            top_eigenvalue=f"{s['top_eigenvalue_mean']:.3g} ± {s['top_eigenvalue_std']:.2g}",
            train_loss=f"{s['train_loss_mean']:.3g}",
        )
        for s in summary
    ]
    trained = sum(r["trained"] for r in rows)
    lines = [
        "# SAM late in training (Zhou et al., ICLR 2025) on Fashion-MNIST",
        "",
        f"Command: `{args.command}`",
        "",
        f"Protocol: {args.dataset}, {args.model} {args.model_kwargs}, {args.train_size} "
        f"training images, {args.epochs} epochs of SGD with momentum 0.9 (batch "
        f"{args.batch_size}, lr {args.learning_rate:g}, x0.1 at epoch {args.lr_drop_epoch}, "
        f"weight decay {args.weight_decay:g}, no augmentation), label noise {args.label_noise:g}"
        f"; SAM at rho {args.rho:g}; {args.seeds} seeds. Sharpness: top Hessian eigenvalue of "
        f"the training cross-entropy (BatchNorm in evaluation mode, no weight decay) on "
        f"{args.hessian_size} training images, {args.lanczos_iters} Lanczos steps.",
        "",
        f"Machine: {runtime.machine_line()}; load average (1/5/15 min) {loads[0]} at the start, "
        f"{loads[1]} at the end. Wall time {seconds:.0f} s ({trained} of {len(rows)} runs "
        "trained now).",
        "",
        reporting.markdown_table(table, fmt=str),
        "",
        "Test accuracy (%) at the final epoch, mean ± std over seeds.",
        "",
        "## Findings",
        "",
        *verdict(rows, summary, args),
        "",
        f"![late phase]({NAME}.png)",
        "",
    ]
    reporting.write_text(os.path.join(out, f"{NAME}.md"), "\n".join(lines))


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    load_start = runtime.load_average()
    out = common.make_output_dir(args.output_dir)
    rows = run_all(args)
    summary = summarize(rows, args)
    reporting.write_table(
        [{k: v for k, v in r.items() if k != "curve"} for r in rows],
        os.path.join(out, f"{NAME}_runs.csv"),
    )
    reporting.write_table(summary, os.path.join(out, f"{NAME}_summary.csv"))
    plot(rows, summary, args, out)
    seconds = time.perf_counter() - start
    write_report(rows, summary, args, seconds, (load_start, runtime.load_average()), out)
    reporting.write_json(
        os.path.join(out, f"{NAME}.json"),
        dict(args=json.loads(json.dumps(dataclasses.asdict(args))), seconds=seconds, runs=rows),
    )
    print(reporting.markdown_table(summary))
    print(f"wrote {out} in {seconds:.1f} s")
    return dict(rows=rows, summary=summary, seconds=seconds)


if __name__ == "__main__":
    runtime.run_command(main)
