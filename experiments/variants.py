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

Naming: ``sam`` is Foret et al.'s normalized SAM and ``usam`` the unnormalized ascent. The
StableSAM paper (Tan et al.) calls the unnormalized ascent "SAM" (and Foret et al.'s "SAM†"), so
its SSAM is ``ssam-usam`` here.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any

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

    def options(self, config: Any) -> dict[str, Any]:
        """The factory's keyword arguments taken from a ``TrainConfig``."""
        return {kw: getattr(config, field) for kw, field in self.config_fields.items()}

    def build(self, rho: Any, **options: Any) -> optax.GradientTransformationExtraArgs:
        """The transformation at radius (or rho schedule) `rho`; `options` override knobs."""
        return self.factory(rho, **{**self.knobs, **options})


VARIANTS: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    if variant.name in VARIANTS or variant.name == BASELINE:
        raise ValueError(f"A variant named {variant.name!r} exists already.")
    VARIANTS[variant.name] = variant
    return variant


def get(name: str) -> Variant:
    """The variant called `name` (``KeyError`` listing the known names otherwise)."""
    try:
        return VARIANTS[name]
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
        "NOTE: the StableSAM paper's 'SAM' is our usam and its 'SSAM' is our ssam-usam; its "
        "'SAM†' is our sam."
    )
    return " ".join(parts)


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
    name="ssam", label="StableSAM on SAM", color="C0", paper=_TAN,
    help="StableSAM on normalized SAM", default_rho=0.05,
    knobs=dict(normalize=True, stable=True, adaptive=False),
))  # fmt: skip
register(Variant(
    name="asam", label="ASAM", color="C4", paper=_KWON,
    help="adaptive SAM (Kwon et al.)", default_rho=0.5, adaptive_rho=True,
    knobs=dict(normalize=True, stable=False, adaptive=True),
))  # fmt: skip
register(Variant(
    name="ssam-asam", label="StableSAM on ASAM", color="C5", paper=_TAN,
    help="StableSAM on ASAM", default_rho=0.5, adaptive_rho=True,
    knobs=dict(normalize=True, stable=True, adaptive=True),
))  # fmt: skip
register(Variant(
    name="usam", label='USAM (paper\'s "SAM")', color="C3", paper=_ANDRIUSHCHENKO,
    help="unnormalized SAM (eps = rho g)", default_rho=0.05,
    knobs=dict(normalize=False, stable=False, adaptive=False),
))  # fmt: skip
register(Variant(
    name="ssam-usam", label="StableSAM on USAM (paper's SSAM)", color="C2", paper=_TAN,
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
    """Registers `variant` and its StableSAM form ``ssam-<name>`` (stable=True)."""
    register(variant)
    register(dataclasses.replace(
        variant, name=f"ssam-{variant.name}", label=f"StableSAM on {variant.label}",
        color=stable_color, help=f"StableSAM on {variant.label}",
        knobs={**variant.knobs, "stable": True},
    ))  # fmt: skip


_register_with_stable_form(Variant(
    name="gsam", label="GSAM", color="C6", paper=_ZHUANG,
    help="surrogate gap guided SAM: g_p - alpha (g - <g, n(g_p)> n(g_p)) (--gsam-alpha)",
    default_rho=0.05, factory=sam_optax.gsam,
    config_fields={**_ETA, "alpha": "gsam_alpha"},
), stable_color="#8c564b")  # fmt: skip
_register_with_stable_form(Variant(
    name="looksam", label="LookSAM", color="C7", paper=_LIU,
    help="SAM every k steps, the reused orthogonal part in between (--looksam-k, "
    "--looksam-alpha)",
    default_rho=0.05, factory=sam_optax.looksam,
    config_fields={**_ETA, "k": "looksam_k", "alpha": "looksam_alpha"},
), stable_color="#7f7f7f")  # fmt: skip
_register_with_stable_form(Variant(
    name="fsam", label="Friendly SAM", color="C8", paper=_LI_FSAM,
    help="Friendly SAM: ascent along g minus its EMA (--fsam-sigma, --fsam-lambda)",
    default_rho=0.05, factory=sam_optax.friendly_sam,
    config_fields={**_ETA, "sigma": "fsam_sigma", "lmbda": "fsam_lambda"},
), stable_color="#bcbd22")  # fmt: skip
_register_with_stable_form(Variant(
    name="vasso", label="VaSSO", color="C9", paper=_LI_VASSO,
    help="variance-suppressed SAM: ascent along an EMA of g (--vasso-theta)",
    default_rho=0.05, factory=sam_optax.vasso,
    config_fields={**_ETA, "theta": "vasso_theta"},
), stable_color="#17becf")  # fmt: skip
