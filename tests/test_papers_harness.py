"""The papers' experiments that train through the harness (label noise, late-phase SAM on
Fashion-MNIST), end to end at a tiny size on small IDX files written here, plus their table
writers and the skip-when-done logic."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from experiments import config as config_lib
from experiments import optimizer_registry, run_dir
from experiments.papers import cached_runs, label_noise, late_phase_fashion, refresh_figures


def _tiny_label_noise_flags(fashion_dir, out, *extra):
    return [
        "--data-dir", fashion_dir,
        "--validation-size", "16",
        "--train-size", "48",
        "--epochs", "2",
        "--batch-size", "16",
        "--model-kwargs", '{"hidden": [8]}',
        "--output-dir", out,
        *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_label_noise_end_to_end_skips_what_is_done_and_redoes_what_changed(tmp_path, fashion_dir):
    out = str(tmp_path / "label_noise")
    flags = _tiny_label_noise_flags(
        fashion_dir, out, "--optimizers", "sam", "--seeds", "2", "--noise-rates", "0", "0.5"
    )
    info = label_noise.main(flags)
    for name in ("table.md", "table.csv", "accuracy.png", "curves.png", "label_noise.md"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    # SGD comes first although only sam was asked for: every difference is taken to it.
    assert [r["optimizer"] for r in info["runs"][:2]] == ["sgd", "sgd"]
    assert len(info["runs"]) == 2 * 2 * 2 and all(r["trained"] for r in info["runs"])
    for noise in ("clean", "symmetric50"):
        for run in ("sgd-s0", "sgd-s1", "sam-s0", "sam-s1"):
            assert os.path.exists(os.path.join(out, "runs", noise, run, "summary.json"))
    noisy = run_dir.read_json_object(
        os.path.join(out, "runs", "symmetric50", "sam-s0", run_dir.SUMMARY_FILE)
    )
    assert noisy["label_noise"] == 0.5 and noisy["noisy_labels"] == 24
    assert len(info["table"]) == 4
    with open(os.path.join(out, "table.md")) as f:
        text = f.read()
    assert "50 % symmetric noise, best val epoch" in text and "±" in text
    with open(os.path.join(out, "label_noise.md")) as f:
        report = f.read()
    assert "## Findings" in report and "Machine:" in report and "python -m" in report

    # The same command again: every run is read back, none is trained.
    again = label_noise.main(flags)
    assert not any(r["trained"] for r in again["runs"])
    assert again["table"] == info["table"]

    # A changed rho is refused, naming the field: the finished run is never silently retrained.
    with pytest.raises(config_lib.ConfigError, match="rho: saved 0.05, now 0.2"):
        label_noise.main(
            _tiny_label_noise_flags(
                fashion_dir, out, "--optimizers", "sam", "--seeds", "1", "--noise-rates", "0.5",
                "--rho", "sam=0.2",
            )
        )  # fmt: skip


def test_is_done_needs_the_summary_and_refuses_another_config(tmp_path):
    config = config_lib.resolve(
        config_lib.TrainConfig(dataset="digits", optimizer="sam", output_dir=str(tmp_path))
    )
    assert not cached_runs.is_done(config)
    (tmp_path / "config.json").write_text(config.replace(progress=False).to_json())
    assert not cached_runs.is_done(config)  # no summary: unfinished
    (tmp_path / "summary.json").write_text(json.dumps({"completed": True}))
    # Fields that do not change the numbers are ignored; the others are not.
    assert cached_runs.is_done(config)
    assert cached_runs.is_done(config.replace(overwrite=True, log_every_steps=7))
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "device_count": 1}))
    assert cached_runs.is_done(config)  # extra keys beside the flags do not count
    # A finished run of another configuration is refused, naming the fields that differ.
    with pytest.raises(config_lib.ConfigError, match="rho: saved"):
        cached_runs.is_done(config.replace(rho=0.1))
    with pytest.raises(config_lib.ConfigError, match="label_noise: saved"):
        cached_runs.is_done(config.replace(label_noise=0.4))
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(config_lib.ConfigError, match="garbled"):
        cached_runs.is_done(config)


def _fake_results(means: dict[tuple[str, float], list[float]]) -> list[dict]:
    results = []
    for (optimizer, rate), values in means.items():
        for seed, value in enumerate(values):
            results.append(
                dict(
                    noise_rate=rate,
                    optimizer=optimizer,
                    seed=seed,
                    rho=0.05,
                    trained=True,
                    summary=dict(
                        final_test_accuracy=value,
                        test_accuracy_at_best_val=value + 0.1,
                        best_val_epoch=3,
                        final_train_accuracy=0.9,
                    ),
                    curve=[value + 0.1, value],
                )
            )
    return results


def test_table_differences_and_the_spread_rule(tmp_path):
    args = label_noise.LabelNoiseConfig(
        optimizers=("sgd", "sam", "usam"), noise_rates=(0.0, 0.4), seeds=3
    )
    results = _fake_results(
        {
            ("sgd", 0.0): [0.80, 0.81, 0.82],
            ("sam", 0.0): [0.805, 0.815, 0.825],  # +0.5 points, within the spread
            ("usam", 0.0): [0.70, 0.71, 0.72],  # -10 points, beyond it
            ("sgd", 0.4): [0.60, 0.61, 0.62],
            ("sam", 0.4): [0.70, 0.71, 0.72],  # +10 points, beyond it
            ("usam", 0.4): [0.60, 0.60, 0.60],
        }
    )
    table = label_noise.summarize(results, args)
    entry = {(e["optimizer"], e["noise_rate"]): e for e in table}
    assert entry[("sam", 0.4)]["final_diff_to_sgd"] == pytest.approx(0.10)
    assert entry[("sam", 0.4)]["final_beyond_spread"]
    assert not entry[("sam", 0.0)]["final_beyond_spread"]
    assert entry[("usam", 0.0)]["best_val_beyond_spread"]
    assert not entry[("sgd", 0.4)]["final_beyond_spread"]
    assert label_noise.significant(0.031, 0.01, 0.02)
    assert not label_noise.significant(-0.03, 0.01, 0.02)

    text = label_noise.markdown_tables(table, args)
    lines = text.splitlines()
    assert lines[0].startswith("| optimizer | rho | clean, final epoch |")
    assert len(lines) == 2 + 3
    assert "61.00 ± 1.00" in lines[2]  # SGD, 40 % noise, final epoch
    assert "71.00 ± 1.00 (+10.00 *)" in text
    assert "81.50 ± 1.00 (+0.50)" in text
    label_noise.write_table(table, args, str(tmp_path))
    assert (tmp_path / "table.csv").read_text().startswith("optimizer,label,noise_rate")
    lines = label_noise.findings(table, results, args)
    assert any("beat SGD by more than the seeds' spread: SAM" in line for line in lines)
    assert any("fall behind SGD by more than the spread: USAM" in line for line in lines)
    label_noise.plot_accuracy(table, args, str(tmp_path))
    label_noise.plot_curves(results, args, str(tmp_path))
    assert (tmp_path / "accuracy.png").exists() and (tmp_path / "curves.png").exists()


def test_label_noise_defaults_are_the_cpu_protocol_over_the_registry():
    args = label_noise.parse_args([])
    assert set(args.optimizers) >= {
        "gsam",
        "looksam",
        "friendly_sam",
        "vasso",
        *optimizer_registry.protocol_names(),
    }
    assert args.optimizers[0] == optimizer_registry.BASELINE
    assert {"usam", "stable_usam"} <= set(args.optimizers)
    base = args.base
    assert (base.dataset, base.model, base.train_size, base.epochs, args.seeds) == (
        "fashion_mnist", "mlp", 5000, 25, 3,
    )  # fmt: skip
    assert args.noise_rates == (0.0, 0.4) and args.rho == {}
    config = label_noise.run_config(args, "asam", 0.4, 2)
    assert config.output_dir.endswith(os.path.join("runs", "symmetric40", "asam-s2"))
    assert config_lib.resolve(config).rho == optimizer_registry.default_rho("asam")
    overridden = label_noise.parse_args(["--rho", "sam=0.1", "--epochs", "5"])
    assert overridden.rho == {"sam": 0.1} and overridden.base.epochs == 5
    with pytest.raises(SystemExit):
        label_noise.parse_args(["--rho", "nosuch=0.1"])
    assert {"label_noise", "late_phase_fashion", "efficiency"} <= set(refresh_figures.FIGURES)


@pytest.mark.slow
def test_late_phase_fashion_end_to_end(tmp_path, fashion_dir):
    out = str(tmp_path / "late")
    info = late_phase_fashion.main(
        [
            "--data-dir", fashion_dir,
            "--model", "mlp",
            "--model-kwargs", '{"hidden": [8]}',
            "--train-size", "48",
            "--epochs", "2",
            "--sam-epochs", "1",
            "--batch-size", "16",
            "--seeds", "1",
            "--hessian-size", "40",
            "--hessian-chunk", "16",
            "--lanczos-iters", "3",
            "--output-dir", out,
        ]
    )  # fmt: skip
    for name in ("late_phase_fashion.png", "late_phase_fashion.md", "late_phase_fashion_runs.csv"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    rows = {r["arm"]: r for r in info["runs"]}
    assert set(rows) == {"sgd", "sam", "late"}
    for row in rows.values():
        assert 0 <= row["test_acc"] <= 1
        assert np.isfinite(row["top_eigenvalue"]) and row["top_eigenvalue"] > 0
    late = cached_runs.read_metrics(os.path.join(out, "runs", "late-s0"))
    assert [m["rho"] for m in late] == [0.0, 0.05]  # SGD first, SAM for the last epoch
    with open(os.path.join(out, "late_phase_fashion.md")) as f:
        assert "## Findings" in f.read()


def test_protocol_runs_are_the_recorded_configurations():
    # The runs behind experiments/figures: each field as the protocols set it before they were
    # written as a base TrainConfig plus their own flags (the recorded tables stay valid).
    args = label_noise.parse_args([])
    configs = label_noise.run_configs(args)
    assert len(configs) == len(args.noise_rates) * len(args.optimizers) * args.seeds == 66
    recorded = config_lib.TrainConfig(
        dataset="fashion_mnist",
        validation_size=5000,
        train_size=5000,
        label_noise=0.4,
        label_noise_mode="symmetric",
        model="mlp",
        model_kwargs='{"hidden": [512, 512]}',
        optimizer="asam",
        learning_rate=0.1,
        weight_decay=5e-4,
        epochs=25,
        batch_size=128,
        flip=False,
        crop_padding=0,
        seed=2,
        checkpoint_every=25,
        keep_checkpoints=1,
        progress=False,
        output_dir=os.path.join(args.output_dir, "runs", "symmetric40", "asam-s2"),
    )
    assert config_lib.resolve(recorded) in configs

    args = late_phase_fashion.parse_args([])
    recorded = config_lib.TrainConfig(
        dataset="fashion_mnist",
        validation_size=0,
        train_size=2000,
        model="resnet8",
        model_kwargs='{"num_filters": 8}',
        optimizer="sam",
        rho=0.05,
        sam_start_epoch=9,
        learning_rate=0.1,
        lr_schedule="multistep",
        lr_milestones="6",
        weight_decay=5e-4,
        epochs=12,
        batch_size=128,
        crop_padding=0,
        flip=False,
        seed=1,
        eval_every=2,
        checkpoint_every=12,
        keep_checkpoints=1,
        progress=False,
        output_dir=os.path.join(args.output_dir, "runs", "late-s1"),
    )
    assert config_lib.resolve(recorded) in late_phase_fashion.run_configs(args)


def test_protocol_flags_come_from_the_training_generator(capsys):
    # Any training flag the protocol does not set itself; the old --noise-mode still works.
    args = label_noise.parse_args(["--momentum", "0.5", "--noise-mode", "asymmetric"])
    assert args.base.momentum == 0.5 and args.base.label_noise_mode == "asymmetric"
    assert capsys.readouterr().err.count("--noise-mode is deprecated") == 1
    for flags in (["--stop-after-epoch", "1"], ["--checkpoint-every", "1"]):  # set per run
        with pytest.raises(SystemExit):
            label_noise.parse_args(flags)
    with pytest.raises(SystemExit):
        late_phase_fashion.parse_args(["--sam-start-epoch", "3"])
