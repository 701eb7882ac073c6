r"""SAM's gain at SGD's cost: the efficient-SAM methods on one model and data, cost counted.

Every method trains through the harness (:func:`experiments.trainer.train_and_evaluate`) in the
label-noise table's regime (:mod:`experiments.papers.label_noise`: Fashion-MNIST, a
784-512-512-10 MLP on 5,000 training images, 25 cosine epochs, batch 128, lr 0.1, weight decay
5e-4), on clean labels and with 40 % symmetric noise, several seeds each. A method is a
``TrainConfig``: an optimizer of the registry plus the flags that choose its steps (late-phase
SAM, SAM every k steps, randomized switching) or its examples (m-sharpness).

Each run's cost is counted, not estimated: ``summary.json`` holds its full-batch gradient
evaluations (SGD: one per step, SAM: two; exact, from the steps that ascend and, for AE-SAM,
the count in its state) and its training time. The table gives test accuracy (final and at the
best validation epoch) with the difference to SGD and the **share of full SAM's gain** each
method keeps; the figures draw accuracy against gradient evaluations and against training time
relative to SGD, with the Pareto front. The target: 90 % of SAM's gain at no more than 1.2x
SGD's gradient evaluations.

Run: ``python -m experiments.papers.efficiency`` (files in runs/papers/efficiency/; each run in
``runs/<noise>/<method>-s<seed>``, skipped when done, so an interrupted command continues).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from experiments import config as config_lib
from experiments import flags, optimizer_registry, reporting, runtime, trainer
from experiments.config import TrainConfig
from experiments.flags import option
from experiments.papers import cached_runs, common, label_noise, late_phase_fashion

NAME = "efficiency"


@dataclasses.dataclass(frozen=True)
class Method:
    """One point of the frontier: an optimizer and the flags that choose where it ascends."""

    label: str
    optimizer: str
    flags: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    family: str = ""  # methods of one family share a colour and are joined by a line
    # Candidate flag values, one chosen per regime on the validation split (see select_flags).
    grid: Sequence[Mapping[str, Any]] = ()

    def config(self, base: TrainConfig, chosen: Mapping[str, Any] | None = None) -> TrainConfig:
        return base.replace(optimizer=self.optimizer, **self.flags, **(chosen or {}))


def _methods() -> dict[str, Method]:
    methods = {
        "sgd": Method("SGD", "sgd", family="sgd"),
        "sam": Method("SAM (m = 128)", "sam", family="sam"),
        "stable_sam": Method("StableSAM", "stable_sam", family="stable_sam"),
    }
    for fraction in (0.1, 0.25, 0.5):
        methods[f"late{100 * fraction:g}"] = Method(
            f"SAM, last {100 * fraction:g} %", "sam", dict(sam_last_fraction=fraction), "late"
        )
    for k in (2, 5, 10):
        methods[f"every{k}"] = Method(f"SAM every {k}", "sam", dict(sam_every=k), "every")
    for k in (2, 5, 10):
        methods[f"looksam{k}"] = Method(f"LookSAM k = {k}", "looksam", dict(looksam_k=k), "looksam")
    for p in (0.2, 0.5):
        methods[f"rst{100 * p:g}"] = Method(f"RST p = {p:g}", "sam", dict(sam_probability=p), "rst")
    for name, label in (
        ("ae_sam", "AE-SAM"),
        ("esam", "ESAM"),
        ("momentum_sam", "Momentum-SAM"),
        ("sparse_sam_fisher", "SSAM-F"),
        ("sparse_sam_dynamic", "SSAM-D"),
    ):
        if name in optimizer_registry.names():
            methods[name] = Method(label, name, family=name)
    # Per-example ascent, exact, in two passes (sam_optax.per_example); for the MLP the same
    # numbers as sam with micro-batches of m.
    for m in (16, 1):
        methods[f"m{m}"] = Method(
            f"SAM, m = {m}", "per_example_sam", dict(sam_micro_batch=m), "sam"
        )
    head_rhos = tuple(dict(rho=rho) for rho in (0.01, 0.03, 0.1, 0.2))
    methods["head1"] = Method("head SAM, 1 layer", "head_sam", family="head", grid=head_rhos)
    methods["head2"] = Method("head SAM, 2 layers", "head_sam2", family="head", grid=head_rhos)
    methods["penalty"] = Method(
        "SGD + last-layer L2", "last_layer_penalty", family="penalty",
        grid=tuple(
            dict(last_layer_weight_penalty=w, last_layer_feature_penalty=a)
            for w in (1e-3, 1e-2) for a in (1e-3, 1e-2, 1e-1)
        ),
    )  # fmt: skip
    return methods


METHODS: dict[str, Method] = _methods()
# The per-example methods and the cheap ones they are compared with, after SGD and SAM (the
# second regime's list is this one less m = 16).
PER_EXAMPLE_METHODS = (
    "stable_sam", "late10", "late25", "late50", "every5", "rst20", "looksam5", "momentum_sam",
    "head1", "head2", "penalty", "m1", "m16",
)  # fmt: skip
BASELINE, FULL_SAM = "sgd", "sam"
FAMILY_COLORS = {
    "sgd": "k", "sam": "C1", "stable_sam": "C0", "late": "C2", "every": "C3", "looksam": "C7",
    "rst": "C4", "ae_sam": "C5", "esam": "C6", "momentum_sam": "C8", "sparse_sam_fisher": "C9",
    "sparse_sam_dynamic": "#393b79", "head": "darkturquoise", "penalty": "saddlebrown",
}  # fmt: skip
# The target: this share of full SAM's gain at no more than this many gradient evaluations
# relative to SGD.
TARGET_SHARE, TARGET_COST = 0.9, 1.2


@dataclasses.dataclass(frozen=True)
class EfficiencyConfig:
    """The protocol: what its runs share (`base`) and its own flags."""

    base: TrainConfig = dataclasses.field(
        default_factory=label_noise.base_config, metadata=dict(cli=False)
    )
    noise_rates: Sequence[float] = option(
        (0.0, 0.4), "Label-noise fractions.", nargs="+", parse=float
    )
    methods: Sequence[str] = flags.methods_option(tuple(METHODS), "Methods to compare.")
    seeds: int = option(3, "Seeds per method and noise.")
    output_dir: str = option(
        os.path.join(common.OUTPUT_ROOT, NAME), "Folder of the tables, figures and runs."
    )
    command: str = dataclasses.field(default="", metadata=dict(cli=False))  # reproduces it


# Training flags the protocol sets itself, per run.
_PROTOCOL_FIELDS = (
    *label_noise.PROTOCOL_FIELDS,
    "sam_last_fraction",
    "sam_every",
    "sam_probability",
    "sam_micro_batch",
    "looksam_k",
    "last_layer_weight_penalty",
    "last_layer_feature_penalty",
)


def build_parser(*, suppress_defaults: bool = False):
    return label_noise.protocol_parser(
        f"experiments.papers.{NAME}", __doc__, EfficiencyConfig, exclude=_PROTOCOL_FIELDS,
        suppress_defaults=suppress_defaults,
    )  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> EfficiencyConfig:
    values = flags.parse_command_line(argv, build_parser, label_noise.PRESETS.__getitem__)
    own, training = flags.split_fields(values, EfficiencyConfig)
    noise_rates = label_noise.check_noise_rates(own["noise_rates"], own["seeds"], build_parser)
    unknown = sorted(set(own["methods"]) - set(METHODS))
    if unknown:
        build_parser().error(f"unknown --methods {unknown}; choose from {' '.join(METHODS)}")
    methods = (BASELINE, FULL_SAM, *(m for m in own["methods"] if m not in (BASELINE, FULL_SAM)))
    return EfficiencyConfig(
        base=TrainConfig(**training),
        noise_rates=noise_rates,
        methods=tuple(dict.fromkeys(methods)),
        seeds=own["seeds"],
        output_dir=own["output_dir"],
        command=reporting.command_line(f"experiments.papers.{NAME}", argv),
    )


def run_config(
    args: EfficiencyConfig,
    method: str,
    rate: float,
    seed: int,
    chosen: Mapping[str, Any] | None = None,
    folder: str = "",
) -> TrainConfig:
    """The harness configuration of one run, resolved; `chosen`: the method's flags picked on
    the validation split (the grid's runs go to `folder`)."""
    noise = label_noise.noise_tag(rate, args.base.label_noise_mode)
    name = f"{method}-s{seed}" if not folder else f"{method}-{_flags_tag(chosen)}-s{seed}"
    config = (
        METHODS[method]
        .config(args.base, chosen)
        .replace(
            label_noise=rate,
            seed=seed,
            checkpoint_every=args.base.epochs,  # one checkpoint, at the end
            output_dir=os.path.join(args.output_dir, "runs", folder, noise, name),
        )
    )
    return config_lib.resolve(config)


def _flags_tag(flags: Mapping[str, Any] | None) -> str:
    return "-".join(f"{value:g}" for value in (flags or {}).values())


def select_flags(args: EfficiencyConfig) -> dict[str, dict[str, Any]]:
    """Each grid method's flags, chosen on the validation split (clean labels): the candidate
    with the best validation accuracy at its best epoch, seed 0, at the highest noise rate. Also
    returns, under ``"_grid"``, every candidate's accuracy for the report."""
    rate = max(args.noise_rates)
    chosen: dict[str, Any] = {"_grid": {}}
    dataset = None
    for method in (m for m in args.methods if METHODS[m].grid):
        scores = []
        for candidate in METHODS[method].grid:
            config = run_config(args, method, rate, 0, candidate, folder="grid")
            if dataset is None and not cached_runs.is_done(config):
                dataset = trainer.load_dataset(config)
            summary, _, _ = cached_runs.run_or_load(config, dataset)
            scores.append((summary["best_val_accuracy"], dict(candidate)))
            print(f"grid {method} {_flags_tag(candidate)}: val {summary['best_val_accuracy']:.4f}")
        chosen[method] = max(scores, key=lambda score: score[0])[1]
        chosen["_grid"][method] = [(_flags_tag(f), accuracy) for accuracy, f in scores]
    return chosen


# The final checkpoints whose sharpness the report gives (Zhou et al.: SAM selects flatter
# minima late in training), and how it is measured: the top Hessian eigenvalue of the training
# loss on the first images of the (noisy) training split, by Lanczos.
SHARPNESS_METHODS = ("sgd", "sam", "late10", "late25", "late50")
HESSIAN = types.SimpleNamespace(hessian_size=2048, hessian_chunk=512, lanczos_iters=20)


def top_eigenvalue(config: TrainConfig, dataset: Any, measures: dict) -> float:
    """The top Hessian eigenvalue at a finished run's final checkpoint (`measures` caches the
    jitted measurement per data set)."""
    experiment, state = cached_runs.final_state(config, dataset)
    if id(dataset) not in measures:
        measures[id(dataset)] = late_phase_fashion.make_measure(experiment, dataset, HESSIAN)
    values = measures[id(dataset)](
        jax.device_get(state.params), jax.device_get(state.batch_stats), jax.random.key(0)
    )
    return float(values["top_eigenvalue"])


def run_all(args: EfficiencyConfig) -> list[dict[str, Any]]:
    """Every (noise rate, method, seed) run, trained or read back; one row per run."""
    results = []
    chosen = select_flags(args)
    measures: dict = {}
    for rate in args.noise_rates:
        dataset = None  # loaded once per noise rate, and only if a run trains or is measured
        for method in args.methods:
            for seed in range(args.seeds):
                config = run_config(args, method, rate, seed, chosen.get(method))
                measured = method in SHARPNESS_METHODS
                if dataset is None and (measured or not cached_runs.is_done(config)):
                    dataset = trainer.load_dataset(config)
                summary, _, trained = cached_runs.run_or_load(config, dataset)
                if measured and not summary.get("diverged"):
                    summary = {
                        **summary,
                        "top_eigenvalue": top_eigenvalue(config, dataset, measures),
                    }
                cost = summary["gradient_evaluations_vs_sgd"]
                print(
                    f"{label_noise.noise_tag(rate)} {method} s{seed}: "
                    f"{'trained' if trained else 'done already'}, test "
                    f"{summary['final_test_accuracy']:.4f}, "
                    + (f"{cost:.2f}x SGD's gradients, " if cost is not None else "diverged, ")
                    + f"{summary['train_time_s']:.1f} s",
                    flush=True,
                )
                results.append({
                    **summary, "noise_rate": rate, "method": method, "trained": trained,
                    "chosen": chosen.get(method, {}), "grid": chosen["_grid"].get(method, []),
                })  # fmt: skip
    return results


# --------------------------------------------------------------------------------------------
# The table.
# --------------------------------------------------------------------------------------------

METRICS = label_noise.METRICS


def median_train_time(results: Sequence[Mapping[str, Any]], method: str) -> float:
    """The median training time of a method's finished runs, over every seed and noise rate:
    the runs share a machine with whatever else runs on it, and the median of several runs is
    robust to a burst of load during one of them (NaN where none finished)."""
    times = [r["train_time_s"] for r in results if r["method"] == method and not r["diverged"]]
    return float(np.median(times)) if times else float("nan")


def summarize(results: Sequence[Mapping[str, Any]], args: EfficiencyConfig) -> list[dict]:
    """One row per (method, noise rate): means, stds, costs and the share of SAM's gain."""
    table = []
    for rate in args.noise_rates:
        stats = {}
        for method in args.methods:
            runs = [r for r in results if r["noise_rate"] == rate and r["method"] == method]
            entry = dict(
                method=method,
                label=METHODS[method].label,
                noise_rate=rate,
                seeds=len(runs),
                **label_noise.metric_stats(runs),
            )
            # A diverged run's accuracy counts (it is what the method gave); its cost is that of
            # the seeds that finished (NaN, and no point in the figures, if none did).
            finished = [r for r in runs if not r["diverged"]]
            entry["diverged_seeds"] = len(runs) - len(finished)
            entry["gradient_evaluations_vs_sgd"] = (
                float(np.mean([r["gradient_evaluations_vs_sgd"] for r in finished]))
                if finished
                else float("nan")
            )
            entry["train_time_s"] = median_train_time(results, method)
            eigenvalues = [r["top_eigenvalue"] for r in runs if "top_eigenvalue" in r]
            if eigenvalues:
                entry["top_eigenvalue_mean"], entry["top_eigenvalue_std"] = reporting.mean_std(
                    eigenvalues
                )
            stats[method] = entry
        base, sam = stats[BASELINE], stats[FULL_SAM]
        for entry in stats.values():
            entry["train_time_vs_sgd"] = entry["train_time_s"] / base["train_time_s"]
            label_noise.compare_to_baseline(entry, base, entry["method"] == BASELINE)
            for key in METRICS:
                gain = sam[f"{key}_mean"] - base[f"{key}_mean"]
                # A share of a gain within the seeds' spread would be noise divided by noise.
                real_gain = gain > 0 and label_noise.significant(
                    gain, sam[f"{key}_std"], base[f"{key}_std"]
                )
                share = entry[f"{key}_diff_to_sgd"] / gain if real_gain else float("nan")
                entry[f"{key}_share_of_sam_gain"] = share
            table.append(entry)
    return table


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (cost no higher and accuracy no lower, one of
    them strictly), by increasing cost."""
    front = []
    for i, (cost, accuracy) in enumerate(points):
        dominated = any(
            c <= cost and a >= accuracy and (c < cost or a > accuracy)
            for j, (c, a) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _share(entry: Mapping[str, Any], key: str) -> str:
    share = entry[f"{key}_share_of_sam_gain"]
    return (
        "" if entry["method"] in (BASELINE, FULL_SAM) or np.isnan(share) else f"{100 * share:.0f} %"
    )


def markdown_table(table: Sequence[Mapping[str, Any]], rate: float) -> str:
    rows = []
    for entry in (e for e in table if e["noise_rate"] == rate):
        diverged = entry["diverged_seeds"]
        row = {
            "method": entry["label"]
            + (f" (diverged: {diverged} of {entry['seeds']} seeds)" if diverged else ""),
            "gradients vs SGD": f"{entry['gradient_evaluations_vs_sgd']:.2f}",
            "time vs SGD": f"{entry['train_time_vs_sgd']:.2f}",
        }
        for key, title in (("final", "final"), ("best_val", "best val")):
            text = f"{100 * entry[f'{key}_mean']:.2f} ± {100 * entry[f'{key}_std']:.2f}"
            if entry["method"] != BASELINE:
                mark = " *" if entry[f"{key}_beyond_spread"] else ""
                text += f" ({100 * entry[f'{key}_diff_to_sgd']:+.2f}{mark})"
            row[f"test % {title}"] = text
            row[f"share of SAM's gain, {title}"] = _share(entry, key)
        rows.append(row)
    return reporting.markdown_table(rows, list(rows[0]), fmt=str)


# --------------------------------------------------------------------------------------------
# Figures.
# --------------------------------------------------------------------------------------------


# Below SGD's accuracy by more than this many points, a method is left off the plot's range
# (and named under it), so that the methods near SGD and SAM stay legible.
PLOT_RANGE_BELOW_SGD = 6.0
MARKERS = "osD^v<>"


def _marker(method: str) -> str:
    """The marker of a method: the families share a colour, their members differ in shape."""
    family = METHODS[method].family
    members = [m for m in METHODS if METHODS[m].family == family]
    return MARKERS[members.index(method) % len(MARKERS)]


def plot_frontier(
    table: Sequence[Mapping[str, Any]], args: EfficiencyConfig, rate: float, path: str
) -> None:
    """Test accuracy (rows: final, best validation) against the cost (columns: gradient
    evaluations, training time on a log scale; both relative to SGD), the Pareto front drawn
    and its points named; one legend for every method."""
    plt = reporting.pyplot()
    entries = [e for e in table if e["noise_rate"] == rate]
    sgd = next(e for e in entries if e["method"] == BASELINE)
    sam = next(e for e in entries if e["method"] == FULL_SAM)
    fig, axes = plt.subplots(2, 2, figsize=(14, 9), sharey="row")
    metrics = (("final", "final epoch"), ("best_val", "best validation epoch"))
    costs = (
        ("gradient_evaluations_vs_sgd", "gradient evaluations relative to SGD"),
        ("train_time_vs_sgd", "training time relative to SGD (log scale; this machine)"),
    )
    for row, (key, title) in enumerate(metrics):
        floor = 100 * sgd[f"{key}_mean"] - PLOT_RANGE_BELOW_SGD
        shown = [e for e in entries if 100 * e[f"{key}_mean"] >= floor]
        left_off = [e["label"] for e in entries if 100 * e[f"{key}_mean"] < floor]
        for col, (cost, xlabel) in enumerate(costs):
            ax = axes[row][col]
            drawn = [e for e in shown if np.isfinite(e[cost])]
            points = [(e[cost], 100 * e[f"{key}_mean"]) for e in drawn]
            for e, (x, y) in zip(drawn, points, strict=True):
                ax.errorbar(
                    x, y, yerr=100 * e[f"{key}_std"], fmt=_marker(e["method"]), capsize=2, ms=6,
                    color=FAMILY_COLORS.get(METHODS[e["method"]].family, "C0"),
                    label=e["label"] if row == 0 and col == 0 else None,
                )  # fmt: skip
            front = pareto_front(points)
            ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "k--", lw=0.8)
            for i in front:
                ax.annotate(drawn[i]["label"], points[i], fontsize=7, xytext=(4, -10),
                            textcoords="offset points")  # fmt: skip
            if col == 0 and sam[f"{key}_mean"] > sgd[f"{key}_mean"]:
                # The target's corner: accuracy above the line, cost left of the other.
                gain = sam[f"{key}_mean"] - sgd[f"{key}_mean"]
                ax.axhline(100 * (sgd[f"{key}_mean"] + TARGET_SHARE * gain), color="g", ls=":")
                ax.axvline(TARGET_COST, color="g", ls=":")
            if col == 1:
                ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"test accuracy (%) at the {title}")
            ax.grid(alpha=0.3)
            if left_off:
                ax.set_title(f"below the range: {', '.join(left_off)}", fontsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], color="k", ls="--", lw=0.8))
    labels.append("Pareto front (its points named)")
    handles.append(plt.Line2D([], [], color="g", ls=":"))
    labels.append(f"target: {100 * TARGET_SHARE:.0f} % of SAM's gain at <= {TARGET_COST}x")
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    noise = label_noise.noise_label(rate, args.base.label_noise_mode)
    protocol = label_noise.protocol_title(args.base)
    fig.suptitle(f"{noise}: {protocol}; mean ± std over {args.seeds} seeds", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The report.
# --------------------------------------------------------------------------------------------


def _entry(
    table: Sequence[Mapping[str, Any]], rate: float, method: str
) -> Mapping[str, Any] | None:
    return next((e for e in table if e["noise_rate"] == rate and e["method"] == method), None)


def _compare(entry: Mapping[str, Any], other: Mapping[str, Any], key: str) -> str:
    """'matches' / 'beats' / 'falls short of' `other`, by the table's spread rule."""
    diff = entry[f"{key}_mean"] - other[f"{key}_mean"]
    if not label_noise.significant(diff, entry[f"{key}_std"], other[f"{key}_std"]):
        return f"is within the seeds' spread of {other['label']} ({100 * diff:+.2f} points)"
    verb = "beats" if diff > 0 else "falls short of"
    return f"{verb} {other['label']} by {100 * abs(diff):.2f} points"


def caveats(table: Sequence[Mapping[str, Any]], entry: Mapping[str, Any]) -> str:
    """Where else the method falls behind SGD by more than the spread (other noise rates, the
    other epoch), as a clause; empty where nowhere."""
    behind = [
        f"{100 * e[f'{key}_diff_to_sgd']:+.2f} points {label_noise.noise_tag(e['noise_rate'])} "
        f"at the {'final' if key == 'final' else 'best-val'} epoch"
        for e in table
        if e["method"] == entry["method"]
        for key in METRICS
        if e[f"{key}_beyond_spread"] and e[f"{key}_diff_to_sgd"] < 0
    ]
    return f", but against SGD {', '.join(behind)}" if behind else ""


def target_line(table: Sequence[Mapping[str, Any]], rate: float, key: str = "final") -> str:
    """Which methods reach the target, or the closest one."""
    sgd, sam = _entry(table, rate, BASELINE), _entry(table, rate, FULL_SAM)
    gain = sam[f"{key}_mean"] - sgd[f"{key}_mean"]
    if not gain > 0:
        return f"SAM does not gain over SGD here ({100 * gain:+.2f} points): no gain to keep."
    if not label_noise.significant(gain, sam[f"{key}_std"], sgd[f"{key}_std"]):
        return (
            f"SAM's gain over SGD here ({100 * gain:+.2f} points) is within the seeds' spread, "
            "so there is no gain to keep."
        )
    cheap = [
        e
        for e in table
        if e["noise_rate"] == rate
        and e["method"] not in (BASELINE, FULL_SAM)
        and e["gradient_evaluations_vs_sgd"] <= TARGET_COST
        and not e["diverged_seeds"]
    ]
    reached = [e for e in cheap if e[f"{key}_share_of_sam_gain"] >= TARGET_SHARE]
    if reached:
        names = ", ".join(
            f"{e['label']} ({100 * e[f'{key}_share_of_sam_gain']:.0f} % at "
            f"{e['gradient_evaluations_vs_sgd']:.2f}x{caveats(table, e)})"
            for e in sorted(reached, key=lambda e: -e[f"{key}_share_of_sam_gain"])
        )
        return f"SAM gains {100 * gain:.2f} points; reaching the target: {names}."
    best = max(cheap, key=lambda e: e[f"{key}_share_of_sam_gain"], default=None)
    closest = (
        f" the closest is {best['label']} with {100 * best[f'{key}_share_of_sam_gain']:.0f} % "
        f"at {best['gradient_evaluations_vs_sgd']:.2f}x"
        if best
        else ""
    )
    return f"SAM gains {100 * gain:.2f} points; no method reaches the target;{closest}."


PER_EXAMPLE_SAM = "m1"


def cheap_verdict(table: Sequence[Mapping[str, Any]], rate: float, key: str = "final") -> str:
    """The stricter question: which method keeps at least TARGET_SHARE of SAM's gain and of
    1-SAM's (m = 1), at no more than TARGET_COST times SGD's gradient evaluations and training
    time, without falling behind SGD beyond the spread elsewhere; else the closest."""
    sgd, sam, one = (_entry(table, rate, m) for m in (BASELINE, FULL_SAM, PER_EXAMPLE_SAM))
    if one is None:
        return ""
    gains = {"SAM": sam[f"{key}_mean"] - sgd[f"{key}_mean"]}
    gains["1-SAM"] = one[f"{key}_mean"] - sgd[f"{key}_mean"]
    if not all(g > 0 for g in gains.values()):
        return (
            f"SAM ({100 * gains['SAM']:+.2f} points) or 1-SAM ({100 * gains['1-SAM']:+.2f}) does "
            "not gain over SGD here, so there is no gain to keep."
        )
    rows = []
    for e in table:
        if e["noise_rate"] != rate or e["method"] in (BASELINE, FULL_SAM, PER_EXAMPLE_SAM):
            continue
        cost = max(e["gradient_evaluations_vs_sgd"], e["train_time_vs_sgd"])
        if not cost <= TARGET_COST or e["diverged_seeds"]:
            continue
        diff = e[f"{key}_mean"] - sgd[f"{key}_mean"]
        shares = {name: diff / gain for name, gain in gains.items()}
        rows.append((min(shares.values()), e, shares, caveats(table, e)))
    passing = [r for r in rows if r[0] >= TARGET_SHARE and not r[3]]
    text = (
        f"SAM gains {100 * gains['SAM']:.2f} points and 1-SAM {100 * gains['1-SAM']:.2f}; "
        f"at <= {TARGET_COST}x SGD's gradient evaluations and time, "
    )
    describe = lambda r: (  # noqa: E731
        f"{r[1]['label']} ({100 * r[2]['SAM']:.0f} % of SAM's gain, {100 * r[2]['1-SAM']:.0f} % "
        f"of 1-SAM's, {r[1]['gradient_evaluations_vs_sgd']:.2f}x gradients, "
        f"{r[1]['train_time_vs_sgd']:.2f}x time{r[3]})"
    )
    if passing:
        return text + "keeping 90 % of both: " + ", ".join(map(describe, passing)) + "."
    if not rows:
        return text + "no method runs that cheaply."
    return text + "no method keeps 90 % of both; the closest is " + describe(max(rows)) + "."


def claims(table: Sequence[Mapping[str, Any]], rate: float) -> list[str]:
    """The papers' claims, each checked against this noise setting's numbers."""
    get = functools.partial(_entry, table, rate)
    sam, lines = get(FULL_SAM), []
    checks = (
        ("late25", "Zhou et al.: SAM in the last part of training alone is about as good as SAM "
         "throughout", sam),
        ("rst50", "Zhao et al.: randomized switching keeps SAM's accuracy at a fraction of its "
         "cost", sam),
        ("looksam5", "Liu et al.: LookSAM k = 5 is about as accurate as SAM", sam),
        ("ae_sam", "Jiang et al.: AE-SAM, SAM on about half of the steps, is about as accurate "
         "as SAM", sam),
        ("esam", "Du et al.: ESAM is about as accurate as SAM", sam),
        ("momentum_sam", "Becker et al.: Momentum-SAM gets SAM's gain at SGD's cost", sam),
        ("sparse_sam_fisher", "Mi et al.: SSAM-F (50 % sparse) is about as accurate as SAM", sam),
        ("sparse_sam_dynamic", "Mi et al.: SSAM-D (50 % sparse) is about as accurate as SAM", sam),
        ("m1", "Baek et al.: under label noise, per-example ascent (m = 1) gains most", sam),
        ("head1", "Baek et al.: 1-SAM's gain comes mostly through the last layers (here: the "
         "per-example ascent on the head alone, one pass)", get(PER_EXAMPLE_SAM) or sam),
        ("penalty", "Baek et al.: SGD with L2 on the last layer's weights and features largely "
         "recovers 1-SAM's gain", get(PER_EXAMPLE_SAM) or sam),
    )  # fmt: skip
    for method, claim, other in checks:
        entry = get(method)
        if entry is None:
            continue
        parts = [
            f"at the {title} it {_compare(entry, other, key)}"
            for key, title in (("final", "final epoch"), ("best_val", "best-val epoch"))
        ]
        lines.append(
            f"- {claim}. Here {entry['label']} ({entry['gradient_evaluations_vs_sgd']:.2f}x SGD's "
            f"gradients) " + "; ".join(parts) + "."
        )
    return lines


def sharpness_lines(table: Sequence[Mapping[str, Any]], args: EfficiencyConfig) -> list[str]:
    """The top Hessian eigenvalue of the final checkpoints: a table and what it says about
    late-phase SAM (does it reach full SAM's sharpness, and after how much of the run)."""
    measured = [m for m in SHARPNESS_METHODS if any(
        e["method"] == m and "top_eigenvalue_mean" in e for e in table
    )]  # fmt: skip
    if not {"sgd", "sam"} <= set(measured):
        return []
    rows, sentences = [], []
    for method in measured:
        row = {"method": METHODS[method].label}
        for rate in args.noise_rates:
            e = _entry(table, rate, method)
            row[label_noise.noise_tag(rate)] = (
                f"{e['top_eigenvalue_mean']:.3g} ± {e['top_eigenvalue_std']:.2g}"
            )
        rows.append(row)
    for rate in args.noise_rates:
        sgd, sam = (_entry(table, rate, m)["top_eigenvalue_mean"] for m in ("sgd", "sam"))
        closed = {
            m: (sgd - _entry(table, rate, m)["top_eigenvalue_mean"]) / (sgd - sam)
            for m in measured
            if m.startswith("late") and sgd != sam
        }
        reached = [m for m, share in closed.items() if share >= 0.9]
        gaps = ", ".join(f"{METHODS[m].label} {100 * share:.0f} %" for m, share in closed.items())
        first = min(reached, key=lambda m: METHODS[m].flags["sam_last_fraction"], default=None)
        sentences.append(
            f"{label_noise.noise_label(rate, args.base.label_noise_mode)}: SGD ends at "
            f"{sgd:.3g}, SAM at {sam:.3g} ({'flatter' if sam < sgd else 'sharper'}); share of "
            f"that gap closed by late SAM: {gaps}. "
            + (
                f"SAM on the last {100 * METHODS[first].flags['sam_last_fraction']:g} % of the "
                "steps already reaches 90 % of full SAM's flatness."
                if first
                else "No late-SAM run reaches 90 % of full SAM's flatness."
            )
        )
    return [
        "## Sharpness of the final checkpoints",
        "",
        f"Top Hessian eigenvalue of the training loss (the first {HESSIAN.hessian_size} training "
        f"images, their training labels; Lanczos, {HESSIAN.lanczos_iters} steps), mean ± std "
        "over seeds:",
        "",
        reporting.markdown_table(rows, list(rows[0]), fmt=str),
        "",
        *sentences,
        "",
    ]


def write_report(table, results, args, seconds, clock, out) -> None:
    trained = sum(r["trained"] for r in results)
    rho_of = {r["method"]: r["rho"] for r in results if r["method"] != BASELINE}
    usual = max(set(rho_of.values()), key=list(rho_of.values()).count)
    others = [f"{METHODS[m].label} {rho:g}" for m, rho in rho_of.items() if rho != usual]
    rhos = f"{usual:g}" + (f"; {', '.join(others)}" if others else "")
    sgd_times = [r["train_time_s"] for r in results if r["method"] == BASELINE]
    run_minutes = sum(r["wall_time_s"] for r in results) / 60
    lines = [
        "# The efficient-SAM frontier on Fashion-MNIST, CPU scale",
        "",
        f"Command: `{args.command}`",
        "",
        f"Protocol: {label_noise.protocol_title(args.base)}; "
        f"{args.base.validation_size} validation images held out (clean labels); "
        f"noise rates {list(args.noise_rates)} "
        f"({args.base.label_noise_mode}); {args.seeds} seeds; rho: each optimizer's registry "
        f"default ({rhos}). Every run through "
        "`experiments.trainer.train_and_evaluate`; its files under "
        "`runs/<noise>/<method>-s<seed>/`.",
        "",
        f"{clock.machine_sentence()} {len(results)} runs, {trained} of them trained by this "
        f"command (its wall time {seconds:.0f} s); the runs' own wall times add up to "
        f"{run_minutes:.0f} min. Gradient evaluations are counted exactly. A method's training "
        "time is the median over its runs (every seed and noise rate) of each run's own, the "
        "sum of its epochs without compilation and evaluation, relative to SGD's; the same in "
        f"both tables. The machine is shared, so these times are rough: SGD's {len(sgd_times)} "
        f"runs took {min(sgd_times):.1f} to {max(sgd_times):.1f} s.",
        "",
    ]
    grids = {r["method"]: (r["chosen"], r["grid"]) for r in results if r.get("grid")}
    if grids:
        lines += [
            "Chosen on the validation split (seed 0, the highest noise rate; in brackets each "
            "candidate's validation accuracy at its best epoch; the penalty's candidates are "
            "gamma_w-gamma_a): "
            + "; ".join(
                f"{METHODS[m].label}: {_flags_tag(chosen)} ("
                + ", ".join(f"{tag}: {100 * acc:.2f} %" for tag, acc in grid)
                + ")"
                for m, (chosen, grid) in grids.items()
            )
            + ".",
            "",
        ]
    for rate in args.noise_rates:
        tag = label_noise.noise_tag(rate, args.base.label_noise_mode)
        lines += [
            f"## {label_noise.noise_label(rate, args.base.label_noise_mode)}",
            "",
            markdown_table(table, rate),
            "",
            f"![accuracy against cost, {tag}]({NAME}_{tag}.png)",
            "",
            f"Target ({100 * TARGET_SHARE:.0f} % of SAM's final-epoch gain at <= {TARGET_COST}x "
            f"SGD's gradient evaluations): {target_line(table, rate)} At the best validation "
            f"epoch: {target_line(table, rate, 'best_val')}",
            "",
            f"Cheap and as good as SAM and 1-SAM (final epoch): {cheap_verdict(table, rate)} At "
            f"the best validation epoch: {cheap_verdict(table, rate, 'best_val')}",
            "",
            *claims(table, rate),
            "",
        ]
    lines += sharpness_lines(table, args)
    lines += [
        "Test accuracy (%), mean ± std over seeds; in brackets the difference to SGD, marked * "
        "where it exceeds the sum of the two standard deviations (a rough screen with few seeds, "
        "not a significance test). Share of SAM's gain: (method - SGD) / (SAM - SGD).",
        "",
    ]
    reporting.write_text(os.path.join(out, f"{NAME}.md"), "\n".join(lines))


def write_outputs(results, table, args, out, clock) -> None:
    """The frontier figures, the table, the report and the JSON record."""
    for rate in args.noise_rates:
        tag = label_noise.noise_tag(rate, args.base.label_noise_mode)
        plot_frontier(table, args, rate, os.path.join(out, f"{NAME}_{tag}.png"))
    reporting.write_csv(os.path.join(out, "table.csv"), table)
    seconds = clock.seconds()
    write_report(table, results, args, seconds, clock, out)
    common.write_record(os.path.join(out, f"{NAME}.json"), args, seconds, table=table, runs=results)
    for rate in args.noise_rates:
        print(markdown_table(table, rate))


def main(argv: Sequence[str] | None = None) -> dict:
    return common.run_protocol(parse_args(argv), run_all, summarize, write_outputs)


if __name__ == "__main__":
    runtime.run_command(main)
