"""End-to-end tests of the training pipeline on CPU (8 simulated devices, see conftest.py).

Compilation dominates on CPU, so the model is a one-layer CNN on tfds' mock CIFAR-10 (32x32x3,
40 images: 32 train, 8 validation, 40 test) and each test runs only a few steps.
"""

from __future__ import annotations

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import config as config_lib
from experiments import data, optimizer_registry, optimizers, parallel, run_dir, steps, trainer
from experiments import train as train_cli

tfds = pytest.importorskip("tensorflow_datasets")

NUM_MOCK_EXAMPLES = 40
TINY_MODEL = '{"features": [4]}'


@pytest.fixture(scope="module")
def mock_data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def dataset(mock_data_dir):
    with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES):
        return data.load_dataset("cifar10", data_dir=mock_data_dir, validation_size=8)


def tiny_config(**overrides) -> config_lib.TrainConfig:
    values = dict(
        dataset="cifar10",
        validation_size=8,
        model="small_cnn",
        model_kwargs=TINY_MODEL,
        batch_size=16,
        eval_batch_size=16,
        epochs=2,
        crop_padding=0,
        flip=False,
        progress=False,
        output_dir="unused",
    )
    values.update(overrides)
    return config_lib.resolve(config_lib.TrainConfig(**values))


def run_steps(experiment: trainer.Experiment, num_steps: int):
    state = experiment.state
    split = experiment.splits["train"]
    metrics = None
    for step in range(num_steps):
        indices = experiment.epoch_indices(step // experiment.steps_per_epoch)
        program = experiment.train_step_of(experiment.program_at(step))
        state, metrics = program(state, split.images, split.labels, indices)
    return state, jax.device_get(metrics)


def assert_trees_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------------------------
# Train and eval steps.
# --------------------------------------------------------------------------------------------


# Every optimizer on 8 devices; the one-device mesh for SGD and StableSAM (a mesh of one is the
# same code path for every variant).
@pytest.mark.parametrize(
    "optimizer, num_devices",
    [(name, 8) for name in config_lib.OPTIMIZERS] + [("sgd", 1), ("stable_sam", 1)],
)
def test_every_optimizer_trains_data_parallel(dataset, optimizer, num_devices):
    config = tiny_config(optimizer=optimizer, num_devices=num_devices)
    if optimizer != "sgd" and optimizer_registry.get(optimizer).gradient != "grad_fn":
        config = config.replace(**TINY_MLP)  # the per-example ascents need a model without BN
    experiment = trainer.create_experiment(config, dataset)
    assert experiment.mesh.devices.size == num_devices
    initial = jax.device_get(experiment.state.params)
    state, metrics = run_steps(experiment, 3)  # crosses into the second epoch
    assert int(state.step) == 3
    assert np.isfinite(metrics["loss"]) and 0 <= metrics["accuracy"] <= 1
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), initial, state.params)
    assert all(jax.tree.leaves(changed))
    # Parameters, optimizer state and BatchNorm statistics are replicated on every device.
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding.is_fully_replicated
        assert len(leaf.sharding.device_set) == num_devices


TINY_MLP = dict(model="mlp", model_kwargs='{"hidden": [8, 8]}')


def test_exact_per_example_sam_is_sam_with_micro_batches_of_one(dataset):
    """Two passes (shifted pre-activations) against one ascent per example in a scan."""
    states = []
    for optimizer in ("sam", "per_example_sam"):
        config = tiny_config(optimizer=optimizer, sam_micro_batch=1, num_devices=8, **TINY_MLP)
        states.append(run_steps(trainer.create_experiment(config, dataset), 3)[0])
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_head_sam_at_rho_zero_is_sgd(dataset):
    states = [
        run_steps(trainer.create_experiment(tiny_config(**TINY_MLP, **flags), dataset), 3)[0]
        for flags in (dict(optimizer="sgd"), dict(optimizer="head_sam2", rho=0.0))
    ]
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_per_example_methods_refuse_batchnorm(dataset):
    with pytest.raises(config_lib.ConfigError, match="without BatchNorm"):
        trainer.create_experiment(tiny_config(optimizer="head_sam"), dataset)


def test_raw_knobs_bfloat16_and_synchronized_batchnorm(dataset):
    # Everything off the default path in one compilation: a synchronized two-step ASAM ascent in
    # the L-inf ball, StableSAM, bf16 compute, label smoothing and all augmentations (BatchNorm's
    # running statistics are averaged over the devices after every step).
    config = tiny_config(
        optimizer="stable_asam",
        sync_ascent=True,
        ascent_steps=2,
        ascent_norm=float("inf"),
        dtype="bfloat16",
        label_smoothing=0.1,
        crop_padding=2,
        flip=True,
        cutout=4,
        num_devices=8,
    )
    experiment = trainer.create_experiment(config, dataset)
    state, metrics = run_steps(experiment, 2)
    assert np.isfinite(metrics["loss"])
    # Parameters and optimizer state stay float32 under bf16 compute.
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    float_leaves = [
        x for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    assert {leaf.dtype for leaf in float_leaves} == {jnp.dtype(jnp.float32)}


def test_one_device_step_matches_unsharded_step(dataset):
    # The shard_map wrapper on one device is exactly the plain per-device step, and the BatchNorm
    # statistics come from the first pass only (at the unperturbed weights; a large rho makes
    # the second pass's statistics clearly different).
    config = tiny_config(optimizer="stable_sam", rho=5.0, num_devices=1)
    experiment = trainer.create_experiment(config, dataset)
    reference_tx = optimizers.build_optimizer(config, experiment.steps_per_epoch, axis_name=None)
    reference_step = jax.jit(
        steps.make_train_step(
            experiment.model,
            reference_tx,
            steps.Preprocess(mean=dataset.mean, std=dataset.std, crop_padding=0, flip=False),
            num_classes=dataset.num_classes,
            axis_name=None,
        )
    )
    indices = data.train_batch_indices(0, 0, len(dataset.train_labels), 16)[0]
    key = jax.random.fold_in(steps.step_key(config.seed, 0), 0)
    state = jax.device_get(experiment.state)
    want, want_metrics = reference_step(
        state, dataset.train_images[indices], dataset.train_labels[indices], key
    )
    got, got_metrics = run_steps(experiment, 1)
    np.testing.assert_allclose(got_metrics["loss"], want_metrics["loss"], rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        jax.device_get(got.params),
        jax.device_get(want.params),
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        jax.device_get(got.batch_stats),
        jax.device_get(want.batch_stats),
    )
    _, first_pass = experiment.model.apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        data.normalize(dataset.train_images[indices], dataset.mean, dataset.std),
        train=True,
        mutable=["batch_stats"],
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
        jax.device_get(got.batch_stats),
        jax.device_get(first_pass["batch_stats"]),
    )


def test_late_phase_sam_is_exactly_sgd_before_its_start(dataset):
    sgd = trainer.create_experiment(tiny_config(optimizer="sgd", num_devices=8), dataset)
    late = trainer.create_experiment(
        tiny_config(optimizer="sam", sam_start_epoch=1, num_devices=8), dataset
    )
    per_epoch = late.steps_per_epoch
    assert late.rho_at(per_epoch - 1) == 0.0 and late.rho_at(per_epoch) == 0.05
    sgd_state, _ = run_steps(sgd, per_epoch)
    late_state, _ = run_steps(late, per_epoch)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        jax.device_get(sgd_state.params),
        jax.device_get(late_state.params),
    )
    # One step after the start, SAM's second pass changes the trajectory.
    split = late.splits["train"]
    indices = late.epoch_indices(1)
    sgd_next, _ = sgd.train_step(sgd_state, sgd.splits["train"].images, split.labels, indices)
    late_next, _ = late.train_step(late_state, split.images, split.labels, indices)
    assert not np.allclose(
        jax.device_get(sgd_next.params["classifier"]["kernel"]),
        jax.device_get(late_next.params["classifier"]["kernel"]),
    )


def scheduled_train_step(experiment: trainer.Experiment, dataset: data.Dataset):
    """The one program of `experiment`'s rho schedule, its skipped passes behind a lax.cond."""
    config = experiment.config
    tx = optimizers.build_optimizer(config, experiment.steps_per_epoch, axis_name=steps.AXIS)
    step_fn = steps.make_train_step(
        experiment.model,
        tx,
        trainer._preprocess(config, dataset, jnp.float32),
        num_classes=10,
        axis_name=steps.AXIS,
    )
    return parallel.shard_train_step(
        step_fn, experiment.mesh, seed=config.seed, steps_per_epoch=experiment.steps_per_epoch
    )


@pytest.mark.parametrize(
    "schedule",
    [
        dict(sam_start_epoch=1),
        dict(sam_every=3),
        dict(sam_probability=0.5),
        dict(sam_last_fraction=0.3),
    ],
)
def test_rho_schedules_switch_between_two_programs_on_the_host(dataset, schedule):
    config = tiny_config(optimizer="stable_sam", num_devices=8, epochs=2, **schedule)
    switched = trainer.create_experiment(config_lib.resolve(config), dataset)
    num_steps = 2 * switched.steps_per_epoch
    expected = optimizers.ascending_steps(switched.config, switched.steps_per_epoch)
    assert [switched.program_at(s) == "main" for s in range(num_steps)] == list(expected)
    assert 0 < expected.sum() < num_steps
    # Neither program has a conditional: the host decided.
    split, indices = switched.splits["train"], switched.epoch_indices(0)
    args = (switched.state, split.images, split.labels, indices)
    for program in ("main", "without_ascent"):
        assert "stablehlo.case" not in switched.train_step_of(program).lower(*args).as_text()
    # Same numbers as the one program whose schedule decides inside the step.
    scheduled = scheduled_train_step(switched, dataset)
    assert "stablehlo.case" in scheduled.lower(*args).as_text()
    state = jax.tree.map(jnp.copy, switched.state)  # the steps donate their state
    for step in range(num_steps):
        state, _ = scheduled(
            state,
            split.images,
            split.labels,
            switched.epoch_indices(step // switched.steps_per_epoch),
        )
    got, _ = run_steps(switched, num_steps)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        jax.device_get(got.params),
        jax.device_get(state.params),
    )


def test_evaluation_counts_every_example_exactly_once(dataset):
    # 40 test images, batches of 16 on 8 devices: the last batch is half padding.
    experiment = trainer.create_experiment(tiny_config(num_devices=8), dataset)
    result = trainer.evaluate(experiment, experiment.state, "test")
    assert result["count"] == len(dataset.test_labels) == 40

    state = jax.device_get(experiment.state)
    logits = experiment.model.apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        data.normalize(dataset.test_images, dataset.mean, dataset.std),
        train=False,
    )
    labels = dataset.test_labels
    accuracy = float(np.mean(np.argmax(logits, -1) == labels))
    loss = float(np.mean(steps.cross_entropy(logits, labels, dataset.num_classes)))
    assert result["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert result["loss"] == pytest.approx(loss, rel=1e-5)


def test_batch_size_must_divide_the_device_count(dataset):
    with pytest.raises(ValueError, match="does not divide by the 8 devices"):
        trainer.create_experiment(tiny_config(batch_size=12, num_devices=8), dataset)


# --------------------------------------------------------------------------------------------
# The training loop: output files, checkpoints, exact resume.
# --------------------------------------------------------------------------------------------


def _restore_final_params(output_dir: str, epoch: int):
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.path.join(output_dir, run_dir.CHECKPOINT_DIR, str(epoch)))
    restored = ocp.StandardCheckpointer().restore(os.path.join(path, "default"))
    return restored["params"], restored["opt_state"], restored["batch_stats"]


def _numbers(rows):
    timing = {"epoch_time_s", "train_images_per_s", "compile_time_s"}
    return [{k: v for k, v in row.items() if k not in timing} for row in rows]


@pytest.mark.slow
def test_interrupted_run_resumes_bit_identically(dataset, mock_data_dir, tmp_path, capsys):
    # Late-phase StableSAM on 8 devices: epoch 1 SGD, epoch 2 SSAM; 2 steps per epoch.
    common = dict(
        optimizer="stable_sam",
        sam_start_epoch=1,
        num_devices=8,
        crop_padding=2,
        flip=True,
        cutout=4,
    )
    straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
    summary = trainer.train_and_evaluate(
        tiny_config(output_dir=straight_dir, **common), dataset=dataset
    )
    assert summary["completed"] and summary["epochs"] == 2 and summary["num_devices"] == 8

    stopped = trainer.train_and_evaluate(
        tiny_config(output_dir=resumed_dir, stop_after_epoch=1, **common), dataset=dataset
    )
    assert stopped == {"completed": False, "epoch": 1, "output_dir": resumed_dir}
    assert not os.path.exists(os.path.join(resumed_dir, run_dir.SUMMARY_FILE))

    # Resume through the command line, which loads the (mock) data itself.
    argv = [
        "--dataset=cifar10",
        f"--data-dir={mock_data_dir}",
        "--validation-size=8",
        f"--model-kwargs={TINY_MODEL}",
        "--batch-size=16",
        "--eval-batch-size=16",
        "--epochs=2",
        "--optimizer=stable_sam",
        "--sam-start-epoch=1",
        "--num-devices=8",
        "--crop-padding=2",
        "--flip",
        "--cutout=4",
        "--no-progress",
        f"--output-dir={resumed_dir}",
        "--resume",
    ]
    capsys.readouterr()
    with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES):
        resumed = train_cli.main(argv)
    out = capsys.readouterr().out
    assert "Resumed from the checkpoint of epoch 1" in out
    assert "final test accuracy" in out and "parameters" in out

    # Bit-identical parameters, optimizer state and BatchNorm statistics.
    assert_trees_equal(
        _restore_final_params(straight_dir, 2), _restore_final_params(resumed_dir, 2)
    )
    for key in ("final_test_accuracy", "final_val_accuracy", "final_train_loss", "num_params"):
        assert resumed[key] == summary[key]

    # Metrics files: one row per epoch, the same numbers, rho 0 then rho.
    with open(os.path.join(straight_dir, run_dir.METRICS_JSONL)) as f:
        straight_rows = [json.loads(line) for line in f]
    with open(os.path.join(resumed_dir, run_dir.METRICS_JSONL)) as f:
        resumed_rows = [json.loads(line) for line in f]
    assert _numbers(straight_rows) == _numbers(resumed_rows)
    assert [r["epoch"] for r in resumed_rows] == [1, 2]
    assert [r["rho"] for r in resumed_rows] == [0.0, 0.05]
    with open(os.path.join(resumed_dir, run_dir.METRICS_CSV)) as f:
        csv_rows = list(csv.DictReader(f))
    assert [float(r["test_accuracy"]) for r in csv_rows] == [
        r["test_accuracy"] for r in resumed_rows
    ]
    with open(os.path.join(resumed_dir, run_dir.SUMMARY_FILE)) as f:
        saved_summary = json.load(f)
    assert saved_summary["final_test_accuracy"] == resumed_rows[-1]["test_accuracy"]
    with open(os.path.join(resumed_dir, run_dir.CONFIG_FILE)) as f:
        assert json.load(f)["optimizer"] == "stable_sam"
    # keep_checkpoints=2: both epochs are kept.
    assert sorted(os.listdir(os.path.join(resumed_dir, run_dir.CHECKPOINT_DIR))) == ["1", "2"]


def test_refuses_to_reuse_a_non_empty_output_dir(tmp_path, dataset):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "something").write_text("an earlier run")
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        trainer.train_and_evaluate(tiny_config(output_dir=str(output_dir)), dataset=dataset)
    assert (output_dir / "something").exists()

    # --resume refuses a run started with different numbers.
    (output_dir / run_dir.CONFIG_FILE).write_text(tiny_config(optimizer="sam").to_json())
    resumed = tiny_config(output_dir=str(output_dir), optimizer="stable_sam", resume=True)
    with pytest.raises(ValueError, match="optimizer: saved 'sam', now 'stable_sam'"):
        with run_dir.OutputDir(resumed) as out:
            out.check()

    # --overwrite deletes a run of this program only, not a folder holding other files.
    with pytest.raises(ValueError, match="not a run of this program"):
        with run_dir.OutputDir(tiny_config(output_dir=str(output_dir), overwrite=True)) as out:
            out.check()
    assert (output_dir / "something").exists() and not (output_dir / run_dir.LOCK_FILE).exists()


def test_cli_reports_bad_configuration_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--optimizer=sgd", "--sam-start-epoch=2", f"--output-dir={tmp_path / 'x'}"])
    assert exit_info.value.code == 2
    assert "--sam-start-epoch needs a SAM optimizer" in capsys.readouterr().err


def test_training_subset_and_label_noise_reach_the_loaded_data(mock_data_dir):
    config = tiny_config(data_dir=mock_data_dir, train_size=16, label_noise=0.25)
    with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES):
        noisy = trainer.load_dataset(config)
        clean = trainer.load_dataset(config.replace(label_noise=0.0))
    assert len(noisy.train_labels) == 16 and noisy.noisy_labels == 4
    assert int(np.sum(noisy.train_labels != clean.train_labels)) == 4
    np.testing.assert_array_equal(noisy.val_labels, clean.val_labels)
    np.testing.assert_array_equal(noisy.test_labels, clean.test_labels)
