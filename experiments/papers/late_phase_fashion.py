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
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import config as config_lib
from experiments import (
    data,
    flags,
    optimizer_registry,
    reporting,
    runtime,
    steps,
    trainer,
)
from experiments.config import TrainConfig
from experiments.flags import option
from experiments.papers import cached_runs, common
from sam_optax import sharpness

NAME = "late_phase_fashion"
SAM = "sam"  # the variant switched on late (Zhou et al. use Foret et al.'s SAM)


# TrainConfig values of every run: no augmentation, a x0.1 step at --lr-drop-epoch, no
# validation split (no early stopping here: the final state is measured), one checkpoint.
RUN_DEFAULTS: dict[str, Any] = dict(
    dataset="fashion_mnist",
    model="resnet8",
    model_kwargs='{"num_filters": 8}',
    train_size=2000,
    validation_size=0,
    epochs=12,
    batch_size=128,
    learning_rate=0.1,
    lr_schedule="multistep",
    weight_decay=5e-4,
    rho=0.05,
    crop_padding=0,
    flip=False,
    eval_every=2,
    keep_checkpoints=1,
    progress=False,
)
# Training flags that the protocol sets itself, per run.
_PROTOCOL_FIELDS = (
    "optimizer",
    "sam_start_epoch",
    "seed",
    "lr_milestones",
    "output_dir",
    "resume",
    "overwrite",
    "stop_after_epoch",
    "checkpoint_every",
)


@dataclasses.dataclass(frozen=True)
class LatePhaseFashionConfig:
    """The protocol: what its runs share (`base`) and its own flags."""

    base: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(**RUN_DEFAULTS), metadata=dict(cli=False)
    )
    sam_epochs: int = option(3, "SAM for the last this many epochs.")
    lr_drop_epoch: int | None = option(None, "x0.1 at this epoch (default: epochs/2).")
    seeds: int = option(3, "Seeds per arm.")
    hessian_size: int = option(256, "Training images of the Hessian.")
    hessian_chunk: int = option(128, "Images per chunk of the Hessian pass.")
    lanczos_iters: int = option(10, "Lanczos steps for the top eigenvalue.")
    output_dir: str = option(
        os.path.join(common.OUTPUT_ROOT, NAME), "Folder of the tables, figures and runs."
    )
    command: str = dataclasses.field(default="", metadata=dict(cli=False))  # reproduces it


def build_parser(*, suppress_defaults: bool = False) -> argparse.ArgumentParser:
    return config_lib.protocol_parser(
        f"experiments.papers.{NAME}",
        __doc__,
        LatePhaseFashionConfig,
        defaults=RUN_DEFAULTS,
        exclude=_PROTOCOL_FIELDS,
        suppress_defaults=suppress_defaults,
    )


def parse_args(argv: Sequence[str] | None = None) -> LatePhaseFashionConfig:
    values = flags.parse_command_line(argv, build_parser)
    own, training = flags.split_fields(values, LatePhaseFashionConfig)
    base = TrainConfig(**training)
    error = build_parser().error
    if not 0 < own["sam_epochs"] < base.epochs:
        error(f"--sam-epochs must lie in (0, --epochs={base.epochs}), got {own['sam_epochs']}")
    if own["lr_drop_epoch"] is None:
        own["lr_drop_epoch"] = base.epochs // 2
    if not 0 < own["lr_drop_epoch"] < base.epochs:
        error(f"--lr-drop-epoch must lie in (0, {base.epochs}), got {own['lr_drop_epoch']}")
    if min(own["seeds"], own["hessian_size"], own["hessian_chunk"], base.eval_every) < 1:
        error("--seeds, --hessian-size, --hessian-chunk and --eval-every must be >= 1")
    command = reporting.command_line(f"experiments.papers.{NAME}", argv)
    return LatePhaseFashionConfig(base=base, command=command, **own)


def arms(args: LatePhaseFashionConfig) -> dict[str, tuple[str, int]]:
    """Arm name -> (optimizer, SAM start epoch)."""
    return {
        "sgd": (optimizer_registry.BASELINE, 0),
        "sam": (SAM, 0),
        "late": (SAM, args.base.epochs - args.sam_epochs),
    }


def arm_label(arm: str, args: LatePhaseFashionConfig) -> str:
    return {
        "sgd": "SGD only",
        "sam": "SAM throughout",
        "late": f"SGD, SAM for the last {args.sam_epochs} epochs",
    }[arm]


def run_config(args: LatePhaseFashionConfig, arm: str, seed: int) -> TrainConfig:
    """The harness configuration of one run (unresolved)."""
    optimizer, start = arms(args)[arm]
    return args.base.replace(
        optimizer=optimizer,
        rho=args.base.rho if optimizer != optimizer_registry.BASELINE else None,
        sam_start_epoch=start,
        lr_milestones=str(args.lr_drop_epoch),
        seed=seed,
        checkpoint_every=args.base.epochs,  # only the final state is measured
        output_dir=os.path.join(args.output_dir, "runs", f"{arm}-s{seed}"),
    )


def run_configs(args: LatePhaseFashionConfig) -> list[TrainConfig]:
    """Every run of the protocol, resolved: arms x seeds."""
    return [
        config_lib.resolve(run_config(args, arm, seed))
        for arm in arms(args)
        for seed in range(args.seeds)
    ]


def make_measure(experiment: trainer.Experiment, dataset: data.Dataset, args):
    """``measure(params, batch_stats, key) -> dict``: training loss and top Hessian eigenvalue
    on the first `hessian_size` training images (the same images for every run)."""
    size = min(args.hessian_size, len(dataset.train_labels))
    examples = (
        jnp.asarray(dataset.train_images[:size]),
        jnp.asarray(dataset.train_labels[:size].astype(np.int32)),
    )
    chunks, rest = sharpness.chunk_dataset(examples, min(args.hessian_chunk, size))
    model, num_classes = experiment.model, dataset.num_classes

    @jax.jit
    def measure(params, batch_stats, key):
        def batch_loss(p, batch):
            images, labels = batch
            x = data.normalize(images, dataset.mean, dataset.std, jnp.float32)
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
    runs = [(arm, seed) for arm in arms(args) for seed in range(args.seeds)]
    for (arm, seed), config in zip(runs, run_configs(args), strict=True):
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
            sam_start_epoch=config.sam_start_epoch if arm != "sgd" else config.epochs,
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
    base = args.base
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
    axes[2].axvline(base.epochs - args.sam_epochs, color="C2", ls=":", lw=1, label="SAM on")
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel("test accuracy (%), mean over seeds")
    axes[2].legend(fontsize=7)
    fig.suptitle(
        f"{base.dataset}: {base.model} {base.model_kwargs}, {base.train_size} training images, "
        f"{base.epochs} epochs, lr {base.learning_rate:g} (x0.1 at {args.lr_drop_epoch}), "
        f"wd {base.weight_decay:g}, rho {base.rho:g}"
    )
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{NAME}.png"), dpi=80)
    plt.close(fig)


def write_report(rows, summary, args, seconds, clock, out) -> None:
    base = args.base
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
        f"Protocol: {base.dataset}, {base.model} {base.model_kwargs}, {base.train_size} "
        f"training images, {base.epochs} epochs of SGD with momentum 0.9 (batch "
        f"{base.batch_size}, lr {base.learning_rate:g}, x0.1 at epoch {args.lr_drop_epoch}, "
        f"weight decay {base.weight_decay:g}, no augmentation), label noise {base.label_noise:g}"
        f"; SAM at rho {base.rho:g}; {args.seeds} seeds. Sharpness: top Hessian eigenvalue of "
        f"the training cross-entropy (BatchNorm in evaluation mode, no weight decay) on "
        f"{args.hessian_size} training images, {args.lanczos_iters} Lanczos steps.",
        "",
        f"{clock.machine_sentence()} Wall time {seconds:.0f} s ({trained} of {len(rows)} runs "
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


def write_outputs(rows, summary, args, out, clock) -> None:
    """The tables, the figure, the report and the JSON record."""
    reporting.write_table(
        [{k: v for k, v in r.items() if k != "curve"} for r in rows],
        os.path.join(out, f"{NAME}_runs.csv"),
    )
    reporting.write_table(summary, os.path.join(out, f"{NAME}_summary.csv"))
    plot(rows, summary, args, out)
    seconds = clock.seconds()
    write_report(rows, summary, args, seconds, clock, out)
    common.write_record(os.path.join(out, f"{NAME}.json"), args, seconds, runs=rows)
    print(reporting.markdown_table(summary))


def main(argv: Sequence[str] | None = None) -> dict:
    return common.run_protocol(parse_args(argv), run_all, summarize, write_outputs)


if __name__ == "__main__":
    runtime.run_command(main)
