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
        (dict(label_noise=float("nan")), "--label-noise must be a fraction in"),
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
    stable = config_lib.parse_args(["--preset", "stablesam-cifar10-resnet18", "--optimizer=sgd"])
    assert stable.optimizer == "sgd" and stable.rho == 0.1
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
