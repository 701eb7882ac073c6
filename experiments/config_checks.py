"""The checks of a ``TrainConfig``'s values, one error line per bad flag (see
:func:`experiments.config.resolve`, which joins them into one ``ConfigError``)."""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import json
import math
import os
import types
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import sam_optax
from experiments import data, models, optimizer_registry

if TYPE_CHECKING:
    from experiments.config import TrainConfig

LABEL_NOISE_MODES: tuple[str, ...] = data.LABEL_NOISE_MODES

# The flags that choose the steps of the ascent, at their values for "on every step".
ASCENT_ON_EVERY_STEP: Mapping[str, Any] = dict(
    sam_start_epoch=0, sam_last_fraction=0.0, sam_every=1, sam_probability=1.0
)
# Every flag that only a SAM optimizer takes, at its "off" value (the SGD baseline's).
SAM_ONLY_OFF: Mapping[str, Any] = dict(**ASCENT_ON_EVERY_STEP, sam_micro_batch=0, adaptive=False)


# The numeric flags with a lower bound: field -> (its smallest value, what a boundary value means).
MINIMUMS: Mapping[str, tuple[int, str]] = dict(
    rho=(0, ""),
    eta=(0, "ASAM's T = |w| + eta"),
    weight_decay=(0, ""),
    momentum=(0, ""),
    warmup_epochs=(0, ""),
    sparse_sam_update_epochs=(1, ""),
    ascent_steps=(1, ""),
    looksam_k=(1, "1 gives SAM"),
    epochs=(1, ""),
    batch_size=(1, ""),
    eval_batch_size=(1, ""),
    sam_every=(1, "1: every step"),
    sam_micro_batch=(0, "0: off"),
    last_layer_weight_penalty=(0, ""),
    last_layer_feature_penalty=(0, ""),
    eval_every=(1, ""),
    checkpoint_every=(1, ""),
    log_every_steps=(1, ""),
    keep_checkpoints=(1, ""),
    num_devices=(0, "0: all devices"),
    num_processes=(0, "0: detected from the environment"),
    distributed_timeout=(0, "seconds; 0: JAX's defaults"),
    stop_after_epoch=(0, "0: run to --epochs"),
    validation_size=(0, ""),
    crop_padding=(0, ""),
    cutout=(0, "0: off"),
    train_size=(0, "0: all"),
)


def preset_for_flags(preset: Mapping[str, Any], explicit: Mapping[str, Any]) -> dict[str, Any]:
    """A preset's values under the flags passed with it: with ``--optimizer sgd``, without the
    preset's rho and SAM-only flags (the preset's SGD baseline), unless passed explicitly too."""
    values = dict(preset)
    if explicit.get("optimizer") == optimizer_registry.BASELINE:
        for name in ("rho", *SAM_ONLY_OFF):
            values.pop(name, None)
    return values


def _minimum_errors(config: TrainConfig) -> list[str]:
    errors = []
    for name, (minimum, meaning) in MINIMUMS.items():
        value = getattr(config, name)
        if value < minimum:
            flag = "--" + name.replace("_", "-")
            hint = f" ({meaning})" if meaning else ""
            errors.append(f"{flag} must be >= {minimum}{hint}, got {value}.")
    return errors


def _optimizer_errors(config: TrainConfig) -> list[str]:
    errors = []
    if not config.learning_rate > 0:
        errors.append(f"--learning-rate must be > 0, got {config.learning_rate}.")
    if config.optimizer == optimizer_registry.BASELINE:
        if config.rho not in (None, optimizer_registry.default_rho(config.optimizer)):
            errors.append(
                f"--rho {config.rho:g} needs a SAM optimizer (sgd does not ascend): leave --rho "
                "out, or pass e.g. --optimizer sam."
            )
        for name, off in SAM_ONLY_OFF.items():
            if getattr(config, name) != off:
                flag = "--" + name.replace("_", "-")
                errors.append(f"{flag} needs a SAM optimizer, e.g. --optimizer sam.")
    elif config.adaptive and "adaptive" not in optimizer_registry.get(config.optimizer).knobs:
        errors.append(f"--adaptive does not apply to --optimizer {config.optimizer}.")
    if config.sam_micro_batch and optimizer_registry.VARIANTS.get(config.optimizer) is not None:
        variant = optimizer_registry.get(config.optimizer)
        if variant.factory is not sam_optax.sam and variant.gradient != "per_example":
            errors.append(
                f"--sam-micro-batch needs a variant of sam_optax.sam (e.g. --optimizer sam), not "
                f"--optimizer {config.optimizer}."
            )
    if not 0 <= config.sparse_sam_sparsity < 1:
        errors.append(
            f"--sparse-sam-sparsity must lie in [0, 1) (0: SAM), got {config.sparse_sam_sparsity}."
        )
    if config.esam_beta == 0 or config.esam_gamma == 0:
        errors.append("--esam-beta and --esam-gamma must be > 0 (1 turns each part of ESAM off).")
    for flag, value, low, high in (
        ("--gsam-alpha", config.gsam_alpha, 0.0, math.inf),
        ("--looksam-alpha", config.looksam_alpha, 0.0, math.inf),
        ("--fsam-sigma", config.fsam_sigma, 0.0, math.inf),
        ("--fsam-lambda", config.fsam_lambda, 0.0, 1.0),
        ("--vasso-theta", config.vasso_theta, 0.0, 1.0),
        ("--ae-sam-decay", config.ae_sam_decay, 0.0, 1.0),
        ("--esam-beta", config.esam_beta, 0.0, 1.0),
        ("--sparse-sam-drop-rate", config.sparse_sam_drop_rate, 0.0, 1.0),
        ("--esam-gamma", config.esam_gamma, 0.0, 1.0),
    ):
        if not (math.isfinite(value) and low <= value <= high):
            errors.append(f"{flag} must be a finite number in [{low:g}, {high:g}], got {value}.")
    if not config.ascent_norm > 1:
        errors.append(f"--ascent-norm must be > 1 (2 for SAM, inf), got {config.ascent_norm}.")
    if not 0 <= config.label_smoothing < 1:
        errors.append(f"--label-smoothing must lie in [0, 1), got {config.label_smoothing}.")
    return errors


def _schedule_errors(config: TrainConfig) -> list[str]:
    errors = []
    # The bounds below that are counted in epochs say nothing new when --epochs is itself bad.
    epochs_ok = config.epochs >= 1
    if epochs_ok and not 0 <= config.sam_start_epoch < config.epochs:
        errors.append(
            f"--sam-start-epoch must lie in [0, --epochs) = [0, {config.epochs}), "
            f"got {config.sam_start_epoch}."
        )
    if epochs_ok and config.warmup_epochs >= config.epochs:
        errors.append(
            f"--warmup-epochs {config.warmup_epochs:g} must be below --epochs {config.epochs}: "
            "the run would never reach its learning rate. Pass fewer (e.g. "
            f"{max(config.epochs // 10, 1) if config.epochs > 1 else 0}), or 0 for none."
        )
    if epochs_ok and config.stop_after_epoch > config.epochs:
        errors.append(
            f"--stop-after-epoch {config.stop_after_epoch} lies after the last epoch "
            f"(--epochs {config.epochs}): pass an epoch in [1, {config.epochs}], or 0 to run "
            "to the end."
        )
    if not 0 <= config.sam_last_fraction <= 1:
        errors.append(
            f"--sam-last-fraction must lie in [0, 1] (e.g. 0.25), got {config.sam_last_fraction}."
        )
    elif config.sam_last_fraction and config.sam_start_epoch:
        errors.append("--sam-last-fraction and --sam-start-epoch exclude each other: pick one.")
    if not 0 < config.sam_probability <= 1:
        errors.append(
            f"--sam-probability must lie in (0, 1] (1: every step), got {config.sam_probability}."
        )
    try:
        milestones = lr_milestones(config)
    except ValueError as e:
        errors.append(str(e))
    else:
        errors += _milestone_errors(config, milestones)
    return errors


def _milestone_errors(config: TrainConfig, milestones: list[int]) -> list[str]:
    if config.lr_schedule == "multistep" and not milestones:
        return [
            "--lr-schedule multistep needs --lr-milestones, the epochs at which the learning "
            "rate drops x0.1 (e.g. --lr-milestones 80,120); without them it stays constant."
        ]
    if config.lr_schedule != "multistep" and milestones:
        return [
            f"--lr-milestones apply to --lr-schedule multistep only, not "
            f"{config.lr_schedule}: add --lr-schedule multistep or leave them out."
        ]
    if config.epochs >= 1 and not all(0 < m < config.epochs for m in milestones):
        return [
            f"--lr-milestones must be epochs in [1, --epochs) = [1, {config.epochs}) to take "
            f"effect, got {config.lr_milestones!r}."
        ]
    return []


def _run_errors(config: TrainConfig) -> list[str]:
    """The hardware, multi-host and output-folder flags."""
    errors = []
    if config.process_id < -1:
        errors.append(f"--process-id must be >= 0 (or unset), got {config.process_id}.")
    elif config.num_processes and config.process_id >= config.num_processes:
        errors.append(
            f"--process-id {config.process_id} must lie in [0, --num-processes) = "
            f"[0, {config.num_processes})."
        )
    if config.resume and config.overwrite:
        errors.append("--resume and --overwrite exclude each other: pick one.")
    return errors


def _data_errors(config: TrainConfig) -> list[str]:
    """The data, augmentation and model flags."""
    errors = []
    if not (math.isfinite(config.label_noise) and 0 <= config.label_noise < 1):
        errors.append(f"--label-noise must be a fraction in [0, 1), got {config.label_noise}.")
    if config.label_noise_mode not in LABEL_NOISE_MODES:
        errors.append(
            f"--label-noise-mode must be one of {LABEL_NOISE_MODES}, got "
            f"{config.label_noise_mode!r}."
        )
    errors += _data_dir_errors(config)
    source = data.SOURCES.get(config.dataset)
    if source is not None and config.cutout >= source.image_size:
        size = source.image_size
        errors.append(
            f"--cutout {config.cutout} blanks every {size}x{size} image of {config.dataset}: "
            f"pass a square smaller than the image (e.g. {size // 2}), or 0 for none."
        )
    try:
        kwargs = model_kwargs(config.model_kwargs)
        if config.model in models.MODELS:
            errors += _model_kwargs_errors(config.model, kwargs)
    except ValueError as e:
        errors.append(str(e))
    return errors


def _data_dir_errors(config: TrainConfig) -> list[str]:
    """A --data-dir that cannot hold the data set (checked before anything is read)."""
    source = data.SOURCES.get(config.dataset)
    if config.data_dir is None or source is None:
        return []
    if not source.reads_data_dir:
        return [
            f"--data-dir does not apply to --dataset {config.dataset}, which ships inside a "
            "Python package: leave --data-dir out."
        ]
    folder = os.path.expanduser(config.data_dir)
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        return [
            f"--data-dir {config.data_dir} {what}: pass the folder that holds {config.dataset}, "
            "or leave --data-dir out to read the default location."
        ]
    return []


# Fields of the zoo's models that the harness sets itself: not options of --model-kwargs.
_HARNESS_MODEL_FIELDS = frozenset({"parent", "name", "num_classes", "dtype", "bn_axis_name"})


@functools.cache
def model_options(model: str) -> dict[str, Any]:
    """The fields of `model` that --model-kwargs may set: name -> type annotation (those of a
    type JSON can express: numbers, booleans, strings and lists of them)."""
    factory = models.MODELS[model]
    module_cls = factory.func if isinstance(factory, functools.partial) else factory
    hints = typing.get_type_hints(module_cls)
    return {
        f.name: hints.get(f.name, Any)
        for f in dataclasses.fields(module_cls)
        if f.name not in _HARNESS_MODEL_FIELDS and _describe(hints.get(f.name, Any)) is not None
    }


def _describe(annotation: Any, *, plural: bool = False) -> str | None:
    """`annotation` in words ("an integer", "a list of integers"); None for a type that JSON
    cannot express (a module class, a function, ``Any``)."""
    words = {
        bool: ("true or false", "booleans"),
        int: ("an integer", "integers"),
        float: ("a number", "numbers"),
        str: ("a string", "strings"),
    }
    if annotation in words:
        return words[annotation][plural]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        parts = [_describe(a, plural=plural) for a in args if a is not type(None)]
        if None in parts:
            return None
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin in (tuple, list, collections.abc.Sequence) and args and not plural:
        item = _describe(args[0], plural=True)
        return None if item is None else f"a list of {item}"
    return None


def _matches(value: Any, annotation: Any) -> bool:
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        return any(value is None if a is type(None) else _matches(value, a) for a in args)
    if origin in (tuple, list, collections.abc.Sequence):
        return isinstance(value, tuple) and all(_matches(v, args[0]) for v in value)
    return False


def _model_kwargs_errors(model: str, kwargs: Mapping[str, Any]) -> list[str]:
    """An error line per key of --model-kwargs that `model` does not take, or whose value has
    the wrong type; nothing is built."""
    options = model_options(model)
    errors = []
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        errors.append(
            f"{model} does not take {', '.join(map(repr, unknown))}; its options are "
            f"{', '.join(sorted(options)) or 'none'}."
        )
    for key, value in kwargs.items():
        if key in options and not _matches(value, options[key]):
            shown = json.dumps(list(value) if isinstance(value, tuple) else value)
            errors.append(f"{key!r} of {model} takes {_describe(options[key])}, got {shown}.")
    # One line for the flag: the unknown keys, then each value of the wrong type.
    return ["--model-kwargs: " + " ".join(errors)] if errors else []


# Float flags that may be infinite (the L-inf ball of a sign ascent); every other float flag
# must be finite.
_MAY_BE_INFINITE = frozenset({"ascent_norm"})


def _non_finite_floats(config: TrainConfig) -> list[str]:
    """An error line per float flag that is NaN, or infinite where that means nothing."""
    errors = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not isinstance(value, float) or math.isfinite(value):
            continue
        if math.isnan(value) or f.name not in _MAY_BE_INFINITE:
            flag = "--" + f.name.replace("_", "-")
            errors.append(f"{flag} must be a finite number, got {value}.")
    return errors


def errors(config: TrainConfig) -> list[str]:
    """Every error line of `config` (filled in by ``resolve``): empty when it is valid."""
    found = _non_finite_floats(config) + _minimum_errors(config)
    for check in (_optimizer_errors, _schedule_errors, _run_errors, _data_errors):
        found += check(config)
    return _one_per_flag(found)


def _one_per_flag(found: list[str]) -> list[str]:
    """`found` without the later lines about a flag that an earlier line already names first
    (a NaN --learning-rate is not finite, and so not > 0 either: one sentence says it)."""
    seen, kept = set(), []
    for line in found:
        flag = line.split()[0] if line.startswith("--") else None
        if flag is not None and flag.rstrip(":") in seen:
            continue
        if flag is not None:
            seen.add(flag.rstrip(":"))
        kept.append(line)
    return kept


def lr_milestones(config: TrainConfig) -> list[int]:
    """The --lr-milestones as a sorted list of epochs."""
    if not config.lr_milestones.strip():
        return []
    try:
        return sorted(int(x) for x in config.lr_milestones.split(","))
    except ValueError:
        raise ValueError(
            f"--lr-milestones must be comma-separated epochs, e.g. '80,120', "
            f"got {config.lr_milestones!r}."
        ) from None


def model_kwargs(text: str) -> dict[str, Any]:
    """The --model-kwargs JSON text as a dict (ValueError naming the flag when it is not an
    object)."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--model-kwargs must be a JSON object: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--model-kwargs must be a JSON object, got {text!r}.")
    # Tuples, not lists: Flax module fields must be hashable.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
