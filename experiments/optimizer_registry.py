"""The registry of SAM variants: one entry per ``--optimizer`` name.

Every place that names a variant reads it from here: the command line (choices and help),
:func:`experiments.optimizers.build_optimizer`, the default rho, the sweep (its variant list and
rho grids) and the papers' experiments (labels and colours of their plots).

Adding a variant is one :func:`register` call below, plus a ``TrainConfig`` field for each of its
own hyperparameters, e.g.::

    register(Variant(
        name="gsam", label="GSAM", color="C6", paper="Zhuang et al., ICLR 2022",
        help="surrogate gap guided SAM", default_rho=0.05,
        factory=sam_optax.gsam, config_fields={"alpha": "gsam_alpha"},
    ))

``config_fields`` maps keyword arguments of the factory to ``TrainConfig`` fields; the factory is
called as ``factory(rho, **knobs, **{kw: config.<field>}, axis_name=..., sync_ascent=...)``.

Names (the one notation note): ``--optimizer`` values equal the library's names. ``sam`` is
Foret et al.'s normalized SAM, ``usam`` the unnormalized ascent eps = rho g, and the StableSAM
form of a variant is ``stable_<name>`` (``sam_optax.sam(stable=True)``, exported as
``sam_optax.stable_sam``). The StableSAM paper (Tan et al.) calls the unnormalized ascent "SAM"
(Foret et al.'s "SAM\u2020") and its own method "SSAM": the paper's SAM is ``usam`` here, its
SSAM ``stable_usam``, its SAM\u2020 ``sam``. The older spellings of :data:`DEPRECATED_NAMES`
(``ssam``, ``fsam``, ``ssam-usam``, ...) are accepted for one release, with a warning.
"""

from __future__ import annotations

import dataclasses
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import optax

import sam_optax

# The non-SAM baseline: SGD with momentum (no ascent, one pass per step).
BASELINE = "sgd"
BASELINE_HELP = "SGD with momentum"

# The TrainConfig fields that every sam_optax.sam()-based variant forwards to its factory.
SAM_CONFIG_FIELDS: Mapping[str, str] = types.MappingProxyType(
    {"eta": "eta", "ascent_norm": "ascent_norm", "ascent_steps": "ascent_steps"}
)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One SAM variant: how to build it, how to name and draw it, its defaults."""

    name: str  # the --optimizer value
    label: str  # legend label of plots
    color: str  # matplotlib colour of plots
    paper: str
    help: str  # one line for --help
    default_rho: float
    # rho is relative to |w| (ASAM scaling): its default and sweep grid are ASAM's (about 10x).
    adaptive_rho: bool = False
    factory: Callable[..., optax.GradientTransformationExtraArgs] = sam_optax.sam
    # Fixed keyword arguments of the factory that make this variant.
    knobs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Factory keyword -> TrainConfig field, read from the run's configuration.
    config_fields: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: dict(SAM_CONFIG_FIELDS)
    )
    # Among the variants the StableSAM protocol's sweep compares by default (the others are
    # there to pick with --optimizers).
    in_protocol: bool = True
    # Compared by experiments.papers.efficiency, the cheaper variants and the per-example ones
    # (the label-noise table keeps to the others).
    cheaper: bool = False
    # The grad_fn evaluations of a run beyond the first gradient of each step, from whether each
    # step ascends (rho > 0), the factory's options and the variant's final state (see
    # :func:`every_ascending_step`).
    second_passes: Callable[[np.ndarray, Mapping[str, Any], Any], int] = dataclasses.field(
        default_factory=lambda: every_ascending_step
    )
    # Whether each step evaluates the gradient at the weights themselves (one pass) before the
    # ascent.
    first_pass: bool = True
    # Factory keywords that depend on the run's length as well as on its config:
    # ``run_options(config, steps_per_epoch) -> {keyword: value}``.
    run_options: Callable[[Any, int], Mapping[str, Any]] | None = None
    # The TrainConfig field of the fraction of each batch that the second pass differentiates
    # (ESAM's data selection; None: the whole batch).
    selection_field: str | None = None
    # How a step gets its gradient (see experiments.steps.make_train_step): "grad_fn" (the
    # transformation evaluates grad_fn), "per_example" (sam_optax.per_example.value_and_grad's
    # sam_grad_fn) or "objective" (a loss-level method: the base optimizer alone, on the gradient
    # of ``objective(config, rho)``).
    gradient: str = "grad_fn"
    objective: Callable[[Any, Any], Any] | None = None

    def options(self, config: Any) -> dict[str, Any]:
        """The factory's keyword arguments taken from a ``TrainConfig``."""
        return {kw: getattr(config, field) for kw, field in self.config_fields.items()}

    def build(self, rho: Any, **options: Any) -> optax.GradientTransformationExtraArgs:
        """The transformation at radius (or rho schedule) `rho`; `options` override knobs."""
        return self.factory(rho, **{**self.knobs, **options})


def every_ascending_step(ascends: np.ndarray, options: Mapping[str, Any], state: Any) -> int:
    """One grad_fn evaluation per ascent step (``ascent_steps``) of every ascending step."""
    del state
    return int(np.count_nonzero(ascends)) * (options.get("ascent_steps") or 1)


def every_kth_ascending_step(ascends: np.ndarray, options: Mapping[str, Any], state: Any) -> int:
    """LookSAM: one evaluation on the ascending steps t with t % k == 0."""
    del state
    steps = np.arange(len(ascends))
    return int(np.count_nonzero(ascends & (steps % options["k"] == 0)))


def counted_in_state(ascends: np.ndarray, options: Mapping[str, Any], state: Any) -> int:
    """AE-SAM: the ascents its state counted (the switch depends on the data)."""
    del ascends, options
    return int(state.ascents)


def train_step_options(name: str, config: Any, rho: Any = None) -> dict[str, Any]:
    """The keywords of :func:`experiments.steps.make_train_step` that optimizer `name` sets;
    `rho` is the run's rho (or its schedule), for the loss-level methods."""
    if name == BASELINE:
        return {}
    variant = get(name)
    fraction = getattr(config, variant.selection_field) if variant.selection_field else 1.0
    options = dict(first_pass=variant.first_pass, select_fraction=fraction)
    if variant.gradient != "grad_fn":
        options["gradient"] = variant.gradient
    if variant.objective is not None:
        options["objective"] = variant.objective(config, rho)
    return options


def no_second_pass(ascends: np.ndarray, options: Mapping[str, Any], state: Any) -> int:
    """A loss-level method: its one gradient is the step's first."""
    del ascends, options, state
    return 0


def gradient_evaluations(name: str, ascends: np.ndarray, config: Any, state: Any) -> int:
    """The grad_fn evaluations of a run of optimizer `name` (each of a full batch): the first
    gradient of every step and the variant's second passes. `ascends` holds, per step, whether
    rho > 0; `state` is the variant's final state (the first of the optimizer's chain)."""
    if name == BASELINE:
        return len(ascends)
    variant = get(name)
    first = len(ascends) if variant.first_pass else 0
    return first + variant.second_passes(ascends, variant.options(config), state)


VARIANTS: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    if variant.name in VARIANTS or variant.name == BASELINE:
        raise ValueError(f"A variant named {variant.name!r} exists already.")
    VARIANTS[variant.name] = variant
    return variant


# Old --optimizer spellings -> current names; accepted (with a warning) for one release. A saved
# config.json that holds an old name compares equal to the current one.
DEPRECATED_NAMES: Mapping[str, str] = types.MappingProxyType(
    {
        "ssam": "stable_sam",
        "ssam-asam": "stable_asam",
        "ssam-usam": "stable_usam",
        "ssam-gsam": "stable_gsam",
        "ssam-looksam": "stable_looksam",
        "fsam": "friendly_sam",
        "ssam-fsam": "stable_friendly_sam",
        "ssam-vasso": "stable_vasso",
    }
)
_warned: set[str] = set()


def canonical_name(name: str, *, warn: bool = True) -> str:
    """The current name of optimizer `name`: itself, or the new name of a deprecated spelling
    (with a one-line warning on stderr, once per spelling and process, where `warn`)."""
    new = DEPRECATED_NAMES.get(name)
    if new is None:
        return name
    if warn and name not in _warned:
        _warned.add(name)
        print(
            f"warning: optimizer name {name!r} is deprecated and will be removed; use {new!r}.",
            file=sys.stderr,
        )
    return new


def get(name: str) -> Variant:
    """The variant called `name` (``KeyError`` listing the known names otherwise)."""
    try:
        return VARIANTS[canonical_name(name)]
    except KeyError:
        raise KeyError(f"Unknown SAM variant {name!r}; known: {', '.join(VARIANTS)}.") from None


def names() -> tuple[str, ...]:
    """Every SAM variant, in registry order."""
    return tuple(VARIANTS)


def optimizer_names() -> tuple[str, ...]:
    """The values of ``--optimizer``: the SGD baseline, then every SAM variant."""
    return (BASELINE, *VARIANTS)


def optimizer_help() -> str:
    """The ``--optimizer`` help text, one sentence per optimizer."""
    parts = [f"{BASELINE}: {BASELINE_HELP}."]
    parts += [f"{v.name}: {v.help}." for v in VARIANTS.values()]
    parts.append(
        "NOTE: the StableSAM paper's 'SAM' is usam, its 'SSAM' stable_usam, its 'SAM†' sam."
    )
    return " ".join(parts)


def protocol_names() -> tuple[str, ...]:
    """The SAM variants of the StableSAM paper's protocol: the sweep's default comparison."""
    return tuple(name for name, v in VARIANTS.items() if v.in_protocol)


def default_rho(name: str) -> float:
    """The default rho of an optimizer (0 for the SGD baseline)."""
    return 0.0 if name == BASELINE else get(name).default_rho


_FORET = "Foret et al., ICLR 2021"
_TAN = "Tan et al., JMLR 2025"
_KWON = "Kwon et al., ICML 2021"
_ANDRIUSHCHENKO = "Andriushchenko & Flammarion, ICML 2022"

# Default rho: Foret et al.'s 0.05, ASAM's 0.5 (Kwon et al., CIFAR-10).
register(Variant(
    name="sam", label="SAM, normalized (paper's SAM\u2020)", color="C1", paper=_FORET,
    help="Foret et al.'s normalized SAM (eps = rho g/||g||)", default_rho=0.05,
    knobs=dict(normalize=True, stable=False, adaptive=False),
))  # fmt: skip
register(Variant(
    name="stable_sam", label="StableSAM on SAM", color="C0", paper=_TAN,
    help="StableSAM on normalized SAM", default_rho=0.05,
    knobs=dict(normalize=True, stable=True, adaptive=False),
))  # fmt: skip
register(Variant(
    name="asam", label="ASAM", color="C4", paper=_KWON,
    help="adaptive SAM (Kwon et al.)", default_rho=0.5, adaptive_rho=True,
    knobs=dict(normalize=True, stable=False, adaptive=True),
))  # fmt: skip
register(Variant(
    name="stable_asam", label="StableSAM on ASAM", color="C5", paper=_TAN,
    help="StableSAM on ASAM", default_rho=0.5, adaptive_rho=True,
    knobs=dict(normalize=True, stable=True, adaptive=True),
))  # fmt: skip
register(Variant(
    name="usam", label='USAM (paper\'s "SAM")', color="C3", paper=_ANDRIUSHCHENKO,
    help="unnormalized SAM (eps = rho g)", default_rho=0.05,
    knobs=dict(normalize=False, stable=False, adaptive=False),
))  # fmt: skip
register(Variant(
    name="stable_usam", label="StableSAM on USAM (paper's SSAM)", color="C2", paper=_TAN,
    help="StableSAM on USAM", default_rho=0.05,
    knobs=dict(normalize=False, stable=True, adaptive=False),
))  # fmt: skip

_ZHUANG = "Zhuang et al., ICLR 2022"
_LIU = "Liu et al., CVPR 2022"
_LI_FSAM = "Li et al., CVPR 2024"
_LI_VASSO = "Li & Giannakis, NeurIPS 2023"
# The variants beyond sam(): no ascent_norm / ascent_steps (they ascend on the L2 ball in one
# step); eta matters only with --adaptive.
_ETA = {"eta": "eta"}


def _register_with_stable_form(variant: Variant, stable_color: str) -> None:
    """Registers `variant` and its StableSAM form ``stable_<name>`` (stable=True)."""
    register(variant)
    register(dataclasses.replace(
        variant, name=f"stable_{variant.name}", label=f"StableSAM on {variant.label}",
        color=stable_color, help=f"StableSAM on {variant.label}",
        knobs={**variant.knobs, "stable": True},
    ))  # fmt: skip


_register_with_stable_form(Variant(
    name="gsam", label="GSAM", color="C6", paper=_ZHUANG,
    help="surrogate gap guided SAM: g_p - alpha (g - <g, n(g_p)> n(g_p)) (--gsam-alpha)",
    default_rho=0.05, factory=sam_optax.gsam, in_protocol=False,
    config_fields={**_ETA, "alpha": "gsam_alpha"},
), stable_color="#8c564b")  # fmt: skip
_register_with_stable_form(Variant(
    name="looksam", label="LookSAM", color="C7", paper=_LIU,
    help="SAM every k steps, the reused orthogonal part in between (--looksam-k, "
    "--looksam-alpha)",
    default_rho=0.05, factory=sam_optax.looksam, in_protocol=False,
    config_fields={**_ETA, "k": "looksam_k", "alpha": "looksam_alpha"},
    second_passes=every_kth_ascending_step,
), stable_color="#7f7f7f")  # fmt: skip
_register_with_stable_form(Variant(
    name="friendly_sam", label="Friendly SAM", color="C8", paper=_LI_FSAM,
    help="Friendly SAM: ascent along g minus its EMA (--fsam-sigma, --fsam-lambda)",
    default_rho=0.05, factory=sam_optax.friendly_sam, in_protocol=False,
    config_fields={**_ETA, "sigma": "fsam_sigma", "lmbda": "fsam_lambda"},
), stable_color="#bcbd22")  # fmt: skip
_register_with_stable_form(Variant(
    name="vasso", label="VaSSO", color="C9", paper=_LI_VASSO,
    help="variance-suppressed SAM: ascent along an EMA of g (--vasso-theta)",
    default_rho=0.05, factory=sam_optax.vasso, in_protocol=False,
    config_fields={**_ETA, "theta": "vasso_theta"},
), stable_color="#17becf")  # fmt: skip

_JIANG = "Jiang et al., ICLR 2023"
_DU = "Du et al., ICLR 2022"
_BECKER = "Becker et al., 2024"
register(Variant(
    name="ae_sam", cheaper=True, label="AE-SAM", color="#e377c2", paper=_JIANG,
    help="SAM only where ||g||^2 exceeds its running mean by c std (--ae-sam-*)",
    default_rho=0.05, factory=sam_optax.ae_sam, in_protocol=False,
    config_fields={**_ETA, "decay": "ae_sam_decay", "lambda_1": "ae_sam_lambda1",
                   "lambda_2": "ae_sam_lambda2"},
    second_passes=counted_in_state,
))  # fmt: skip
register(Variant(
    name="esam", cheaper=True, label="ESAM", color="#aec7e8", paper=_DU,
    help="efficient SAM: a random fraction of the tensors perturbed (--esam-beta), the second "
    "pass on the examples whose loss rose most (--esam-gamma)",
    default_rho=0.05, factory=sam_optax.esam, in_protocol=False,
    config_fields={**_ETA, "beta": "esam_beta", "seed": "seed"},
    selection_field="esam_gamma",
))  # fmt: skip
register(Variant(
    name="momentum_sam", cheaper=True, label="Momentum-SAM", color="#98df8a", paper=_BECKER,
    help="Momentum-SAM: the one gradient at w - rho n(momentum) (--momentum sets its buffer too)",
    default_rho=0.3, factory=sam_optax.momentum_sam, in_protocol=False,
    config_fields={**_ETA, "momentum": "momentum"},
    second_passes=lambda ascends, options, state: len(ascends), first_pass=False,
))  # fmt: skip

_MI = "Mi et al., NeurIPS 2022"


def _sparse_sam_run_options(config: Any, steps_per_epoch: int) -> Mapping[str, Any]:
    return dict(update_every=config.sparse_sam_update_epochs * steps_per_epoch)


for _mask, _label, _color in (("fisher", "SSAM-F", "#c5b0d5"), ("dynamic", "SSAM-D", "#c49c94")):
    register(Variant(
        name=f"sparse_sam_{_mask}", label=_label, color=_color, paper=_MI,
        help=f"Sparse SAM with the {_mask} mask ({_label}; --sparse-sam-*)",
        default_rho=0.05, factory=sam_optax.sparse_sam, in_protocol=False,
        knobs=dict(mask=_mask), cheaper=True,
        config_fields={**_ETA, "sparsity": "sparse_sam_sparsity",
                       "drop_rate": "sparse_sam_drop_rate", "seed": "seed"},
        run_options=_sparse_sam_run_options,
    ))  # fmt: skip

_BAEK = "Baek et al., ICLR 2024"
register(Variant(
    name="per_example_sam", cheaper=True, label="1-SAM, two passes", color="#ff7f0e",
    paper=_BAEK, help="exact per-example SAM on the dense layers in two passes, groups of "
    "--sam-micro-batch examples (0: the device's batch; no BatchNorm)",
    default_rho=0.05, factory=sam_optax.per_example_sam, in_protocol=False, config_fields={},
    gradient="per_example",
))  # fmt: skip


def _head_sam_objective(last_layers: int) -> Callable[[Any, Any], Any]:
    def objective(config: Any, rho: Any) -> Any:
        del config
        from experiments import steps  # steps imports the data pipeline; only runs need it

        return steps.head_sam_objective(rho, last_layers)

    return objective


for _layers, _label, _color in ((1, "head SAM", "#2ca02c"), (2, "head SAM, 2 layers", "#98df8a")):
    register(Variant(
        name="head_sam" if _layers == 1 else f"head_sam{_layers}", cheaper=True, label=_label,
        color=_color, paper=_BAEK,
        help=f"per-example SAM on the last {_layers} dense layer(s), in one pass (no BatchNorm)",
        default_rho=0.05, factory=sam_optax.per_example_sam, in_protocol=False,
        config_fields={}, gradient="objective", objective=_head_sam_objective(_layers),
        second_passes=no_second_pass,
    ))  # fmt: skip


def _last_layer_penalty(config: Any, rho: Any) -> Any:
    del rho
    from experiments import steps

    return steps.last_layer_penalty_objective(
        config.last_layer_weight_penalty, config.last_layer_feature_penalty
    )


register(Variant(
    name="last_layer_penalty", cheaper=True, label="SGD + last-layer L2 (Baek)", color="#9467bd",
    paper=_BAEK, help="SGD plus L2 penalties on the last layer's weights and its input features "
    "(--last-layer-weight-penalty, --last-layer-feature-penalty; a regularizer, not SAM)",
    default_rho=0.0, factory=sam_optax.per_example_sam, in_protocol=False, config_fields={},
    gradient="objective", objective=_last_layer_penalty, second_passes=no_second_pass,
))  # fmt: skip
