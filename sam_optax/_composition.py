"""How sam-optax transformations meet optax's wrappers: checks made when the step traces.

A sam-optax transformation needs the gradient (not an update), the full parameters the gradient
was taken at, and `grad_fn`. The wrappers that hide one of them are recognized here and refused
(or warned about) with the call to write instead; `optax.lookahead` behind sam is unwrapped to its
fast weights. Every check runs in Python when the step traces, so it costs nothing at run time,
except two: :func:`check_input_gradient`, opt-in, and the chain-order check of
:class:`ChainOrderStep` (a descent transformation in front), on by default, which compares the
incoming updates with the perturbed gradient the ascent computes anyway, on the first step.
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from collections.abc import Callable, Hashable, Iterator, Sequence
from types import CodeType, FrameType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# --------------------------------------------------------------------------------------------
# Who is calling: optax's wrappers and Flax's TrainState, recognized by their code objects on the
# call stack (Python runs them when the step traces, also under jax.jit).
# --------------------------------------------------------------------------------------------


@functools.cache
def _wrapper_codes() -> dict[str, CodeType]:
    """The code objects of the `update` of the optax wrappers that sam cannot run inside."""
    codes = {}
    wrappers: dict[str, Callable[[], Any]] = {
        "lookahead": lambda: optax.lookahead(optax.identity(), sync_period=1, slow_step_size=0.5),
        "apply_if_finite": lambda: optax.apply_if_finite(optax.identity(), 1),
    }
    for name, build in wrappers.items():
        code = getattr(build().update, "__code__", None)
        if code is not None:
            codes[name] = code
    return codes


def _frames(start: FrameType | None) -> Iterator[FrameType]:
    frame = start
    while frame is not None:
        yield frame
        frame = frame.f_back


def _inside(name: str) -> bool:
    """Whether the `update` of the optax wrapper `name` is on the call stack."""
    code = _wrapper_codes().get(name)
    return code is not None and any(f.f_code is code for f in _frames(sys._getframe(1)))


def _inside_flax_apply_gradients() -> bool:
    """Whether flax.training.train_state.TrainState.apply_gradients is on the call stack (it
    calls ``tx.update(grads, opt_state, params)`` and keeps its keywords for ``replace``)."""
    return any(
        f.f_code.co_name == "apply_gradients"
        and f.f_globals.get("__name__") == "flax.training.train_state"
        for f in _frames(sys._getframe(1))
    )


def missing_grad_fn_hint() -> str | None:
    """Where `grad_fn` was lost when a wrapper we know called `update` without it, else None."""
    if _inside_flax_apply_gradients():
        return (
            "flax.training.train_state.TrainState.apply_gradients does not pass grad_fn to "
            "tx.update (it takes its keywords for fields to replace), so the grad_fn you gave it "
            "never arrives. Use sam_optax.linen.TrainState, which forwards it:\n"
            "    state = sam_optax.linen.TrainState.create(apply_fn=..., params=params, tx=tx)\n"
            "    state = state.apply_gradients(grads=grads, grad_fn=grad_fn)"
        )
    if _inside("lookahead"):
        return (
            "optax.lookahead around a sam-optax transformation calls it without grad_fn "
            "(lookahead is a plain GradientTransformation). Put lookahead around the base "
            "optimizer, behind sam, which then perturbs the fast weights:\n"
            "    optax.chain(sam_optax.sam(rho), optax.lookahead(optax.sgd(lr), sync_period=5, "
            "slow_step_size=0.5))"
        )
    return None


# --------------------------------------------------------------------------------------------
# The checks.
# --------------------------------------------------------------------------------------------


def _is_masked_node(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def check_not_masked(updates: Any, params: Any, call: str = "sam") -> None:
    """Raises if `updates` or `params` hold `optax.MaskedNode`s (`optax.masked` or
    `optax.multi_transform` around the transformation): the ascent's norm and the second
    gradient need every parameter."""
    for tree in (updates, params):
        if tree is None:
            continue
        if any(map(_is_masked_node, jax.tree.leaves(tree, is_leaf=_is_masked_node))):
            raise ValueError(
                f"sam_optax.{call} got a masked subtree (optax.MaskedNode leaves): it runs inside "
                "optax.masked or optax.multi_transform, but SAM needs the full parameters (its "
                "ascent is normalized over all of them and grad_fn takes all of them). Put it "
                f"first, outside, and restrict the ascent with perturb_mask, e.g.\n"
                f"    optax.chain(sam_optax.{call}(rho, perturb_mask=mask), "
                "optax.multi_transform(transforms, labels))\n"
                f"or optax.chain(sam_optax.{call}(rho, perturb_mask=mask), base_optimizer) in "
                "place of optax.masked."
            )


def check_grad_fn_arity(grad_fn: Callable[..., Any], n_args: int = 1, call: str = "sam") -> None:
    """Raises a TypeError naming the fix if `grad_fn` cannot take `n_args` positional
    arguments (the params, and with `micro_batches` one micro-batch)."""
    try:
        signature = inspect.signature(grad_fn)
    except (TypeError, ValueError):
        return  # Builtins and some C callables have no signature; the call itself will tell.
    try:
        signature.bind(*([None] * n_args))
    except TypeError:
        pass
    else:
        return
    if n_args == 1:
        raise TypeError(
            f"sam_optax.{call} calls grad_fn(params), with the params only, but this grad_fn "
            f"takes {signature}. optax.contrib.sam's grad_fn(params, i) becomes "
            "grad_fn=lambda p: grad_fn(p, 0); a loss's other arguments go into a closure, "
            "e.g. grad_fn=lambda p: jax.grad(loss_fn)(p, batch)."
        )
    raise TypeError(
        f"with micro_batches, sam_optax.{call} calls grad_fn(params, micro_batch), but this "
        f"grad_fn takes {signature}; e.g. grad_fn=lambda p, b: jax.grad(loss_fn)(p, b)."
    )


def lookahead_fast_params(params: Any, updates: Any = None) -> Any:
    """The fast weights when `params` is an `optax.LookaheadParams` (lookahead behind sam in
    the chain: the gradient is taken at the fast weights), else `params`."""
    lookahead_params = getattr(optax, "LookaheadParams", None)
    if lookahead_params is None or not isinstance(params, lookahead_params):
        return params
    if updates is not None and jax.tree.structure(updates) != jax.tree.structure(params.fast):
        return params  # Not a gradient of the fast weights: the structure check will say so.
    return params.fast


_APPLY_IF_FINITE_WARNING = (
    "sam_optax.{call} inside optax.apply_if_finite: apply_if_finite checks the gradient given to "
    "it, not the SAM gradient, which is taken at w + eps and can be NaN where the gradient at w "
    "is finite; such a step is applied. Put apply_if_finite around the base optimizer, behind "
    "sam: optax.chain(sam_optax.{call}(rho), optax.apply_if_finite(base_optimizer, "
    "max_consecutive_errors=5))."
)


def check_inputs(
    updates: Any,
    params: Any,
    grad_fn: Callable[..., Any] | None,
    *,
    call: str = "sam",
    micro_batches: Any = None,
) -> Any:
    """The trace-time checks of a sam-optax `update` against the wrappers around it.

    Raises a TypeError when a known wrapper (Flax's `TrainState.apply_gradients`,
    `optax.lookahead`) dropped `grad_fn`, or when `grad_fn` cannot be called as the
    transformation calls it; a ValueError inside `optax.masked`/`optax.multi_transform`. Warns
    inside `optax.apply_if_finite`. A missing `grad_fn` or `params` with no known cause is left to
    the caller's own message.

    Returns:
      The params the ascent perturbs: the fast weights of an `optax.LookaheadParams`, else
      `params`.
    """
    if grad_fn is None:
        hint = missing_grad_fn_hint()
        if hint is not None:
            raise TypeError(f"sam_optax.{call}'s update needs grad_fn, and got none. {hint}")
        return params
    check_not_masked(updates, params, call)
    check_grad_fn_arity(grad_fn, 1 if micro_batches is None else 2, call)
    if _inside("apply_if_finite"):
        warnings.warn(_APPLY_IF_FINITE_WARNING.format(call=call), stacklevel=4)
    return lookahead_fast_params(params, updates)


# --------------------------------------------------------------------------------------------
# check_input_gradient: the incoming gradient against grad_fn(params), on the first step.
# --------------------------------------------------------------------------------------------

# Relative tolerance on the global L2 norm of the difference: above the rounding of a gradient
# evaluated twice (also in bfloat16), far below what a transformation in front of sam changes.
INPUT_GRADIENT_RTOL = 1e-2


def _input_gradient_error(call: str, relative_difference: float) -> ValueError:
    return ValueError(
        f"sam_optax.{call}(check_input_gradient=True): on the first step the incoming updates "
        f"differ from grad_fn(params) (relative L2 difference {relative_difference:.3g}). A "
        "transformation in front of sam in the chain turns the gradient into an update "
        "(momentum, Adam, a learning rate); sam must come first, e.g. "
        f"optax.chain(sam_optax.{call}(rho), optax.sgd(0.1, momentum=0.9)). If the difference "
        "is intended (e.g. gradient clipping in front), drop check_input_gradient."
    )


def _relative_difference(updates: Any, reference: Any) -> jax.Array:
    """||updates - reference|| / ||reference|| in float32 (0 where both are 0; NaN passes)."""
    leaves = jax.tree.leaves(updates)
    ref_leaves = jax.tree.leaves(reference)
    diff = sum(
        jnp.sum(jnp.square(jnp.asarray(u, jnp.float32) - jnp.asarray(r, jnp.float32)))
        for u, r in zip(leaves, ref_leaves, strict=True)
    )
    norm = sum(jnp.sum(jnp.square(jnp.asarray(r, jnp.float32))) for r in ref_leaves)
    diff, norm = jnp.sqrt(jnp.asarray(diff)), jnp.sqrt(jnp.asarray(norm))
    return jnp.where(norm > 0, diff / jnp.where(norm > 0, norm, 1.0), jnp.where(diff > 0, 1.0, 0.0))


def check_input_gradient(
    updates: Any,
    params: Any,
    grad_fn: Callable[[Any], Any],
    count: jax.Array,
    *,
    call: str = "sam",
    axis_name: Hashable | Sequence[Hashable] | None = None,
) -> None:
    """On the first step (count == 0), raises if `updates` is not grad_fn(params).

    Outside `jax.jit` the check runs eagerly and raises a ValueError. Under `jax.jit` it is a
    `lax.cond` on the first step around one more evaluation of `grad_fn` and a
    `jax.debug.callback` that raises there; JAX reports that ValueError as a
    `jax.errors.JaxRuntimeError` carrying its message. The later steps skip it at run time.
    """
    if updates is None:
        return  # micro_batches: there is no incoming gradient to compare.
    if axis_name is not None:
        from sam_optax._parallel import per_device  # noqa: PLC0415

        params = per_device(params, axis_name)

    def relative_difference() -> jax.Array:
        return _relative_difference(updates, grad_fn(params))

    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((updates, params, count)))
    if not traced:
        if int(count) == 0:
            difference = float(relative_difference())
            if difference > INPUT_GRADIENT_RTOL:
                raise _input_gradient_error(call, difference)
        return

    def raise_if_different(difference: Any) -> None:
        if float(difference) > INPUT_GRADIENT_RTOL:
            raise _input_gradient_error(call, float(difference))

    def first_step() -> None:
        jax.debug.callback(raise_if_different, relative_difference())

    jax.lax.cond(jnp.asarray(count) == 0, first_step, lambda: None)


# --------------------------------------------------------------------------------------------
# The chain order, at no extra gradient evaluation: the incoming updates against the gradient at
# the perturbed weights, which the ascent computes anyway.
# --------------------------------------------------------------------------------------------

# A descent step u (-lr g, Adam's -lr m / sqrt(v), any positive per-coordinate scaling of -g)
# has the sign of -g in every coordinate where the step is not dominated by something else, and
# the gradient g_p at w + eps is close to g: so the signs of u and g_p disagree on nearly all of
# g_p's mass (agreement near -1) and <u, g_p> < 0. For a gradient u = g, g_p = g + O(rho) and the
# agreement is near +1. The check fires only when both hold: the agreement is below
# CHAIN_ORDER_AGREEMENT (g_p opposes u on at least 3/4 of its L1 mass) and <u, g_p> < 0. The sign
# test makes it blind to the preconditioner (the cosine of Adam's step with the gradient can be
# small); the inner product keeps it from firing where an ascent of any radius on a convex region
# moves the gradient's coordinates around: there <g, g_p> >= ||g||^2 for the L2 ascents, the
# unnormalized one included (g_p = (I + rho H) g).
CHAIN_ORDER_AGREEMENT = -0.5


def _real_leaves(tree: Any) -> list[jax.Array]:
    """The leaves in float32 (or float64), complex ones as their (Re, Im) pairs."""
    out = []
    for x in jax.tree.leaves(tree):
        x = jnp.asarray(x)
        if jnp.iscomplexobj(x):
            x = jnp.stack([x.real, x.imag], -1)
        out.append(x.astype(jnp.promote_types(x.dtype, jnp.float32)))
    return out


def chain_order_statistics(updates: Any, gradient: Any) -> jax.Array:
    """[<u, g_p>, agreement] of the incoming `updates` u and the `gradient` g_p at the perturbed
    weights, in float32, with agreement = <sign(u), g_p> / ||g_p||_1 (0 where g_p is 0). Three
    sums over the two gradients, which XLA fuses into one pass per leaf."""
    us, gs = _real_leaves(updates), _real_leaves(gradient)
    if not us:
        return jnp.zeros([2], jnp.float32)
    pairs = list(zip(us, gs, strict=True))
    dot = sum(jnp.sum(u * g) for u, g in pairs)
    signed = sum(jnp.sum(jnp.sign(u) * g) for u, g in pairs)
    mass = sum(jnp.sum(jnp.abs(g)) for g in gs)
    agreement = jnp.where(mass > 0, signed / jnp.where(mass > 0, mass, 1.0), 0.0)
    return jnp.stack([dot, agreement]).astype(jnp.float32)


def descent_in_front(statistics: Any) -> bool:
    """Whether chain_order_statistics says that the updates are a descent step (any of a batch
    of them, e.g. under `jax.vmap`). NaN (a non-finite step) never fires."""
    stats = np.asarray(statistics, np.float32).reshape(-1, 2)
    return bool(np.any((stats[:, 0] < 0) & (stats[:, 1] < CHAIN_ORDER_AGREEMENT)))


def chain_order_message(call: str, statistics: Any) -> str:
    agreement = float(np.min(np.asarray(statistics, np.float32).reshape(-1, 2)[:, 1]))
    return (
        f"sam_optax.{call} got updates that point against the gradient it evaluates at the "
        f"perturbed weights ({(1 - agreement) / 2:.0%} of that gradient has the opposite sign): "
        "they are a descent step, not a gradient, so a descent transformation (optax.adamw, "
        f"optax.sgd, ...) runs before {call} in the chain, and the update would climb the loss. "
        f"Put {call} first, e.g.\n"
        f"    optax.chain(sam_optax.{call}(...), optax.adamw(...))"
    )


class ChainOrderStep:
    """The chain-order check of one `update` call: whether the step is checked (`checked`, a
    bool, or a traced bool under `jax.jit`), and, for an `update` called outside `jax.jit`, the
    findings of the checks that ran traced anyway (in a `lax.cond` branch of a variant), raised
    by :meth:`finish`."""

    def __init__(self, call: str, checked: Any, eager: bool) -> None:
        self.call = call
        self.checked = checked
        self.eager = eager
        self.staged = False
        self.findings: list[str] = []

    def report(self, statistics: Any, checked: Any = True) -> None:
        """Host side of a traced check: a warning under `jax.jit`, a finding outside it. The
        callback gets jax Arrays: only numpy runs on them here (a JAX operation in a callback
        can wait on the dispatch of the program that called it)."""
        if not np.asarray(checked).any() or not descent_in_front(statistics):
            return
        message = chain_order_message(self.call, statistics)
        if self.eager:
            self.findings.append(message)
        else:
            warnings.warn(message, UserWarning, stacklevel=2)

    def check(self, updates: Any, gradient: Any) -> None:
        """Compares `updates` with the perturbed `gradient` on a checked step.

        Concrete values: a ValueError at once. Under `jax.jit`, the statistics (three scalars)
        go to a `jax.debug.callback` on every step, which warns on a checked step that fires.
        Skipping the work on the other steps would take a conditional in the program, and the
        compiled steps stay free of them (the training harness asserts it: XLA:CPU runs a
        convolution inside one much slower, jax-ml/jax#12868). Neither is free on a CPU: for a
        256-512-512-10 MLP at batch 128 on two busy cores, sam + sgd took 7.4 ms a step, about
        2 ms more with this check and about 1 ms more with a `lax.cond` on `checked` around it
        (0.13 ms, +0.4 ms and +0.15 ms for a 5k-parameter MLP). Outside `jax.jit`, in a
        variant's `lax.cond` branch, a callback records the finding for :meth:`finish`.
        """
        if not _is_traced(self.checked) and not self.checked:
            return
        statistics = chain_order_statistics(updates, gradient)
        if not _is_traced(statistics):
            if descent_in_front(statistics):
                raise ValueError(chain_order_message(self.call, statistics))
            return
        if self.eager:
            self.staged = True
        jax.debug.callback(self.report, statistics, self.checked)

    def finish(self) -> None:
        """Raises the first finding of the traced checks of an `update` called outside jit."""
        if self.staged:
            jax.effects_barrier()
        if self.findings:
            raise ValueError(self.findings[0])


def _is_traced(tree: Any) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))
