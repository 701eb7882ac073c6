"""Tests of the sweep: the protocol's logic with a fake trainer, then a tiny real sweep."""

from __future__ import annotations

import csv
import json
import os

import pytest

from experiments import config as config_lib
from experiments import optimizer_registry
from experiments import sweep as sweep_lib


def fake_train(calls: list):
    """A stand-in for trainer.train_and_evaluate: deterministic accuracies, a run's files."""

    def train(config: config_lib.TrainConfig):
        config = config_lib.resolve(config)  # what trainer.train_and_evaluate does first
        calls.append(config)
        # Best SGD grid point: lr 0.05, wd 5e-4. Best rho: 0.1 (0.5 for ASAM). Seeds add noise.
        val = 0.8 - abs(config.learning_rate - 0.05) - abs(config.weight_decay - 5e-4) * 10
        if config.optimizer != "sgd":
            best_rho = 0.5 if optimizer_registry.get(config.optimizer).adaptive_rho else 0.1
            val += 0.05 - abs(config.rho - best_rho) * 0.01
        val += 0.001 * config.seed
        test = val - 0.01
        os.makedirs(config.output_dir, exist_ok=True)
        rows = [
            {"epoch": e, "train_loss": 1.0 / e, "val_accuracy": val * e / 2, "test_accuracy": test}
            for e in (1, 2)
        ]
        with open(os.path.join(config.output_dir, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        summary = {"final_val_accuracy": val, "best_val_accuracy": val, "final_test_accuracy": test}
        with open(os.path.join(config.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f)
        return summary

    return train


def test_protocol_selects_on_validation_and_reports_seeds(tmp_path):
    out = str(tmp_path / "sweep")
    sweep = sweep_lib.parse_args(
        ["--output-dir", out, "--dataset=cifar10", "--model=resnet18", "--epochs=2"]
        + ["--sam-start-epoch=1"]  # late-phase SAM for the variants; plain SGD for the baseline
    )
    assert sweep.learning_rates == (0.01, 0.05, 0.1) and sweep.seeds == 3
    assert sweep.base.dataset == "cifar10" and sweep.base.epochs == 2

    calls = []
    table = sweep_lib.run_sweep(sweep, train_fn=fake_train(calls))
    # 9 grid runs, 3 rhos x 6 variants, then 2 new seeds for each of the 7 optimizers.
    assert len(calls) == 9 + 18 + 14
    assert [row["optimizer"] for row in table] == ["sgd", *optimizer_registry.protocol_names()]
    for row in table:
        assert (row["learning_rate"], row["weight_decay"], row["seeds"]) == (0.05, 5e-4, 3)
        if row["optimizer"] != "sgd":
            assert row["rho"] == (0.5 if row["optimizer"] in ("asam", "stable_asam") else 0.1)
        assert row["test_accuracy_std"] == pytest.approx(0.1)  # seeds 0, 1, 2: 0.1% apart
    # Every run saw the same swept knobs it was asked for, with the base flags kept.
    assert all(c.dataset == "cifar10" and c.model == "resnet18" and c.resume for c in calls)
    assert {c.sam_start_epoch for c in calls if c.optimizer == "sgd"} == {0}
    assert {c.sam_start_epoch for c in calls if c.optimizer != "sgd"} == {1}

    markdown = (tmp_path / "sweep" / "table.md").read_text()
    assert "| stable_usam | 0.1 | 0.05 | 0.0005 |" in markdown and "±" in markdown
    with open(tmp_path / "sweep" / "table.csv") as f:
        assert len(list(csv.DictReader(f))) == 7
    with open(tmp_path / "sweep" / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 9 + 18 + 21
    assert (tmp_path / "sweep" / "curves.png").stat().st_size > 0

    # Started again, the sweep trains nothing and writes the same table.
    calls.clear()
    assert sweep_lib.run_sweep(sweep, train_fn=fake_train(calls)) == table
    assert calls == []


def test_select_best_takes_the_first_of_ties_and_needs_validation():
    records = [
        {"final_val_accuracy": 0.5, "output_dir": "a"},
        {"final_val_accuracy": 0.7, "output_dir": "b"},
        {"final_val_accuracy": 0.7, "output_dir": "c"},
    ]
    assert sweep_lib.select_best(records, "final_val_accuracy")["output_dir"] == "b"
    with pytest.raises(ValueError, match="validation"):
        sweep_lib.select_best(
            [{"final_val_accuracy": None, "output_dir": "a"}], "final_val_accuracy"
        )


def test_sweep_help_and_bad_grids(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep_lib.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--lrs" in text and "--asam-rhos" in text and "--batch-size" in text
    assert "--learning-rate" not in text  # swept, not a flag
    with pytest.raises(SystemExit):
        sweep_lib.parse_args(["--output-dir", "x", "--optimizers", "sam,adam"])
    assert "unknown SAM variant" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_sweep_end_to_end_on_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    out = tmp_path / "sweep"
    (tmp_path / "tfds").mkdir()  # a --data-dir must exist; mock_data stands in for its copy
    argv = [
        f"--output-dir={out}",
        "--dataset=cifar10",
        f"--data-dir={tmp_path / 'tfds'}",
        "--validation-size=8",
        '--model-kwargs={"features": [4]}',
        "--epochs=1",
        "--batch-size=16",
        "--eval-batch-size=16",
        "--num-devices=1",
        "--no-progress",
        "--lrs=0.1",
        "--wds=5e-4",
        "--optimizers=stable_sam",
        "--rhos=0.1",
        "--seeds=2",
    ]
    with tfds.testing.mock_data(num_examples=40):
        table = sweep_lib.main(argv)
    assert [row["optimizer"] for row in table] == ["sgd", "stable_sam"]
    assert all(row["seeds"] == 2 for row in table)
    runs = sorted(os.listdir(out / "runs"))
    assert runs == [
        "sgd-lr0.1-wd0.0005-s0",
        "sgd-lr0.1-wd0.0005-s1",
        "stable_sam-lr0.1-wd0.0005-rho0.1-s0",
        "stable_sam-lr0.1-wd0.0005-rho0.1-s1",
    ]
    for run in runs:
        with open(out / "runs" / run / "summary.json") as f:
            summary = json.load(f)
        assert summary["completed"] and 0 <= summary["final_test_accuracy"] <= 1
    markdown = (out / "table.md").read_text()
    assert "| sgd | - | 0.1 | 0.0005 |" in markdown and "| stable_sam | 0.1 |" in markdown
    assert (out / "curves.png").stat().st_size > 0
