"""The StableSAM paper's protocol as one command: grid search, rho search, seeds, tables, plot.

1. SGD grid over learning rate x weight decay ({0.01, 0.05, 0.1} x {1e-4, 5e-4, 1e-3}),
   selected on the validation split;
2. with that learning rate and weight decay fixed, rho over {0.05, 0.1, 0.2} ({0.5, 1.0, 2.0} for
   the ASAM variants) for every SAM variant, selected on the validation split;
3. the best configuration of SGD and of every variant with several seeds, reported as test
   accuracy mean ± std (markdown and CSV), plus a plot of the training curves.

Runs happen in-process (one after the other, each on all devices) under
``<output-dir>/runs/<optimizer>-lr<lr>-wd<wd>[-rho<rho>]-s<seed>``. A run whose ``summary.json``
exists is not run again and an interrupted one resumes from its checkpoint, so a sweep
continues where it stopped when started again with the same command.

Example::

  python -m experiments.sweep --dataset cifar10 --model resnet18 --epochs 200 \
      --output-dir sweeps/c10-r18
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from experiments import config as config_lib
from experiments import flags, metrics_log, optimizer_registry, reporting, run_dir, runtime
from experiments.config import TrainConfig
from experiments.runtime import ExitStatus

SAM_VARIANTS = optimizer_registry.names()
PROTOCOL_VARIANTS = optimizer_registry.protocol_names()  # the default comparison
SELECTION_METRICS = ("final_val_accuracy", "best_val_accuracy")

# Training flags that the sweep itself sets.
_SWEPT_FIELDS = (
    "optimizer",
    "rho",
    "learning_rate",
    "weight_decay",
    "seed",
    "output_dir",
    "resume",
    "overwrite",
    "stop_after_epoch",
)


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, e.g. 0.01,0.05,0.1; got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _optimizers(text: str) -> tuple[str, ...]:
    names = tuple(
        optimizer_registry.canonical_name(x.strip()) for x in text.split(",") if x.strip()
    )
    unknown = [n for n in names if n not in SAM_VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown SAM variant(s) {unknown}; choose from {', '.join(SAM_VARIANTS)}"
        )
    return names


_ADAPTIVE_VARIANTS = ", ".join(
    v.name for v in optimizer_registry.VARIANTS.values() if v.adaptive_rho
)


@dataclasses.dataclass
class SweepConfig:
    """The grids of the protocol (its own flags); every training flag not swept comes from
    `base`."""

    base: TrainConfig = dataclasses.field(metadata=dict(cli=False))
    output_dir: str = dataclasses.field(
        metadata=dict(required=True, help="Directory of the sweep.")
    )
    learning_rates: tuple[float, ...] = flags.option(
        (0.01, 0.05, 0.1), "Learning rates of the SGD grid.", flag="--lrs", parse=_floats
    )
    weight_decays: tuple[float, ...] = flags.option(
        (1e-4, 5e-4, 1e-3), "Weight decays of the SGD grid.", flag="--wds", parse=_floats
    )
    optimizers: tuple[str, ...] = flags.option(
        PROTOCOL_VARIANTS,
        f"SAM variants to compare with SGD (any of {','.join(SAM_VARIANTS)}).",
        parse=_optimizers,
    )
    rhos: tuple[float, ...] = flags.option(
        (0.05, 0.1, 0.2), "rho grid of the non-adaptive variants.", parse=_floats
    )
    asam_rhos: tuple[float, ...] = flags.option(
        (0.5, 1.0, 2.0), f"rho grid of the adaptive variants ({_ADAPTIVE_VARIANTS}).", parse=_floats
    )
    seeds: int = flags.option(3, "Seeds (0..N-1) of each best configuration.")
    selection: str = flags.option(
        "final_val_accuracy",
        "Validation metric that picks the best configuration (final_val_accuracy: the accuracy "
        "at the end of training, the epoch whose test accuracy is reported).",
        choices=SELECTION_METRICS,
    )

    def rho_grid(self, optimizer: str) -> tuple[float, ...]:
        """The rho grid of a variant: ASAM's for variants whose rho is relative to |w|."""
        return self.asam_rhos if optimizer_registry.get(optimizer).adaptive_rho else self.rhos


def build_parser(*, suppress_defaults: bool = False) -> argparse.ArgumentParser:
    return config_lib.protocol_parser(
        "experiments.sweep",
        "Run the StableSAM paper's protocol: SGD grid over learning rate x weight decay, rho grid "
        "per SAM variant, then several seeds of each best configuration; write table.md, "
        "table.csv, results.csv and curves.png to --output-dir.",
        SweepConfig,
        exclude=_SWEPT_FIELDS,
        suppress_defaults=suppress_defaults,
    )


def parse_args(argv: Sequence[str] | None = None) -> SweepConfig:
    values = flags.parse_command_line(argv, build_parser)
    own, training = flags.split_fields(values, SweepConfig)
    if own["seeds"] < 1:
        runtime.fail("--seeds must be >= 1", ExitStatus.BAD_INPUT)
    return SweepConfig(base=TrainConfig(**training, output_dir="", optimizer="sgd"), **own)


# --------------------------------------------------------------------------------------------
# Runs.
# --------------------------------------------------------------------------------------------


def run_dir_name(optimizer: str, lr: float, wd: float, rho: float, seed: int) -> str:
    name = f"{optimizer}-lr{lr:g}-wd{wd:g}"
    if optimizer != "sgd":
        name += f"-rho{rho:g}"
    return f"{name}-s{seed}"


TrainFn = Callable[[TrainConfig], Mapping[str, Any]]


class Runner:
    """Runs (or reuses) one training run per configuration and records its summary."""

    def __init__(self, sweep: SweepConfig, train_fn: TrainFn | None = None):
        self.sweep = sweep
        self.results: list[dict[str, Any]] = []
        self.train_fn = train_fn

    def run(
        self, phase: str, optimizer: str, lr: float, wd: float, rho: float, seed: int
    ) -> dict[str, Any]:
        output_dir = os.path.join(
            self.sweep.output_dir, "runs", run_dir_name(optimizer, lr, wd, rho, seed)
        )
        # SAM-only knobs stay off for the SGD baseline.
        base = config_lib.without_sam(self.sweep.base) if optimizer == "sgd" else self.sweep.base
        config = dataclasses.replace(
            base,
            optimizer=optimizer,
            rho=rho if optimizer != "sgd" else None,
            learning_rate=lr,
            weight_decay=wd,
            seed=seed,
            output_dir=output_dir,
            # Continues an interrupted run; starts afresh where there is nothing yet.
            resume=True,
            overwrite=False,
            stop_after_epoch=0,
        )
        # Imported here so that --help answers before JAX starts a backend.
        from experiments import trainer

        print(f"[sweep] {phase}: {output_dir}")
        summary, trained = trainer.train_unless_finished(
            config_lib.resolve(config), train_fn=self.train_fn
        )
        if not trained:
            print(f"[sweep] {phase}: {output_dir} already done, skipped.")
        if summary.get("diverged"):
            print(f"[sweep] {phase}: {output_dir} diverged: {summary.get('error', '')}")
        record = {
            "phase": phase,
            "optimizer": optimizer,
            "learning_rate": lr,
            "weight_decay": wd,
            "rho": rho if optimizer != "sgd" else 0.0,
            "seed": seed,
            "best_val_accuracy": summary.get("best_val_accuracy"),
            "final_val_accuracy": summary.get("final_val_accuracy"),
            "final_test_accuracy": summary.get("final_test_accuracy"),
            "train_time_s": summary.get("train_time_s"),
            "diverged": bool(summary.get("diverged")),
            "output_dir": output_dir,
        }
        self.results.append(record)
        return record


def select_best(records: Sequence[Mapping[str, Any]], metric: str) -> Mapping[str, Any]:
    """The record with the highest `metric` among the runs that did not diverge; the first one
    among ties (grid order)."""
    if not records:
        raise config_lib.ConfigError("No runs to select from: every grid is empty?")
    if all(r.get("diverged") for r in records):
        raise config_lib.ConfigError(
            f"Every run of this grid diverged: {[r['output_dir'] for r in records]}. Pass "
            "smaller learning rates (--lrs) or rhos (--rhos/--asam-rhos)."
        )
    records = [r for r in records if not r.get("diverged")]
    missing = [r["output_dir"] for r in records if r.get(metric) is None]
    if missing:
        raise config_lib.ConfigError(
            f"Runs without {metric} (no validation split?): {missing}. The protocol selects on "
            "the validation split: pass --validation-size > 0."
        )
    best = records[0]
    for record in records[1:]:
        if record[metric] > best[metric]:
            best = record
    return best


def run_sweep(sweep: SweepConfig, train_fn: TrainFn | None = None) -> list[dict[str, Any]]:
    """Runs the three phases; returns the final table rows (also written to disk)."""
    if sweep.base.validation_size == 0:  # None means the data set's default (> 0)
        raise config_lib.ConfigError(
            "The protocol selects on the validation split: pass --validation-size > 0."
        )
    os.makedirs(sweep.output_dir, exist_ok=True)
    runner = Runner(sweep, train_fn)
    metric = sweep.selection

    # 1. SGD grid over learning rate x weight decay (seed 0).
    grid = [
        runner.run("lr/wd grid", "sgd", lr, wd, 0.0, 0)
        for lr in sweep.learning_rates
        for wd in sweep.weight_decays
    ]
    best_sgd = select_best(grid, metric)
    lr, wd = best_sgd["learning_rate"], best_sgd["weight_decay"]
    print(f"[sweep] best SGD: lr {lr:g}, wd {wd:g} ({metric} {best_sgd[metric]:.4f})")

    # 2. rho grid per SAM variant, lr and wd fixed (seed 0).
    best = {"sgd": best_sgd}
    for optimizer in sweep.optimizers:
        records = [
            runner.run("rho grid", optimizer, lr, wd, rho, 0) for rho in sweep.rho_grid(optimizer)
        ]
        best[optimizer] = select_best(records, metric)
        print(f"[sweep] best {optimizer}: rho {best[optimizer]['rho']:g}")

    # 3. Seeds of every best configuration (seed 0 is the run already made).
    table = []
    for optimizer, chosen in best.items():
        seeds = [
            runner.run("seeds", optimizer, lr, wd, chosen["rho"], seed)
            for seed in range(sweep.seeds)
        ]
        table.append(_table_row(optimizer, chosen["rho"], lr, wd, seeds))

    write_results(sweep.output_dir, runner.results, table, sweep)
    return table


def _table_row(optimizer, rho, lr, wd, seeds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean ± std over the seeds that did not diverge (NaN if none); the others are counted."""
    finished = [r for r in seeds if not r.get("diverged")] or [{}]
    nan = float("nan")

    def percent(key: str) -> list[float]:
        return [100 * r[key] if r.get(key) is not None else nan for r in finished]

    test_mean, test_std = reporting.mean_std(percent("final_test_accuracy"))
    val_mean, val_std = reporting.mean_std(percent("final_val_accuracy"))
    return {
        "optimizer": optimizer,
        "rho": rho,
        "learning_rate": lr,
        "weight_decay": wd,
        "seeds": len(seeds),
        "diverged": sum(bool(r.get("diverged")) for r in seeds),
        "test_accuracy_mean": test_mean,
        "test_accuracy_std": test_std,
        "val_accuracy_mean": val_mean,
        "val_accuracy_std": val_std,
        "run_dirs": [r["output_dir"] for r in seeds],
    }


# --------------------------------------------------------------------------------------------
# Outputs.
# --------------------------------------------------------------------------------------------


def table_markdown(table: Sequence[Mapping[str, Any]], sweep: SweepConfig) -> str:
    """The final table with its caption: test accuracy mean ± std per optimizer."""
    # The data-set defaults filled in, for the caption.
    base = config_lib.resolve(
        dataclasses.replace(config_lib.without_sam(sweep.base), output_dir="-")
    )
    lines = [
        f"Test accuracy (%) on {base.dataset}, {base.model}, {base.epochs} epochs, batch "
        f"{base.batch_size}: mean ± std (sample std, n-1) over seeds; hyper-parameters "
        f"selected on {base.validation_size} validation images by {sweep.selection}."
        + (
            f" SAM variants train with SGD until epoch {sweep.base.sam_start_epoch} (late-phase)."
            if sweep.base.sam_start_epoch
            else ""
        ),
        "",
        "| optimizer | rho | lr | wd | test acc (%) | val acc (%) | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table:
        rho = "-" if row["optimizer"] == "sgd" else f"{row['rho']:g}"
        seeds = f"{row['seeds']}" + (f" ({row['diverged']} diverged)" if row["diverged"] else "")
        lines.append(
            f"| {row['optimizer']} | {rho} | {row['learning_rate']:g} | "
            f"{row['weight_decay']:g} | {row['test_accuracy_mean']:.2f} ± "
            f"{row['test_accuracy_std']:.2f} | {row['val_accuracy_mean']:.2f} ± "
            f"{row['val_accuracy_std']:.2f} | {seeds} |"
        )
    lines += [
        "",
        "Names: the StableSAM paper's SAM is usam, its SSAM stable_usam, its SAM† sam.",
    ]
    return "\n".join(lines) + "\n"


def write_results(
    output_dir: str,
    results: Sequence[Mapping[str, Any]],
    table: Sequence[Mapping[str, Any]],
    sweep: SweepConfig,
) -> None:
    """results.csv (every run), table.csv and table.md (the final table), curves.png."""
    import jax

    if jax.process_index() != 0:
        return
    reporting.write_csv(os.path.join(output_dir, "results.csv"), results)
    reporting.write_csv(os.path.join(output_dir, "table.csv"), table)
    text = table_markdown(table, sweep)
    reporting.write_text(os.path.join(output_dir, "table.md"), text)
    plot_curves(table, os.path.join(output_dir, "curves.png"))
    print(text)
    print(f"[sweep] wrote {output_dir}/table.md, table.csv, results.csv and curves.png")


def _read_rows(folder: str) -> list[dict[str, Any]]:
    return metrics_log.read_metrics(os.path.join(folder, run_dir.METRICS_JSONL))


def plot_curves(table: Sequence[Mapping[str, Any]], path: str) -> None:
    """Training loss, validation and test accuracy per epoch, mean over seeds, per optimizer."""
    plt = reporting.pyplot()
    panels = (
        ("train_loss", "training loss"),
        ("val_accuracy", "validation accuracy (%)"),
        ("test_accuracy", "test accuracy (%)"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for row in table:
        runs = [_read_rows(d) for d in row["run_dirs"]]
        label = (
            row["optimizer"]
            if row["optimizer"] == "sgd"
            else f"{row['optimizer']} ({row['rho']:g})"
        )
        for ax, (key, _) in zip(axes, panels, strict=True):
            by_epoch: dict[int, list[float]] = {}
            for rows in runs:
                for r in rows:
                    if key in r:
                        scale = 100.0 if key.endswith("accuracy") else 1.0
                        by_epoch.setdefault(r["epoch"], []).append(scale * r[key])
            epochs = sorted(by_epoch)
            ax.plot(epochs, [statistics.fmean(by_epoch[e]) for e in epochs], label=label)
    for ax, (_, title) in zip(axes, panels, strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    sweep = parse_args(argv)
    from experiments import parallel

    # Before any other JAX call (the runs' own calls then do nothing).
    parallel.maybe_initialize_distributed(sweep.base)
    try:
        return run_sweep(sweep)
    except Exception as e:
        runtime.fail_on(e)


if __name__ == "__main__":
    main()
