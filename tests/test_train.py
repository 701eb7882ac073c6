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
import optax
import pytest

import sam_optax
from experiments import config as config_lib
from experiments import input_pipeline, train_lib
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
        return input_pipeline.load_dataset("cifar10", data_dir=mock_data_dir, validation_size=8)


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


def run_steps(trainer: train_lib.Trainer, num_steps: int):
    state = trainer.state
    split = trainer.splits["train"]
    metrics = None
    for step in range(num_steps):
        indices = trainer.epoch_indices(step // trainer.steps_per_epoch)
        state, metrics = trainer.train_step(state, split.images, split.labels, indices)
    return state, jax.device_get(metrics)


def assert_trees_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------------------------
# Configuration and command line.
# --------------------------------------------------------------------------------------------


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for field in config_lib.TrainConfig.__dataclass_fields__:
        assert "--" + field.replace("_", "-") in text
    # The notation trap of the StableSAM paper is spelled out.
    assert "ssam-usam" in text and "paper" in text


def test_resolve_fills_dataset_and_optimizer_defaults():
    default = config_lib.resolve(config_lib.TrainConfig())
    assert (default.dataset, default.model, default.optimizer) == ("mnist5k", "small_cnn", "ssam")
    assert default.epochs == 5 and default.crop_padding == 0 and default.output_dir
    cifar = config_lib.resolve(config_lib.TrainConfig(dataset="cifar10", optimizer="ssam"))
    assert cifar.epochs == 200 and cifar.validation_size == 5000 and cifar.rho == 0.05
    assert cifar.crop_padding == 4
    fashion = config_lib.resolve(config_lib.TrainConfig(dataset="fashion_mnist"))
    assert (fashion.batch_size, fashion.validation_size, fashion.crop_padding) == (128, 5000, 0)
    assert (fashion.label_noise, fashion.label_noise_mode, fashion.train_size) == (
        0.0,
        "symmetric",
        0,
    )
    assert config_lib.resolve(config_lib.TrainConfig(crop_padding=3)).crop_padding == 3
    assert config_lib.resolve(config_lib.TrainConfig(optimizer="asam")).rho == 0.5
    assert config_lib.resolve(config_lib.TrainConfig(optimizer="sam", rho=0.2)).rho == 0.2


def test_config_data_sets_and_noise_modes_match_the_input_pipeline():
    assert set(config_lib.DATASETS) == set(input_pipeline.DATASETS)
    assert set(config_lib.DATASETS) == set(config_lib.DATASET_DEFAULTS)
    assert config_lib.LABEL_NOISE_MODES == input_pipeline.LABEL_NOISE_MODES


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(optimizer="sgd", sam_start_epoch=2), "--sam-start-epoch needs a SAM optimizer"),
        (dict(optimizer="sam", sam_start_epoch=9, epochs=5), "--sam-start-epoch must lie"),
        (dict(resume=True, overwrite=True), "exclude each other"),
        (dict(lr_schedule="multistep", lr_milestones="80;120"), "--lr-milestones"),
        (dict(model_kwargs="[1]"), "--model-kwargs"),
        (dict(label_noise=1.0), "--label-noise must be a fraction in"),
        (dict(label_noise=-0.1), "--label-noise must be a fraction in"),
        (dict(label_noise=float("nan")), "--label-noise must be a fraction in"),
        (dict(label_noise_mode="pairs"), "--label-noise-mode must be one of"),
        (dict(train_size=-1), "--train-size must be >= 0"),
        (dict(crop_padding=-1), "--crop-padding must be >= 0"),
    ],
)
def test_resolve_rejects_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        config_lib.resolve(config_lib.TrainConfig(**changes))


@pytest.mark.parametrize("name", [n for n in config_lib.OPTIMIZERS if n != "sgd"])
def test_optimizer_names_are_the_right_sam_variants(name):
    # Without a device axis, compare one update with sam_optax's own transformation.
    config = tiny_config(optimizer=name)
    knobs = config_lib.OPTIMIZER_KNOBS[name]
    tx = train_lib.build_optimizer(config, steps_per_epoch=2, axis_name=None)
    sgd = optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(train_lib.learning_rate_schedule(config, 2), momentum=0.9),
    )
    reference = optax.chain(sam_optax.sam(config.rho, **knobs), sgd)
    params = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([0.3])}

    def loss(p):
        return jnp.sum(jnp.sin(p["w"]) ** 2) + jnp.sum(p["w"] ** 3) * p["b"][0]

    grad_fn = jax.grad(loss)
    grads = grad_fn(params)
    got, _ = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
    want, _ = reference.update(grads, reference.init(params), params, grad_fn=grad_fn)
    jax.tree.map(np.testing.assert_allclose, got, want)
    sgd_update, _ = sgd.update(grads, sgd.init(params), params)
    assert not np.allclose(got["w"], sgd_update["w"])  # the ascent changed the gradient


def test_learning_rate_schedules():
    cosine = train_lib.learning_rate_schedule(tiny_config(epochs=4), steps_per_epoch=10)
    assert float(cosine(0)) == pytest.approx(0.1) and float(cosine(40)) == pytest.approx(0.0)
    assert float(cosine(20)) == pytest.approx(0.05)
    multistep = train_lib.learning_rate_schedule(
        tiny_config(epochs=4, lr_schedule="multistep", lr_milestones="1,3"), steps_per_epoch=10
    )
    assert [float(multistep(s)) for s in (9, 10, 29, 30)] == pytest.approx([0.1, 0.01, 0.01, 0.001])
    warm = train_lib.learning_rate_schedule(tiny_config(warmup_epochs=1), steps_per_epoch=10)
    assert float(warm(0)) == 0.0 and float(warm(10)) == pytest.approx(0.1)


# --------------------------------------------------------------------------------------------
# Train and eval steps.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_devices", [1, 8])
@pytest.mark.parametrize("optimizer", config_lib.OPTIMIZERS)
def test_every_optimizer_trains_data_parallel(dataset, optimizer, num_devices):
    config = tiny_config(optimizer=optimizer, num_devices=num_devices)
    trainer = train_lib.setup(config, dataset)
    assert trainer.mesh.devices.size == num_devices
    initial = jax.device_get(trainer.state.params)
    state, metrics = run_steps(trainer, 3)  # crosses into the second epoch
    assert int(state.step) == 3
    assert np.isfinite(metrics["loss"]) and 0 <= metrics["accuracy"] <= 1
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), initial, state.params)
    assert all(jax.tree.leaves(changed))
    # Parameters, optimizer state and BatchNorm statistics are replicated on every device.
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding.is_fully_replicated
        assert len(leaf.sharding.device_set) == num_devices


def test_raw_knobs_bfloat16_and_synchronized_batchnorm(dataset):
    # Everything off the default path in one compilation: a synchronized two-step ASAM ascent in
    # the L-inf ball, StableSAM, bf16 compute, label smoothing, all augmentations and BatchNorm
    # statistics synchronized over the device axis.
    config = tiny_config(
        optimizer="ssam-asam",
        sync_ascent=True,
        ascent_steps=2,
        ascent_norm=float("inf"),
        dtype="bfloat16",
        label_smoothing=0.1,
        crop_padding=2,
        flip=True,
        cutout=4,
        model_kwargs='{"features": [4], "bn_axis_name": "data"}',
        num_devices=8,
    )
    trainer = train_lib.setup(config, dataset)
    state, metrics = run_steps(trainer, 2)
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
    config = tiny_config(optimizer="ssam", rho=5.0, num_devices=1)
    trainer = train_lib.setup(config, dataset)
    reference_tx = train_lib.build_optimizer(config, trainer.steps_per_epoch, axis_name=None)
    reference_step = jax.jit(
        train_lib.make_train_step(
            trainer.model,
            reference_tx,
            train_lib.Preprocess(mean=dataset.mean, std=dataset.std, crop_padding=0, flip=False),
            num_classes=dataset.num_classes,
            axis_name=None,
        )
    )
    indices = input_pipeline.train_batch_indices(0, 0, len(dataset.train_labels), 16)[0]
    key = jax.random.fold_in(train_lib.step_key(config.seed, 0), 0)
    state = jax.device_get(trainer.state)
    want, want_metrics = reference_step(
        state, dataset.train_images[indices], dataset.train_labels[indices], key
    )
    got, got_metrics = run_steps(trainer, 1)
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
    _, first_pass = trainer.model.apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        input_pipeline.normalize(dataset.train_images[indices], dataset.mean, dataset.std),
        train=True,
        mutable=["batch_stats"],
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
        jax.device_get(got.batch_stats),
        jax.device_get(first_pass["batch_stats"]),
    )


def test_late_phase_sam_is_exactly_sgd_before_its_start(dataset):
    sgd = train_lib.setup(tiny_config(optimizer="sgd", num_devices=8), dataset)
    late = train_lib.setup(tiny_config(optimizer="sam", sam_start_epoch=1, num_devices=8), dataset)
    steps = late.steps_per_epoch
    assert late.rho_at(steps - 1) == 0.0 and late.rho_at(steps) == 0.05
    sgd_state, _ = run_steps(sgd, steps)
    late_state, _ = run_steps(late, steps)
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


def test_evaluation_counts_every_example_exactly_once(dataset):
    # 40 test images, batches of 16 on 8 devices: the last batch is half padding.
    trainer = train_lib.setup(tiny_config(num_devices=8), dataset)
    result = train_lib.evaluate_split(trainer, trainer.state, "test")
    assert result["count"] == len(dataset.test_labels) == 40

    state = jax.device_get(trainer.state)
    logits = trainer.model.apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        input_pipeline.normalize(dataset.test_images, dataset.mean, dataset.std),
        train=False,
    )
    labels = dataset.test_labels
    accuracy = float(np.mean(np.argmax(logits, -1) == labels))
    loss = float(np.mean(train_lib.cross_entropy(logits, labels, dataset.num_classes)))
    assert result["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert result["loss"] == pytest.approx(loss, rel=1e-5)


def test_batch_size_must_divide_the_device_count(dataset):
    with pytest.raises(ValueError, match="does not divide by the 8 devices"):
        train_lib.setup(tiny_config(batch_size=12, num_devices=8), dataset)


# --------------------------------------------------------------------------------------------
# The training loop: output files, checkpoints, exact resume.
# --------------------------------------------------------------------------------------------


def _restore_final_params(output_dir: str, epoch: int):
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.path.join(output_dir, train_lib.CHECKPOINT_DIR, str(epoch)))
    restored = ocp.StandardCheckpointer().restore(os.path.join(path, "default"))
    return restored["params"], restored["opt_state"], restored["batch_stats"]


def _numbers(rows):
    timing = {"epoch_time_s", "train_images_per_s", "compile_time_s"}
    return [{k: v for k, v in row.items() if k not in timing} for row in rows]


def test_interrupted_run_resumes_bit_identically(dataset, mock_data_dir, tmp_path, capsys):
    # Late-phase StableSAM on 8 devices: epoch 1 SGD, epoch 2 SSAM; 2 steps per epoch.
    common = dict(
        optimizer="ssam", sam_start_epoch=1, num_devices=8, crop_padding=2, flip=True, cutout=4
    )
    straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
    summary = train_lib.train(tiny_config(output_dir=straight_dir, **common), dataset=dataset)
    assert summary["completed"] and summary["epochs"] == 2 and summary["num_devices"] == 8

    stopped = train_lib.train(
        tiny_config(output_dir=resumed_dir, stop_after_epoch=1, **common), dataset=dataset
    )
    assert stopped == {"completed": False, "epoch": 1, "output_dir": resumed_dir}
    assert not os.path.exists(os.path.join(resumed_dir, train_lib.SUMMARY_FILE))

    # Resume through the command line, which loads the (mock) data itself.
    argv = [
        "--dataset=cifar10",
        f"--data-dir={mock_data_dir}",
        "--validation-size=8",
        f"--model-kwargs={TINY_MODEL}",
        "--batch-size=16",
        "--eval-batch-size=16",
        "--epochs=2",
        "--optimizer=ssam",
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
    with open(os.path.join(straight_dir, train_lib.METRICS_JSONL)) as f:
        straight_rows = [json.loads(line) for line in f]
    with open(os.path.join(resumed_dir, train_lib.METRICS_JSONL)) as f:
        resumed_rows = [json.loads(line) for line in f]
    assert _numbers(straight_rows) == _numbers(resumed_rows)
    assert [r["epoch"] for r in resumed_rows] == [1, 2]
    assert [r["rho"] for r in resumed_rows] == [0.0, 0.05]
    with open(os.path.join(resumed_dir, train_lib.METRICS_CSV)) as f:
        csv_rows = list(csv.DictReader(f))
    assert [float(r["test_accuracy"]) for r in csv_rows] == [
        r["test_accuracy"] for r in resumed_rows
    ]
    with open(os.path.join(resumed_dir, train_lib.SUMMARY_FILE)) as f:
        saved_summary = json.load(f)
    assert saved_summary["final_test_accuracy"] == resumed_rows[-1]["test_accuracy"]
    with open(os.path.join(resumed_dir, train_lib.CONFIG_FILE)) as f:
        assert json.load(f)["optimizer"] == "ssam"
    # keep_checkpoints=2: both epochs are kept.
    assert sorted(os.listdir(os.path.join(resumed_dir, train_lib.CHECKPOINT_DIR))) == ["1", "2"]


def test_refuses_to_reuse_a_non_empty_output_dir(tmp_path, dataset):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "something").write_text("an earlier run")
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        train_lib.train(tiny_config(output_dir=str(output_dir)), dataset=dataset)
    assert (output_dir / "something").exists()

    # --resume refuses a run started with different numbers.
    (output_dir / train_lib.CONFIG_FILE).write_text(tiny_config(optimizer="sam").to_json())
    with pytest.raises(ValueError, match="optimizer: saved 'sam', now 'ssam'"):
        train_lib.prepare_output_dir(
            tiny_config(output_dir=str(output_dir), optimizer="ssam", resume=True)
        )

    # --overwrite empties the directory.
    train_lib.prepare_output_dir(tiny_config(output_dir=str(output_dir), overwrite=True))
    assert output_dir.is_dir() and not any(output_dir.iterdir())


def test_cli_reports_bad_configuration_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--optimizer=sgd", "--sam-start-epoch=2", f"--output-dir={tmp_path / 'x'}"])
    assert exit_info.value.code == 2
    assert "--sam-start-epoch needs a SAM optimizer" in capsys.readouterr().err
