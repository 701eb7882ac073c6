"""The training configuration: defaults, checks, presets and the command line it generates."""

from __future__ import annotations

import json

import pytest

from experiments import config as config_lib
from experiments import config_checks, data, optimizer_registry, presets
from experiments import train as train_cli


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for field in config_lib.TrainConfig.__dataclass_fields__:
        assert "--" + field.replace("_", "-") in text
    # The notation trap of the StableSAM paper is spelled out.
    assert "stable_usam" in text and "paper" in text


def test_resolve_fills_dataset_and_optimizer_defaults():
    default = config_lib.resolve(config_lib.TrainConfig())
    assert (default.dataset, default.model, default.optimizer) == (
        "mnist5k",
        "small_cnn",
        "stable_sam",
    )
    assert default.epochs == 5 and default.crop_padding == 0 and default.output_dir
    cifar = config_lib.resolve(config_lib.TrainConfig(dataset="cifar10", optimizer="stable_sam"))
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


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(optimizer="sgd", sam_start_epoch=2), "--sam-start-epoch needs a SAM optimizer"),
        (dict(optimizer="sam", sam_start_epoch=9, epochs=5), "--sam-start-epoch must lie"),
        (dict(resume=True, overwrite=True), "exclude each other"),
        (dict(label_noise=1.0), "--label-noise must be a fraction in"),
        (dict(label_noise=-0.1), "--label-noise must be a fraction in"),
        (dict(label_noise=float("nan")), "--label-noise must be a finite number"),
        (dict(label_noise_mode="pairs"), "--label-noise-mode must be one of"),
        (dict(train_size=-1), "--train-size must be >= 0"),
        (dict(crop_padding=-1), "--crop-padding must be >= 0"),
        (dict(lr_schedule="multistep", lr_milestones="80;120"), "--lr-milestones"),
        (dict(model_kwargs="[1]"), "--model-kwargs"),
    ],
)
def test_resolve_rejects_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        config_lib.resolve(config_lib.TrainConfig(**changes))


@pytest.mark.parametrize("name", sorted(config_checks.MINIMUMS))
def test_each_bounded_flag_below_its_minimum_is_named(name):
    minimum, _ = config_checks.MINIMUMS[name]
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ValueError, match=f"{flag} must be >= {minimum}.*got {minimum - 1}"):
        config_lib.resolve(config_lib.TrainConfig(**{name: minimum - 1}))


def test_help_lists_every_preset(capsys):
    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    text = capsys.readouterr().out
    for name in presets.PRESETS:
        assert name in text


def test_every_preset_resolves_to_a_valid_config():
    for name, preset in presets.PRESETS.items():
        config = config_lib.resolve(config_lib.parse_args(["--preset", name]))
        for field, value in preset.overrides.items():
            assert getattr(config, field) == value, (name, field)


def test_explicit_flags_override_the_preset():
    config = config_lib.parse_args(
        ["--preset", "late-phase-cifar10-resnet18", "--epochs", "170", "--no-progress"]
    )
    assert (config.model, config.optimizer, config.sam_start_epoch) == ("resnet18", "sam", 150)
    assert config.epochs == 170 and config.progress is False
    # A flag given with the value of its default still wins over the preset.
    assert (
        config_lib.parse_args(["--preset", "demo", "--optimizer", "stable_sam"]).optimizer
        == "stable_sam"
    )
    stable = config_lib.parse_args(["--preset", "stablesam-cifar10-resnet18", "--optimizer=sam"])
    assert stable.optimizer == "sam" and stable.rho == 0.1
    assert config_lib.parse_args([]) == config_lib.TrainConfig()


def test_cli_choices_come_from_the_registries():
    assert config_lib.OPTIMIZERS == ("sgd", *optimizer_registry.VARIANTS)
    fields = {f.name: f for f in config_lib.dataclasses.fields(config_lib.TrainConfig)}
    assert fields["optimizer"].metadata["choices"] == config_lib.OPTIMIZERS
    for name in optimizer_registry.VARIANTS:
        assert name in fields["optimizer"].metadata["help"]


def test_config_data_sets_and_noise_modes_match_the_data_package():
    assert set(config_lib.DATASETS) == set(config_lib.DATASET_DEFAULTS)
    assert config_lib.LABEL_NOISE_MODES == data.LABEL_NOISE_MODES


def test_old_optimizer_names_are_deprecated_aliases(capsys):
    config = config_lib.parse_args(["--optimizer", "ssam-usam"])
    assert config.optimizer == "stable_usam"
    assert "deprecated" in capsys.readouterr().err
    assert config_lib.resolve(config_lib.TrainConfig(optimizer="fsam")).optimizer == "friendly_sam"
    # A run folder saved under an old spelling compares equal to the current name.
    resolved = config_lib.resolve(config_lib.TrainConfig(optimizer="stable_sam", output_dir="x"))
    from experiments import run_dir

    saved = json.loads(resolved.replace(optimizer="ssam").to_json())
    assert run_dir.config_differences(saved, resolved) == []


# Settings that cannot be meant: each refused with one line that names the flag and what to pass.
@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(dataset="fashion_mnist", data_dir="/nonexistent"), "--data-dir /nonexistent does"),
        (dict(dataset="digits", data_dir="."), "--data-dir does not apply to --dataset digits"),
        (dict(model_kwargs='{"features": "x"}'), "'features' of small_cnn takes a list of int"),
        (dict(model_kwargs='{"features": [1.5]}'), "takes a list of integers, got \\[1.5\\]"),
        (dict(model="mlp", model_kwargs='{"hidden": [8, true]}'), "'hidden' of mlp takes"),
        (dict(model="wrn16_8", model_kwargs='{"dropout_rate": "0.3"}'), "takes a number"),
        (dict(cutout=28), "--cutout 28 blanks every 28x28 image of mnist5k: pass"),
        (dict(dataset="digits", cutout=100), "--cutout 100 blanks every 8x8 image of digits"),
        (dict(cutout=-1), "--cutout must be >= 0"),
        (dict(lr_schedule="multistep"), "--lr-schedule multistep needs --lr-milestones"),
        (dict(lr_milestones="2"), "--lr-milestones apply to --lr-schedule multistep only"),
        (dict(lr_schedule="multistep", lr_milestones="2,9"), "in \\[1, --epochs\\) = \\[1, 5\\)"),
        (dict(warmup_epochs=5), "--warmup-epochs 5 must be below --epochs 5"),
        (dict(warmup_epochs=10, epochs=5), "would never reach its learning rate"),
        (dict(stop_after_epoch=9), "--stop-after-epoch 9 lies after the last epoch"),
        (dict(optimizer="sgd", rho=0.1), "--rho 0.1 needs a SAM optimizer"),
    ],
    ids=lambda value: value if isinstance(value, str) and len(value) < 40 else None,
)
def test_settings_that_cannot_be_meant_are_refused(changes, message):
    with pytest.raises(config_lib.ConfigError, match=message) as error:
        config_lib.resolve(config_lib.TrainConfig(**changes))
    errors = config_checks.errors(config_lib._with_defaults(config_lib.TrainConfig(**changes)))
    assert len(errors) == 1 and "\n" not in str(error.value), errors


@pytest.mark.parametrize(
    "changes",
    [
        dict(cutout=27),
        dict(dataset="digits", cutout=7),
        dict(lr_schedule="multistep", lr_milestones="2,4"),
        dict(warmup_epochs=4.5),
        dict(stop_after_epoch=5),
        dict(optimizer="sgd"),
        dict(optimizer="sgd", rho=0.0),
        dict(model="pyramidnet110_270", model_kwargs='{"shakedrop": true, "alpha": 48}'),
    ],
)
def test_their_neighbours_are_accepted(changes):
    config = config_lib.resolve(config_lib.TrainConfig(**changes))
    assert config_lib.resolve(config) == config  # and stay valid once resolved


def test_model_kwargs_list_only_what_a_user_may_set():
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.resolve(config_lib.TrainConfig(model_kwargs='{"widht": 2}'))
    assert "its options are features." in str(error.value)
    for model in config_lib.MODELS:
        options = config_checks.model_options(model)
        assert options and not {"bn_axis_name", "dtype", "num_classes", "block_cls"} & set(options)
    with pytest.raises(config_lib.ConfigError, match="does not take 'bn_axis_name'"):
        config_lib.resolve(config_lib.TrainConfig(model_kwargs='{"bn_axis_name": "data"}'))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(epochs=-1), "--epochs must be >= 1, got -1."),
        (dict(epochs=0, warmup_epochs=3, stop_after_epoch=2), "--epochs must be >= 1, got 0."),
        (dict(learning_rate=float("nan")), "--learning-rate must be a finite number, got nan."),
        (dict(esam_beta=float("nan")), "--esam-beta must be a finite number, got nan."),
    ],
)
def test_one_sentence_per_bad_flag(changes, message):
    # --epochs -1 is the one mistake: no word about --sam-start-epoch, which was not passed.
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.resolve(config_lib.TrainConfig(**changes))
    assert str(error.value) == message


def test_a_preset_with_optimizer_sgd_is_its_sgd_baseline():
    config = config_lib.parse_args(["--preset", "late-phase-cifar10-resnet18", "--optimizer=sgd"])
    assert (config.optimizer, config.rho, config.sam_start_epoch) == ("sgd", None, 0)
    config_lib.resolve(config)
    explicit = config_lib.parse_args(["--preset=stablesam-cifar10-resnet18", "--optimizer=sgd"])
    assert explicit.rho is None
    with pytest.raises(config_lib.ConfigError, match="--rho 0.2 needs a SAM optimizer"):
        config_lib.resolve(config_lib.parse_args(["--preset=demo", "--optimizer=sgd", "--rho=0.2"]))
