"""The checks of a ``TrainConfig``'s values, one error line per bad flag (see
:func:`experiments.config.resolve`, which joins them into one ``ConfigError``)."""

from __future__ import annotations

import dataclasses
import json
import math
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
    train_size=(0, "0: all"),
)


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
        for name, off in SAM_ONLY_OFF.items():
            if getattr(config, name) != off:
                flag = "--" + name.replace("_", "-")
                errors.append(f"{flag} needs a SAM optimizer, e.g. --optimizer sam.")
    elif config.adaptive and "adaptive" not in optimizer_registry.get(config.optimizer).knobs:
        errors.append(f"--adaptive does not apply to --optimizer {config.optimizer}.")
    if config.sam_micro_batch and optimizer_registry.VARIANTS.get(config.optimizer) is not None:
        if optimizer_registry.get(config.optimizer).factory is not sam_optax.sam:
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
    if not 0 <= config.sam_start_epoch < config.epochs:
        errors.append(
            f"--sam-start-epoch must lie in [0, --epochs) = [0, {config.epochs}), "
            f"got {config.sam_start_epoch}."
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
        lr_milestones(config)
    except ValueError as e:
        errors.append(str(e))
    return errors


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
    try:
        kwargs = model_kwargs(config.model_kwargs)
        if config.model in models.MODELS:  # the fields the model takes (nothing is built)
            models.create_model(config.model, num_classes=2, **kwargs)
    except TypeError as e:
        errors.append(f"--model-kwargs: {e}")
    except ValueError as e:
        errors.append(str(e))
    return errors


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
    return found


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
