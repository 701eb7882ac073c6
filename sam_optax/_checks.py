"""The construction-time checks of the factories' arguments.

A traced value (e.g. a hyperparameter of `optax.inject_hyperparams`) passes; its value is known
only when the step runs.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

STABLE_NORMS = ("plain", "adaptive")


def concrete_float(value: Any) -> float | None:
    """The value as a float, or None when it is traced (its check happens at trace time)."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def check_args(*, rho: Any, eta: Any, ascent_norm: Any = None, ascent_steps: Any = None) -> None:
    """Checks rho, eta, ascent_norm and ascent_steps (None: the default norm and steps)."""
    if not callable(rho):
        rho_value = concrete_float(rho)
        if rho_value is not None and not (rho_value >= 0 and math.isfinite(rho_value)):
            raise ValueError(
                "rho must be a non-negative, finite float (0 turns SAM off) or an optax "
                f"schedule, got rho={rho!r}; e.g. sam_optax.sam(rho=0.05)."
            )
    eta_value = concrete_float(eta)
    if eta_value is not None and not (eta_value >= 0 and math.isfinite(eta_value)):
        raise ValueError(
            f"eta must be >= 0 and finite (ASAM's default is 0.01), got eta={eta!r}; "
            "e.g. sam_optax.asam(rho=0.5, eta=0.01)."
        )
    static_hint = (
        " With optax.inject_hyperparams, list it in static_args=('ascent_norm', 'ascent_steps'),"
        " e.g. optax.inject_hyperparams(sam_optax.sam, static_args=('ascent_norm',))"
        "(rho=0.05, ascent_norm=float('inf'))."
        if isinstance(ascent_norm, jax.Array) or isinstance(ascent_steps, jax.Array)
        else ""
    )
    if ascent_norm is not None and (
        isinstance(ascent_norm, bool)
        or not isinstance(ascent_norm, numbers.Real)
        or not float(ascent_norm) > 1
    ):
        raise ValueError(
            "ascent_norm is the p of the L-p ball of the ascent and must be a Python number > 1 "
            f"(2.0 for SAM, float('inf') for a sign/FGSM-style ascent), got {ascent_norm!r}."
            + static_hint
        )
    if ascent_steps is None:
        return
    if isinstance(ascent_steps, bool) or not isinstance(ascent_steps, numbers.Integral):
        raise TypeError(f"ascent_steps must be an int >= 1, got {ascent_steps!r}." + static_hint)
    if ascent_steps < 1:
        raise ValueError(f"ascent_steps must be >= 1 (1 is plain SAM), got {ascent_steps!r}.")


def check_stable_args(
    *, stable: bool, stable_max_scale: Any, stable_norm: str, call: str = "sam"
) -> None:
    """Checks StableSAM's keywords; `call` names the factory in the messages."""
    if stable_norm not in STABLE_NORMS:
        raise ValueError(
            f"stable_norm must be one of {STABLE_NORMS}, got {stable_norm!r}; e.g. "
            f"{call}(rho, stable=True, stable_norm='adaptive')."
        )
    if stable_max_scale is not None:
        cap = concrete_float(stable_max_scale)
        if cap is not None and not cap > 0:
            raise ValueError(
                "stable_max_scale caps StableSAM's factor ||g|| / ||g_SAM|| and must be > 0 "
                f"(1.0 is the official code's truncation), got {stable_max_scale!r}."
            )
    if not stable and (stable_max_scale is not None or stable_norm != "plain"):
        raise ValueError(
            "stable_max_scale and stable_norm set StableSAM's renormalization; pass "
            f"stable=True too, e.g. {call}(rho, stable=True, stable_max_scale=1.0)."
        )


def check_real(name: str, value: Any, *, low: float, high: float | None, hint: str) -> None:
    """value in [low, high] (or >= low without high) when it is known at construction."""
    if isinstance(value, jax.core.Tracer):
        return
    real = isinstance(value, (numbers.Real, jax.Array, np.ndarray))
    number = concrete_float(value) if real else None
    if number is None or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {value!r}. {hint}")
    if not (number >= low and (high is None or number <= high)):
        interval = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {interval}, got {value!r}. {hint}")


def check_count(name: str, value: Any, *, hint: str) -> None:
    """value is an integer >= 1 (a Python int or an integer scalar array) when it is known at
    construction."""
    if isinstance(value, jax.core.Tracer):
        return
    integer_array = hasattr(value, "dtype") and jnp.issubdtype(value.dtype, jnp.integer)
    if integer_array and jnp.ndim(value) == 0:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1, got {value!r}. {hint}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}. {hint}")
