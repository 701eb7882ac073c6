r"""SAM variants under label noise: the StableSAM paper's table at CPU scale, in one command.

Every optimizer of the variant registry (the SGD baseline first) trained through the harness
(:func:`experiments.trainer.train_and_evaluate`) on clean labels and with a fraction of the
training labels replaced by wrong ones (symmetric noise: a uniformly drawn other class; the
validation and test labels stay clean), several seeds each. SAM's largest published gains are
under label noise (Foret et al., ICLR 2021, Section 3.3; Baek et al., ICLR 2024): SGD first fits
the clean labels, then memorizes the noisy ones and its test accuracy falls after an early peak.

The table gives test accuracy (mean +- std over seeds) at the final epoch *and* at the epoch of
the best validation accuracy (early stopping on the clean validation split), in the format of
the StableSAM paper (Tan et al., JMLR 2025), with each variant's difference to SGD.

Default scale (``--preset fashion-cpu``, the defaults): Fashion-MNIST, a 784-512-512-10 MLP on a
5,000-image training subset for 25 cosine epochs (batch 128, lr 0.1, weight decay 5e-4, no
augmentation), clean and 40 % symmetric noise, 3 seeds. At that scale SGD memorizes the noise
(one seed: training accuracy 85 % on the noisy labels, where fitting only the clean ones gives
60 %; test accuracy from 77.7 % at epoch 6 down to 69.9 %), so there is an effect to see;
XLA:CPU convolutions would make a CNN too slow for the budget of 66 runs (11 optimizers).

Run: ``python -m experiments.papers.label_noise`` (files in runs/papers/label_noise/). Each run
lives in ``<output-dir>/runs/<noise>/<optimizer>-s<seed>`` and is skipped when its summary and
identical config are there, so an interrupted command picks up where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from experiments import config as config_lib
from experiments import flags, optimizer_registry, reporting, runtime, trainer
from experiments.config import TrainConfig
from experiments.flags import option
from experiments.papers import cached_runs, common

NAME = "label_noise"

# Named protocols: TrainConfig values of every run. "fashion-cpu" is the CPU-scale table (the
# default).
PRESETS: dict[str, dict[str, Any]] = {
    "fashion-cpu": dict(
        dataset="fashion_mnist",
        model="mlp",
        model_kwargs='{"hidden": [512, 512]}',
        train_size=5000,
        validation_size=5000,
        epochs=25,
        batch_size=128,
        learning_rate=0.1,
        weight_decay=5e-4,
        flip=False,
    ),
}
# The second regime: the full training set (55,000 images after the 5,000 held out), the same
# MLP, 5 epochs (2,145 steps, 2.2x the first regime's; 11x its images).
PRESETS["fashion-full"] = dict(PRESETS["fashion-cpu"], train_size=0, epochs=5)
DEFAULT_PRESET = "fashion-cpu"
# Every preset's runs: no augmentation, no progress bar, one checkpoint (at the end: saving every
# epoch would cost more than training an MLP).
RUN_DEFAULTS: dict[str, Any] = dict(crop_padding=0, progress=False, keep_checkpoints=1)
# Training flags that the protocol sets itself, per run.
PROTOCOL_FIELDS = (
    "optimizer",
    "rho",
    "seed",
    "label_noise",
    "output_dir",
    "resume",
    "overwrite",
    "stop_after_epoch",
    "checkpoint_every",
)
# SGD, the StableSAM protocol's variants, and the other variants in their plain form (their
# StableSAM forms, e.g. stable_gsam, are one --optimizers away): 11 optimizers, 66 runs by default.
DEFAULT_OPTIMIZERS: tuple[str, ...] = (
    optimizer_registry.BASELINE,
    *optimizer_registry.protocol_names(),
    *(
        n
        for n in optimizer_registry.names()
        if not optimizer_registry.get(n).in_protocol
        and not optimizer_registry.get(n).cheaper
        and not n.startswith("stable_")
    ),
)


def base_config(preset: str = DEFAULT_PRESET) -> TrainConfig:
    """The configuration every run of `preset` shares (before the protocol's own settings)."""
    return TrainConfig(**RUN_DEFAULTS, **PRESETS[preset])


def _rho_item(item: str) -> tuple[str, float]:
    """``VARIANT=VALUE`` of ``--rho``."""
    name, sep, value = item.partition("=")
    name = optimizer_registry.canonical_name(name)
    if not sep or name not in optimizer_registry.names():
        raise argparse.ArgumentTypeError(
            f"takes VARIANT=VALUE with a variant of {optimizer_registry.names()}, got {item!r}"
        )
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{item!r}: {value!r} is not a number") from None


@dataclasses.dataclass(frozen=True)
class LabelNoiseConfig:
    """The protocol: what its runs share (`base`) and its own flags."""

    base: TrainConfig = dataclasses.field(default_factory=base_config, metadata=dict(cli=False))
    noise_rates: Sequence[float] = option(
        (0.0, 0.4), "Label-noise fractions.", nargs="+", parse=float
    )
    optimizers: Sequence[str] = option(
        (),
        f"Optimizers to compare (default: {' '.join(DEFAULT_OPTIMIZERS)}).",
        nargs="+",
        parse=optimizer_registry.canonical_name,
        choices=config_lib.OPTIMIZERS,
    )
    seeds: int = option(3, "Seeds per optimizer and noise.")
    rho: Mapping[str, float] = option(
        {},
        "rho per variant, e.g. sam=0.1 asam=1.0 (default: each variant's registry default).",
        nargs="+",
        parse=_rho_item,
        metavar="VARIANT=VALUE",
    )
    output_dir: str = option(
        os.path.join(common.OUTPUT_ROOT, NAME), "Folder of the tables, figures and runs."
    )
    command: str = dataclasses.field(default="", metadata=dict(cli=False))  # reproduces it


def protocol_parser(
    module: str,
    doc: str,
    protocol: type,
    *,
    exclude: Sequence[str] = PROTOCOL_FIELDS,
    suppress_defaults: bool = False,
) -> argparse.ArgumentParser:
    """The command line of a protocol on this module's presets of runs: the training flags (less
    those in `exclude`) and the `protocol` dataclass's own."""
    return config_lib.protocol_parser(
        module,
        doc,
        protocol,
        exclude=exclude,
        defaults={**RUN_DEFAULTS, **PRESETS[DEFAULT_PRESET]},
        protocol_presets=tuple(PRESETS),
        default_preset=DEFAULT_PRESET,
        aliases={"label_noise_mode": ("--noise-mode",)},
        suppress_defaults=suppress_defaults,
    )


def build_parser(*, suppress_defaults: bool = False) -> argparse.ArgumentParser:
    return protocol_parser(
        f"experiments.papers.{NAME}", __doc__, LabelNoiseConfig, suppress_defaults=suppress_defaults
    )


def check_noise_rates(rates: Sequence[float], seeds: int, parser_fn) -> tuple[float, ...]:
    """The distinct noise rates, after checking them and the seed count (exit 2 otherwise)."""
    noise_rates = tuple(dict.fromkeys(float(r) for r in rates))
    if any(not 0 <= r < 1 for r in noise_rates):
        parser_fn().error(f"--noise-rates must lie in [0, 1), got {noise_rates}")
    if seeds < 1:
        parser_fn().error("--seeds must be >= 1")
    return noise_rates


def parse_args(argv: Sequence[str] | None = None) -> LabelNoiseConfig:
    values = flags.parse_command_line(argv, build_parser, PRESETS.__getitem__)
    own, training = flags.split_fields(values, LabelNoiseConfig)
    noise_rates = check_noise_rates(own["noise_rates"], own["seeds"], build_parser)
    # SGD first: every difference is taken to it.
    optimizers = (
        optimizer_registry.BASELINE,
        *(o for o in own["optimizers"] or DEFAULT_OPTIMIZERS if o != optimizer_registry.BASELINE),
    )
    return LabelNoiseConfig(
        base=TrainConfig(**training),
        noise_rates=noise_rates,
        optimizers=tuple(dict.fromkeys(optimizers)),
        seeds=own["seeds"],
        rho=dict(own["rho"]),
        output_dir=own["output_dir"],
        command=reporting.command_line(f"experiments.papers.{NAME}", argv),
    )


# --------------------------------------------------------------------------------------------
# The runs.
# --------------------------------------------------------------------------------------------


def noise_tag(rate: float, mode: str = "symmetric") -> str:
    """The folder of a noise setting: ``clean``, ``symmetric40``..."""
    return "clean" if rate == 0 else f"{mode}{100 * rate:g}"


def noise_label(rate: float, mode: str = "symmetric") -> str:
    return "clean" if rate == 0 else f"{100 * rate:g} % {mode} noise"


def run_config(args: LabelNoiseConfig, optimizer: str, rate: float, seed: int) -> TrainConfig:
    """The harness configuration of one run (unresolved)."""
    rho = args.rho.get(optimizer) if optimizer != optimizer_registry.BASELINE else None
    noise = noise_tag(rate, args.base.label_noise_mode)
    return args.base.replace(
        label_noise=rate,
        optimizer=optimizer,
        rho=rho,
        seed=seed,
        checkpoint_every=args.base.epochs,  # one checkpoint, at the end
        output_dir=os.path.join(args.output_dir, "runs", noise, f"{optimizer}-s{seed}"),
    )


def run_configs(args: LabelNoiseConfig) -> list[TrainConfig]:
    """Every run of the protocol, resolved: noise rates x optimizers x seeds."""
    return [
        config_lib.resolve(run_config(args, optimizer, rate, seed))
        for rate in args.noise_rates
        for optimizer in args.optimizers
        for seed in range(args.seeds)
    ]


def run_all(args: LabelNoiseConfig) -> list[dict[str, Any]]:
    """Every (noise rate, optimizer, seed) run, trained or read back; one row per run."""
    results = []
    dataset, noise = None, None  # loaded once per noise setting, and only if a run trains
    for config in run_configs(args):
        if config.label_noise != noise:
            dataset, noise = None, config.label_noise
        if dataset is None and not cached_runs.is_done(config):
            dataset = trainer.load_dataset(config)
        summary, rows, trained = cached_runs.run_or_load(config, dataset)
        print(
            f"{noise_tag(noise, config.label_noise_mode)} {config.optimizer} s{config.seed}: "
            f"{'trained' if trained else 'done already'}, test "
            f"{summary['final_test_accuracy']:.4f} final, "
            f"{summary['test_accuracy_at_best_val']:.4f} at best val "
            f"(epoch {summary['best_val_epoch']}), {summary['wall_time_s']:.0f} s",
            flush=True,
        )
        results.append(
            dict(
                noise_rate=noise,
                optimizer=config.optimizer,
                seed=config.seed,
                rho=summary["rho"],
                trained=trained,
                summary=summary,
                curve=[r.get("test_accuracy", np.nan) for r in rows],
                train_curve=[r["train_accuracy"] for r in rows],
            )
        )
    return results


# --------------------------------------------------------------------------------------------
# The table.
# --------------------------------------------------------------------------------------------

METRICS = {"final": "final_test_accuracy", "best_val": "test_accuracy_at_best_val"}


def significant(diff: float, std_a: float, std_b: float) -> bool:
    """The rule of the table: a difference counts when it exceeds the sum of the two seeds'
    standard deviations (the error bars do not overlap)."""
    return bool(abs(diff) > std_a + std_b)


def metric_stats(summaries: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Each metric's mean and std over the seeds' summaries (``<key>_mean``, ``<key>_std``)."""
    stats = {}
    for key, field in METRICS.items():
        stats[f"{key}_mean"], stats[f"{key}_std"] = reporting.mean_std(
            [s[field] for s in summaries]
        )
    return stats


def compare_to_baseline(entry: dict[str, Any], base: Mapping[str, Any], is_baseline: bool) -> None:
    """Adds to `entry` each metric's difference to the baseline's mean (``<key>_diff_to_sgd``)
    and whether it exceeds the spread of the two (``<key>_beyond_spread``)."""
    for key in METRICS:
        diff = entry[f"{key}_mean"] - base[f"{key}_mean"]
        entry[f"{key}_diff_to_sgd"] = diff
        entry[f"{key}_beyond_spread"] = not is_baseline and significant(
            diff, entry[f"{key}_std"], base[f"{key}_std"]
        )


def summarize(results: Sequence[Mapping[str, Any]], args: LabelNoiseConfig) -> list[dict]:
    """One row per (optimizer, noise rate): means, stds and the differences to SGD."""
    table = []
    for rate in args.noise_rates:
        stats = {}
        for optimizer in args.optimizers:
            runs = [r for r in results if r["noise_rate"] == rate and r["optimizer"] == optimizer]
            entry = dict(
                optimizer=optimizer,
                label=common.label(optimizer),
                noise_rate=rate,
                rho=runs[0]["rho"],
                seeds=len(runs),
                **metric_stats([r["summary"] for r in runs]),
            )
            entry["best_val_epoch_mean"] = float(
                np.mean([r["summary"]["best_val_epoch"] for r in runs])
            )
            entry["final_train_accuracy_mean"] = float(
                np.mean([r["summary"]["final_train_accuracy"] for r in runs])
            )
            stats[optimizer] = entry
        base = stats[optimizer_registry.BASELINE]
        for optimizer, entry in stats.items():
            compare_to_baseline(entry, base, optimizer == optimizer_registry.BASELINE)
            table.append(entry)
    return table


def _cell(entry: Mapping[str, Any], key: str) -> str:
    text = f"{100 * entry[f'{key}_mean']:.2f} ± {100 * entry[f'{key}_std']:.2f}"
    if entry["optimizer"] == optimizer_registry.BASELINE:
        return text
    mark = " *" if entry[f"{key}_beyond_spread"] else ""
    return f"{text} ({100 * entry[f'{key}_diff_to_sgd']:+.2f}{mark})"


def markdown_tables(table: Sequence[Mapping[str, Any]], args: LabelNoiseConfig) -> str:
    """The paper's layout: optimizers as rows, noise settings as columns, final and best-val."""
    columns = ["optimizer", "rho"]
    mode = args.base.label_noise_mode
    noise_columns = {rate: noise_label(rate, mode) for rate in args.noise_rates}
    rows = []
    for optimizer in args.optimizers:
        entries = {e["noise_rate"]: e for e in table if e["optimizer"] == optimizer}
        first = next(iter(entries.values()))
        row = {"optimizer": first["label"], "rho": f"{first['rho']:g}"}
        for key, title in (("final", "final epoch"), ("best_val", "best val epoch")):
            for rate, name in noise_columns.items():
                row[f"{name}, {title}"] = _cell(entries[rate], key)
        rows.append(row)
    columns += [c for c in rows[0] if c not in columns]
    return reporting.markdown_table(rows, columns, fmt=str)


def write_table(table: Sequence[Mapping[str, Any]], args: LabelNoiseConfig, out: str) -> str:
    reporting.write_csv(os.path.join(out, "table.csv"), table)
    text = markdown_tables(table, args)
    legend = (
        "Test accuracy (%), mean ± std over "
        f"{args.seeds} seeds, at the final epoch and at the epoch of the best validation "
        "accuracy; in brackets the difference to SGD, marked * where it exceeds the sum of the "
        "two standard deviations."
    )
    reporting.write_text(os.path.join(out, "table.md"), f"{text}\n\n{legend}\n")
    return f"{text}\n\n{legend}"


# --------------------------------------------------------------------------------------------
# Figures.
# --------------------------------------------------------------------------------------------


def _color(optimizer: str) -> str:
    return common.color(optimizer)


def plot_accuracy(table: Sequence[Mapping[str, Any]], args: LabelNoiseConfig, out: str) -> None:
    """Bars per optimizer (clean and noisy side by side), error bars = std over seeds."""
    plt = reporting.pyplot()
    # One row per panel: the registry's 15 optimizers need the width.
    fig, axes = plt.subplots(
        2, 1, figsize=(max(8.0, 0.8 * len(args.optimizers)), 9), sharex=True, sharey=True
    )
    num = len(args.noise_rates)
    width = 0.8 / num
    x = np.arange(len(args.optimizers))
    for ax, (key, title) in zip(
        axes, (("final", "final epoch"), ("best_val", "best validation epoch")), strict=True
    ):
        for i, rate in enumerate(args.noise_rates):
            entries = {e["optimizer"]: e for e in table if e["noise_rate"] == rate}
            means = [100 * entries[o][f"{key}_mean"] for o in args.optimizers]
            stds = [100 * entries[o][f"{key}_std"] for o in args.optimizers]
            ax.bar(
                x + (i - (num - 1) / 2) * width,
                means,
                width,
                yerr=stds,
                capsize=2,
                color=[_color(o) for o in args.optimizers],
                alpha=1.0 if num == 1 else 1.0 - 0.6 * i / (num - 1),
                hatch=None if i == 0 else "//",
                edgecolor="k",
                linewidth=0.5,
                label=noise_label(rate, args.base.label_noise_mode),
            )
        ax.set_title(f"test accuracy at the {title}")
        ax.grid(axis="y", alpha=0.3)
    # One y range for both panels (they share it), from every bar and error bar, with headroom
    # above the bars for the legend.
    ends = [
        100 * (e[f"{key}_mean"] + sign * e[f"{key}_std"])
        for e in table
        for key in ("final", "best_val")
        for sign in (-1, 1)
    ]
    low, high = max(0.0, min(ends) - 3), max(ends)
    axes[0].set_ylim(low, high + 0.2 * (high - low))
    axes[1].set_xticks(x, [common.label(o) for o in args.optimizers], rotation=35, ha="right")
    for ax in axes:
        ax.set_ylabel(f"test accuracy (%), mean ± std over {args.seeds} seeds", fontsize=8)
    axes[0].legend(fontsize=8, loc="upper left", ncol=num)
    fig.suptitle(protocol_title(args.base), fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy.png"), dpi=80)
    plt.close(fig)


def plot_curves(results: Sequence[Mapping[str, Any]], args: LabelNoiseConfig, out: str) -> None:
    """Per-epoch test accuracy (mean over seeds, band: std), one panel per noise rate."""
    plt = reporting.pyplot()
    num = len(args.noise_rates)
    fig, axes = plt.subplots(1, num, figsize=(max(9.0, 6.5 * num), 4.5), squeeze=False)
    for ax, rate in zip(axes[0], args.noise_rates, strict=True):
        for optimizer in args.optimizers:
            curves = np.array(
                [
                    r["curve"]
                    for r in results
                    if r["noise_rate"] == rate and r["optimizer"] == optimizer
                ],
                dtype=np.float64,
            )
            mean, std = 100 * curves.mean(0), 100 * curves.std(0)
            epochs = np.arange(1, curves.shape[1] + 1)
            style = "-" if optimizer == optimizer_registry.BASELINE else "--"
            ax.plot(
                epochs, mean, style, color=_color(optimizer), label=common.label(optimizer), lw=1.2
            )
            ax.fill_between(epochs, mean - std, mean + std, color=_color(optimizer), alpha=0.1)
        ax.set_title(noise_label(rate, args.base.label_noise_mode))
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"test accuracy (%), mean over {args.seeds} seeds")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(protocol_title(args.base), fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=80)
    plt.close(fig)


def protocol_title(base: TrainConfig) -> str:
    """The protocol in one line, for figures and reports."""
    return (
        f"{base.dataset}, {base.model} {base.model_kwargs}, {base.train_size or 'all'} training "
        f"images, {base.epochs} epochs, batch {base.batch_size}, lr {base.learning_rate:g} "
        f"({base.lr_schedule}), wd {base.weight_decay:g}"
    )


# --------------------------------------------------------------------------------------------
# The report.
# --------------------------------------------------------------------------------------------


def findings(
    table: Sequence[Mapping[str, Any]], results: Sequence[Mapping[str, Any]], args
) -> list[str]:
    """Plain statements read off the numbers (no claim the runs do not support)."""
    lines = []
    for rate in args.noise_rates:
        entries = [e for e in table if e["noise_rate"] == rate]
        base = next(e for e in entries if e["optimizer"] == optimizer_registry.BASELINE)
        sgd_curves = np.array(
            [
                r["curve"]
                for r in results
                if r["noise_rate"] == rate and r["optimizer"] == optimizer_registry.BASELINE
            ],
            dtype=np.float64,
        ).mean(0)
        peak = int(np.nanargmax(sgd_curves))
        lines.append(
            f"- {noise_label(rate, args.base.label_noise_mode)}: SGD's mean test curve peaks at "
            f"{100 * sgd_curves[peak]:.2f} % in epoch {peak + 1} and ends at "
            f"{100 * sgd_curves[-1]:.2f} % (training accuracy on the "
            f"{'noisy' if rate else 'clean'} labels at the end: "
            f"{100 * base['final_train_accuracy_mean']:.1f} %)."
        )
        for key, title in (("final", "final epoch"), ("best_val", "best-validation epoch")):
            better = [e["label"] for e in entries if e[f"{key}_beyond_spread"] and
                      e[f"{key}_diff_to_sgd"] > 0]  # fmt: skip
            worse = [e["label"] for e in entries if e[f"{key}_beyond_spread"] and
                     e[f"{key}_diff_to_sgd"] < 0]  # fmt: skip
            others = [
                e["label"]
                for e in entries
                if e["optimizer"] != optimizer_registry.BASELINE and not e[f"{key}_beyond_spread"]
            ]
            parts = []
            if better:
                parts.append(f"beat SGD by more than the seeds' spread: {', '.join(better)}")
            if worse:
                parts.append(f"fall behind SGD by more than the spread: {', '.join(worse)}")
            if others:
                parts.append(f"within the spread of SGD: {', '.join(others)}")
            lines.append(f"  - at the {title}, " + "; ".join(parts) + ".")
    return lines


def write_report(table, results, args, seconds, clock, out) -> None:
    trained = sum(r["trained"] for r in results)
    run_seconds = [r["summary"]["wall_time_s"] for r in results]
    lines = [
        "# SAM variants under label noise, CPU scale",
        "",
        f"Command: `{args.command}`",
        "",
        f"Protocol: {protocol_title(args.base)}; {args.base.validation_size} validation images "
        "held out "
        f"(clean labels); noise rates {list(args.noise_rates)} ({args.base.label_noise_mode}); "
        f"{args.seeds} seeds; rho: each variant's registry default"
        + (f", overridden: {dict(args.rho)}" if args.rho else "")
        + ". Every run through `experiments.trainer.train_and_evaluate`; "
        "its files under `runs/<noise>/<optimizer>-s<seed>/`.",
        "",
        f"{clock.machine_sentence()} Wall time {seconds:.0f} s for {len(results)} runs "
        f"({trained} trained now, {len(results) - trained} done already; "
        f"{np.mean(run_seconds):.1f} s per run on average as each run measured itself).",
        "",
        write_table(table, args, out),
        "",
        "![test accuracy per optimizer](accuracy.png)",
        "",
        "![test accuracy per epoch](curves.png)",
        "",
        "## Findings",
        "",
        *findings(table, results, args),
        "",
        "The rule: a difference counts where |mean_a - mean_b| > std_a + std_b (sample "
        f"standard deviations over {args.seeds} seeds). With few seeds this is a rough screen, "
        "not a significance test.",
        "",
    ]
    reporting.write_text(os.path.join(out, f"{NAME}.md"), "\n".join(lines))


def write_outputs(results, table, args, out, clock) -> None:
    """The figures, the report and the JSON record."""
    plot_accuracy(table, args, out)
    plot_curves(results, args, out)
    seconds = clock.seconds()
    write_report(table, results, args, seconds, clock, out)
    runs = [{k: v for k, v in r.items() if k != "summary"} for r in results]
    common.write_record(os.path.join(out, f"{NAME}.json"), args, seconds, table=table, runs=runs)
    print(reporting.markdown_table(table, ["label", "noise_rate", "final_mean", "best_val_mean"]))


def main(argv: Sequence[str] | None = None) -> dict:
    return common.run_protocol(parse_args(argv), run_all, summarize, write_outputs)


if __name__ == "__main__":
    runtime.run_command(main)
