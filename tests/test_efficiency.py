"""The harness's cheaper SAM (steps chosen by a rho schedule, m-sharpness, the counted cost) and
the efficiency experiment end to end at a tiny size."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from test_papers_harness import _tiny_label_noise_flags

import sam_optax
from experiments import config as config_lib
from experiments import optimizer_registry, optimizers, trainer
from experiments.papers import efficiency


def fashion_config(fashion_dir, **overrides):
    values = dict(
        dataset="fashion_mnist",
        data_dir=fashion_dir,
        validation_size=16,
        train_size=48,
        epochs=2,
        batch_size=16,
        model="mlp",
        model_kwargs='{"hidden": [8]}',
        progress=False,
        output_dir="unused",
    )
    return config_lib.resolve(config_lib.TrainConfig(**{**values, **overrides}))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(optimizer="sgd", sam_every=2), "--sam-every needs a SAM optimizer"),
        (dict(optimizer="sgd", sam_micro_batch=4), "--sam-micro-batch needs a SAM optimizer"),
        (dict(optimizer="sam", sam_every=0), "--sam-every must be >= 1"),
        (dict(optimizer="sam", sam_probability=0.0), "--sam-probability must lie in (0, 1]"),
        (dict(optimizer="sam", sam_last_fraction=1.5), "--sam-last-fraction must lie in [0, 1]"),
        (
            dict(optimizer="sam", sam_last_fraction=0.5, sam_start_epoch=1),
            "--sam-last-fraction and --sam-start-epoch exclude each other",
        ),
        (dict(optimizer="gsam", sam_micro_batch=4), "--sam-micro-batch needs a variant of"),
        (dict(optimizer="sam", sam_micro_batch=-1), "--sam-micro-batch must be >= 0"),
    ],
)
def test_bad_schedule_flags_are_one_line_errors(overrides, message):
    config = config_lib.TrainConfig(dataset="digits", **overrides)
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.resolve(config)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "overrides, ascending",
    [
        (dict(), 10),
        (dict(sam_every=3), 4),  # steps 0, 3, 6, 9
        (dict(sam_last_fraction=0.3), 3),  # steps 7, 8, 9
        (dict(sam_start_epoch=1, sam_every=2), 3),  # steps 5, 7, 9
    ],
)
def test_ascending_steps_are_the_closed_form(overrides, ascending):
    config = config_lib.resolve(
        config_lib.TrainConfig(dataset="digits", optimizer="sam", epochs=2, **overrides)
    )
    assert optimizers.ascending_steps(config, steps_per_epoch=5).sum() == ascending


def test_randomized_steps_are_the_library_schedule():
    config = config_lib.resolve(
        config_lib.TrainConfig(dataset="digits", optimizer="sam", sam_probability=0.3, seed=4)
    )
    expected = sam_optax.ascent_steps(
        sam_optax.randomized_rho_schedule(0.05, 0.3, seed=4), config.epochs * 7
    )
    assert optimizers.ascending_steps(config, steps_per_epoch=7).sum() == expected


@pytest.mark.parametrize(
    "name, options, expected",
    [
        ("sgd", {}, 10),
        ("sam", dict(ascent_steps=1), 20),
        ("sam", dict(ascent_steps=3), 40),
        ("looksam", dict(looksam_k=4), 13),  # steps 0, 4, 8
    ],
)
def test_gradient_evaluations_per_variant(name, options, expected):
    config = config_lib.resolve(config_lib.TrainConfig(dataset="digits", optimizer=name, **options))
    ascends = np.full(10, name != "sgd")
    assert optimizer_registry.gradient_evaluations(name, ascends, config, None) == expected


def test_micro_batch_of_the_whole_batch_is_sam_and_smaller_ones_differ(fashion_dir):
    dataset = trainer.load_dataset(fashion_config(fashion_dir))

    def params_after(**overrides):
        experiment = trainer.create_experiment(
            fashion_config(fashion_dir, optimizer="sam", num_devices=1, **overrides), dataset
        )
        state, split = experiment.state, experiment.splits["train"]
        for _ in range(experiment.steps_per_epoch):
            state, _ = experiment.train_step(
                state, split.images, split.labels, experiment.epoch_indices(0)
            )
        return jax.device_get(state.params)

    sam, whole, small = (
        params_after(),
        params_after(sam_micro_batch=16),
        params_after(sam_micro_batch=4),
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), sam, whole)
    assert not np.allclose(jax.tree.leaves(sam)[1], jax.tree.leaves(small)[1])
    with pytest.raises(config_lib.ConfigError, match="--sam-micro-batch 5 does not divide"):
        trainer.create_experiment(
            fashion_config(fashion_dir, optimizer="sam", num_devices=1, sam_micro_batch=5), dataset
        )


def test_summary_counts_the_runs_gradient_evaluations(tmp_path, fashion_dir):
    config = fashion_config(
        fashion_dir, optimizer="sam", sam_every=2, output_dir=str(tmp_path / "run")
    )
    summary = trainer.train_and_evaluate(config)
    # 48 training images, batch 16: 3 steps per epoch, 6 in all; steps 0, 2 and 4 ascend.
    assert summary["steps"] == 6 and summary["gradient_evaluations"] == 9
    assert summary["gradient_evaluations_vs_sgd"] == 1.5
    with open(tmp_path / "run" / "summary.json") as f:
        assert json.load(f)["gradient_evaluations"] == 9


def test_pareto_front():
    points = [(1.0, 80.0), (2.0, 85.0), (1.5, 79.0), (1.2, 84.0), (2.0, 84.0)]
    assert efficiency.pareto_front(points) == [0, 3, 1]


@pytest.mark.slow
def test_efficiency_end_to_end(tmp_path, fashion_dir):
    out = str(tmp_path / "efficiency")
    flags = _tiny_label_noise_flags(
        fashion_dir, out, "--seeds", "2", "--noise-rates", "0", "0.5", "--num-devices", "1"
    )
    info = efficiency.main([*flags, "--methods", "every2", "late50", "m16", "head1"])
    # SGD and SAM come first although not asked for: the shares are taken between them.
    methods = [r["method"] for r in info["runs"]]
    assert methods[:4] == ["sgd", "sgd", "sam", "sam"] and len(methods) == 2 * 6 * 2
    # head SAM's rho is one of its grid's, chosen on validation; the sharpness is measured.
    head = next(r for r in info["runs"] if r["method"] == "head1")
    assert head["rho"] in (0.01, 0.03, 0.1, 0.2) and len(head["grid"]) == 4
    assert all("top_eigenvalue" in r for r in info["runs"] if r["method"] in ("sgd", "late50"))
    for name in (
        "efficiency.md",
        "table.csv",
        "efficiency_clean.png",
        "efficiency_symmetric50.png",
    ):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    costs = {e["method"]: e["gradient_evaluations_vs_sgd"] for e in info["table"]}
    # 48 training images, batch 16, 2 epochs: 6 steps; late50 ascends on the last 3.
    assert costs == {
        "sgd": 1.0, "sam": 2.0, "every2": 1.5, "late50": 1.5, "m16": 2.0, "head1": 1.0
    }  # fmt: skip
    with open(os.path.join(out, "efficiency.md")) as f:
        report = f.read()
    assert "Target (90 % of SAM's final-epoch gain" in report and "Machine:" in report
    assert "Chosen on the validation split" in report
    assert "## Sharpness of the final checkpoints" in report
    again = efficiency.main([*flags, "--methods", "every2", "late50", "m16", "head1"])
    assert not any(r["trained"] for r in again["runs"])


@pytest.mark.parametrize(
    "optimizer, overrides",
    [
        ("ae_sam", {}),
        ("esam", {}),
        ("momentum_sam", {}),
        ("sam", dict(sam_probability=0.5)),
    ],
)
def test_stopped_and_resumed_runs_match_the_straight_run(
    tmp_path, fashion_dir, optimizer, overrides
):
    def run(name, **extra):
        config = fashion_config(
            fashion_dir,
            optimizer=optimizer,
            num_devices=2,
            output_dir=str(tmp_path / name),
            **overrides,
            **extra,
        )
        return trainer.train_and_evaluate(config)

    straight = run("straight")
    assert run("resumed", stop_after_epoch=1)["completed"] is False
    resumed = run("resumed", resume=True)
    for key in ("final_test_accuracy", "final_train_loss", "gradient_evaluations"):
        assert resumed[key] == straight[key], key
