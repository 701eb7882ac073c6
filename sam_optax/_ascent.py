"""The ascent every transformation of this library shares.

:class:`Ascent` holds the keywords that :func:`sam_optax.sam` and its variants share and does
what they mean: the construction-time argument checks (those of `_checks`), the trace-time
checks of `update`'s inputs (:meth:`Ascent.check_update_inputs`, the first call of every
`update`), rho and its schedule (a rho known at construction picks branches when tracing), the
perturbed gradient, the average over `axis_name` and StableSAM's renormalization.
:func:`with_shared_args` gives each variant's signature the shared keywords, with the defaults
of :class:`Ascent`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import math
import sys
import warnings
from collections.abc import Callable
from typing import Any, ForwardRef, TypedDict, TypeVar

import jax
import jax.numpy as jnp
import optax

from sam_optax import _composition, _parallel
from sam_optax import _tree as tree
from sam_optax._checks import check_args, check_stable_args, concrete_float
from sam_optax._grad_fn import MISSING_GRAD_FN, GradFn, evaluate_grad_fn
from sam_optax._parallel import AxisName, per_device

# A pytree of booleans shaped like the params (or a prefix of it), or a function of the params
# returning one. True marks the parameters that the ascent perturbs.
PerturbMask = Any | Callable[[optax.Params], Any]

# ascent_norm=None and ascent_steps=None (every factory's default) mean these. The defaults are
# None, not numbers, so that `optax.inject_hyperparams` does not turn them into arrays.
DEFAULT_ASCENT_NORM = 2.0
DEFAULT_ASCENT_STEPS = 1


def resolve_mask(perturb_mask: PerturbMask, params: optax.Params) -> Any:
    """One Python boolean per leaf of params (None: perturb every parameter)."""
    if perturb_mask is None:
        return None
    mask = perturb_mask(params) if callable(perturb_mask) else perturb_mask
    if any(isinstance(m, jax.core.Tracer) for m in jax.tree.leaves(mask)):
        raise TypeError(
            "perturb_mask must hold Python booleans (it decides the program's shape), got traced "
            "values. With optax.inject_hyperparams, list it in static_args, e.g. "
            "optax.inject_hyperparams(sam_optax.sam, static_args=('perturb_mask',))(rho=0.05, "
            "perturb_mask=mask)."
        )
    # Broadcast a prefix pytree of booleans to one boolean per leaf of params.
    mask = jax.tree.map(lambda m, p: jax.tree.map(lambda _: bool(m), p), mask, params)
    if jax.tree.leaves(params) and not any(jax.tree.leaves(mask)):
        raise ValueError(
            f"perturb_mask marks no parameter (it resolved to {perturb_mask!r} for every leaf), so "
            "the ascent would do nothing. With optax.inject_hyperparams, a function perturb_mask "
            "is taken for a schedule: list it in static_args, e.g. "
            "optax.inject_hyperparams(sam_optax.sam, static_args=('perturb_mask',))(rho=0.05, "
            "perturb_mask=fn)."
        )
    return mask


def inside_multi_steps() -> bool:
    """Whether `optax.MultiSteps.update` is on the call stack (checked when the step traces)."""
    code = getattr(getattr(getattr(optax, "MultiSteps", None), "update", None), "__code__", None)
    frame = sys._getframe(1)
    while frame is not None and code is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


# The chain-order check of the `update` call being traced (or run outside jit); see
# Ascent.checking_chain_order.
_CHAIN_ORDER_STEP: contextvars.ContextVar[_composition.ChainOrderStep | None] = (
    contextvars.ContextVar("sam_optax_chain_order_step", default=None)
)


MULTI_STEPS_WARNING = (
    "sam_optax.sam inside optax.MultiSteps: at every micro-batch the ascent starts from the "
    "running mean of the gradients and evaluates that micro-batch's grad_fn, and only the last "
    "call's result is kept, so the SAM gradient comes from the last micro-batch alone (neither SAM "
    "on the whole batch nor per-micro-batch SAM) and k - 1 second passes are wasted. Inside one "
    "step, use grad_fn=sam_optax.accumulate_grad_fn(per_batch_grad_fn, micro_batches) (the ascent "
    "from the mean gradient) or tx.update(None, state, params, grad_fn=per_batch_grad_fn, "
    "micro_batches=micro_batches) (one ascent per micro-batch)."
)


# --------------------------------------------------------------------------------------------
# The ascent's arithmetic.
# --------------------------------------------------------------------------------------------


def dual_direction(v: Any, p: float) -> Any:
    """d(v) = argmax over ||e||_p <= 1 of <v, e>, for a float32 pytree v; 0 where v is 0.

    p = 2: v / ||v||_2. p = inf: sign(v). Otherwise, with q = p / (p - 1):
    sign(v) |v|^(q-1) / ||v||_q^(q-1). Computed in the dtype of v (at least float32).
    """
    if p == 2:
        norm = tree.l2_norm(v)
        inv_norm = tree.safe_divide(jnp.ones([], norm.dtype), norm)
        return jax.tree.map(lambda x: x * inv_norm, v)
    if math.isinf(p):
        return jax.tree.map(jnp.sign, v)
    q = p / (p - 1.0)
    leaves = jax.tree.leaves(v)
    norm_q = sum(jnp.sum(jnp.abs(x) ** q) for x in leaves) ** (1.0 / q)
    # (|v| / ||v||_q)^(q-1) is |v|^(q-1) / ||v||_q^(q-1) without overflowing |v|^(q-1).
    return jax.tree.map(
        lambda x: jnp.sign(x) * tree.safe_divide(jnp.abs(x), norm_q) ** (q - 1.0), v
    )


def ascent_direction(
    grads: Any, params: Any, *, adaptive: bool, eta: Any, normalize: bool, ascent_norm: float, mask
) -> Any:
    """One ascent step of unit radius, at least float32: T d(T g) (normalized) or T T g (USAM).

    T = |w| + eta elementwise when adaptive (ASAM), else 1.
    """
    g = tree.apply_mask(tree.to_wide(grads), mask)
    if adaptive:
        scale = jax.tree.map(lambda w: jnp.abs(w) + eta, tree.to_wide(params))
        g = jax.tree.map(jnp.multiply, scale, g)
    direction = dual_direction(g, ascent_norm) if normalize else g
    if adaptive:
        direction = jax.tree.map(jnp.multiply, scale, direction)
    return tree.apply_mask(direction, mask)


def stable_rescale(g_out, g, params, eps, *, max_scale, norm: str):
    """StableSAM: g_out * min(max_scale, N(g) / N'(g_out)), in at least float32.

    N = N' = the L2 norm for norm="plain"; for "adaptive", N(v) = ||(|w|) v|| and
    N'(v) = ||(|w + eps|) v||, the norms of the official code's adaptive variants. NaN everywhere
    if a norm is not finite, so that a non-finite gradient is never rescaled away.
    """
    wide = tree.to_wide
    if norm == "adaptive":
        numerator = tree.l2_norm(jax.tree.map(lambda w, x: jnp.abs(wide(w)) * wide(x), params, g))
        denominator = tree.l2_norm(
            jax.tree.map(lambda w, e, x: jnp.abs(wide(w) + e) * wide(x), params, eps, g_out)
        )
    else:
        numerator, denominator = tree.l2_norm(g), tree.l2_norm(g_out)
    scale = tree.safe_divide(numerator, denominator)
    if max_scale is not None:
        scale = jnp.minimum(scale, jnp.asarray(max_scale, scale.dtype))
    finite = jnp.isfinite(numerator) & jnp.isfinite(denominator)
    return tree.nan_unless(finite, jax.tree.map(lambda x: (wide(x) * scale).astype(x.dtype), g_out))


def ascend(
    grads: Any,
    params: Any,
    grad_fn: GradFn | None,
    rho: Any,
    *,
    like: Any,
    adaptive: bool,
    eta: Any,
    normalize: bool,
    ascent_norm: float,
    ascent_steps: int,
    mask: Any,
    reduce_grads: Callable = lambda g: g,
    axis_name: AxisName | None = None,
    final_gradient: bool = True,
):
    """Runs the ascent from `grads` (already reduced); returns (eps, gradient at w + eps).

    eps_0 = 0, g_0 = g; eps_(i+1) = eps_i + (rho / k) step(g_i), g_(i+1) = reduce(grad_fn(w +
    eps_(i+1))). For k = 1: eps = rho step(g) and one gradient evaluation. The gradient at the
    final point is None when `final_gradient` is False (it is then not computed). eps is in the
    promoted dtype of the params and float32; the gradients have the structure and dtypes of
    `like`. Both are NaN everywhere when g or a gradient evaluated on the way has a non-finite
    element.
    """
    step = functools.partial(
        ascent_direction,
        params=params,
        adaptive=adaptive,
        eta=eta,
        normalize=normalize,
        ascent_norm=ascent_norm,
        mask=mask,
    )
    step_size = jnp.asarray(rho, tree.float_dtype(params)) / ascent_steps

    def gradient_at(eps):
        perturbed = tree.add_wide(params, eps)
        if axis_name is not None:
            perturbed = per_device(perturbed, axis_name)
        return tree.cast_like(evaluate_grad_fn(grad_fn, perturbed, like), like)

    def ascent_step(eps, g):
        return jax.tree.map(lambda e, d: e + step_size * d, eps, step(g))

    # A non-finite element in g (or in a gradient evaluated on the way) makes every output NaN:
    # some ascents would hide it otherwise (sign(inf) = 1, a NaN norm switching the ascent off).
    finite = tree.all_finite(grads)
    eps = jax.tree.map(lambda d: step_size * d, step(grads))
    if ascent_steps > 1:

        def body(_, carry):
            eps, finite = carry
            g = reduce_grads(gradient_at(eps))
            return ascent_step(eps, g), finite & tree.all_finite(g)

        eps, finite = jax.lax.fori_loop(1, ascent_steps, body, (eps, finite))
    if not final_gradient:
        return tree.nan_unless(finite, eps), None
    g_final = gradient_at(eps)
    finite = finite & tree.all_finite(g_final)
    return tree.nan_unless(finite, eps), tree.nan_unless(finite, g_final)


# --------------------------------------------------------------------------------------------
# The shared keywords and what they do.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ascent:
    """The keywords :func:`sam_optax.sam` and its variants share, and what they do.

    `call` names the factory in error messages. The variants keep the defaults of `normalize`,
    `ascent_norm` and `ascent_steps` (the normalized L2 ascent in one step).
    """

    call: str
    rho: Any
    # The defaults of the shared keywords (the signatures of the variants take theirs from here).
    adaptive: bool = False
    eta: Any = 0.01
    stable: bool = False
    stable_max_scale: Any = None
    stable_norm: str = "plain"
    axis_name: AxisName | None = None
    sync_ascent: bool = False
    perturb_mask: PerturbMask = None
    normalize: bool = True
    ascent_norm: float | None = None
    ascent_steps: int | None = None
    warn_inside_multi_steps: bool = False
    check_input_gradient: bool = False
    # The chain-order check (a descent transformation in front), on every factory whose perturbed
    # gradient can be compared with `updates` (see checking_chain_order); not a keyword.
    descent_check: bool = True

    @classmethod
    def from_arguments(cls, call: str, arguments: dict[str, Any], **overrides: Any) -> Ascent:
        """The Ascent of a factory from its arguments (its ``locals()``): the fields it names."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"call"}
        chosen = {name: value for name, value in arguments.items() if name in fields}
        return cls(call=call, **{**chosen, **overrides})

    def own_or_synced(self, mean_grads: Any, updates: Any) -> Any:
        """The gradient an ascent starts from: the averaged one with `sync_ascent`, else each
        device's own (the same thing without `axis_name`)."""
        return mean_grads if self.sync_ascent else updates

    def __post_init__(self) -> None:
        check_args(
            rho=self.rho, eta=self.eta, ascent_norm=self.ascent_norm, ascent_steps=self.ascent_steps
        )
        check_stable_args(
            stable=self.stable,
            stable_max_scale=self.stable_max_scale,
            stable_norm=self.stable_norm,
            call=self.call,
        )
        if self.sync_ascent and self.axis_name is None:
            raise ValueError(
                "sync_ascent=True averages gradients over `axis_name`; pass axis_name too, e.g. "
                f"{self.call}(rho, axis_name='data', sync_ascent=True)."
            )

    # -- rho --------------------------------------------------------------------------------

    @property
    def static_rho(self) -> float | None:
        """rho as a Python float when known at construction (picks branches when tracing); None
        for a schedule or a traced value (e.g. from `inject_hyperparams`: decided by lax.cond)."""
        if callable(self.rho) or isinstance(self.rho, jax.Array):
            return None
        return concrete_float(self.rho)

    def rho_at(self, count: jax.Array) -> Any:
        """rho at the step `count` (the number of earlier `update` calls)."""
        return self.rho(count) if callable(self.rho) else self.rho

    # -- update's inputs ----------------------------------------------------------------------

    def check_update_inputs(
        self,
        updates: Any,
        params: Any,
        grad_fn: Any,
        count: jax.Array,
        *,
        micro_batches: Any = None,
    ) -> optax.Params:
        """The trace-time checks of `update`'s inputs; every factory's `update` calls it first.

        `count` is the state's step count. Returns the params the ascent perturbs (`params`).
        """
        params = _composition.check_inputs(
            updates, params, grad_fn, call=self.call, micro_batches=micro_batches
        )
        if grad_fn is None:
            raise TypeError(MISSING_GRAD_FN)
        if params is None:
            raise ValueError(
                "sam_optax transformations need `params`: call tx.update(grads, state, params, "
                "grad_fn=...)."
            )
        if self.check_input_gradient:
            _composition.check_input_gradient(
                updates, params, grad_fn, count, call=self.call, axis_name=self.axis_name
            )
        if self.warn_inside_multi_steps and inside_multi_steps():
            warnings.warn(MULTI_STEPS_WARNING, stacklevel=3)
        resolve_mask(self.perturb_mask, params)
        self.check_complex(params)
        if micro_batches is None:
            if self.axis_name is not None:
                _parallel.check_per_device_gradient(updates, self.axis_name)
        elif self.sync_ascent:
            raise ValueError(
                "micro_batches gives every micro-batch its own ascent; sync_ascent=True asks "
                "for one ascent from the averaged gradient. For that (SAM on the whole "
                "batch), pass grad_fn=sam_optax.accumulate_grad_fn(per_batch_grad_fn, "
                "micro_batches) and no micro_batches."
            )
        return params

    def check_complex(self, params: optax.Params) -> None:
        """Complex parameters are supported where a step is the same step on the (Re, Im) pairs:
        the L2 ascent with plain norms. A ValueError names the keywords that break it."""
        if not any(jnp.iscomplexobj(x) for x in jax.tree.leaves(params)):
            return
        refused = [
            text
            for text, on in (
                ("adaptive=True", self.adaptive),
                (f"ascent_norm={self.ascent_norm!r}", self.ascent_norm not in (None, 2)),
                ("stable_norm='adaptive'", self.stable and self.stable_norm == "adaptive"),
            )
            if on
        ]
        if refused:
            raise ValueError(
                f"{self.call}({', '.join(refused)}) does not support complex parameters (it does "
                "not act on each as on its (Re, Im) pair): use the L2 ascent, e.g. "
                f"{self.call}(rho=0.05), or pass each complex parameter z as "
                "jnp.stack([z.real, z.imag], -1)."
            )

    # -- the chain order ----------------------------------------------------------------------

    def checked_step(self, count: Any) -> Any:
        """Whether the step `count` compares `updates` with the perturbed gradient: the first step
        (count == 0) and, with a rho schedule, a step whose previous rho was 0 (the first ascent
        of "SGD first, SAM late"). A bool, or a traced bool under `jax.jit`."""
        checked = jnp.asarray(count) == 0
        if callable(self.rho):
            previous = self.rho(jnp.maximum(jnp.asarray(count) - 1, 0))
            checked = checked | (jnp.asarray(previous) == 0)
        return checked if isinstance(checked, jax.core.Tracer) else bool(checked)

    @contextlib.contextmanager
    def checking_chain_order(self, updates: Any, count: Any):
        """The context of one `update` call in which :meth:`sam_gradient` checks the chain order:
        that `updates` is a gradient, not the step of a descent transformation in front.

        A descent step u points against the gradient g_p at the perturbed weights, which the
        ascent computes anyway; the criterion is `_composition.descent_in_front`. Outside
        `jax.jit` it raises a ValueError with the fix, on the checked steps
        (:meth:`checked_step`). Under `jax.jit` it warns with the same text from a
        `jax.debug.callback`, which gets three scalars at every step and reports on the checked
        ones (`_composition.ChainOrderStep.check` says why not a `lax.cond`). The first step
        suffices: there a descent step in front is -lr g or Adam's -lr g / |g|, whose signs are
        those of -g exactly; later steps of a legitimate run are not put at risk. Nothing is
        checked without `updates` (micro_batches, momentum_sam's one pass) or on a step whose rho
        is 0 (no g_p).
        """
        if not self.descent_check or updates is None:
            yield
            return
        eager = not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(updates))
        step = _composition.ChainOrderStep(self.call, self.checked_step(count), eager)
        token = _CHAIN_ORDER_STEP.set(step)
        try:
            yield
        finally:
            _CHAIN_ORDER_STEP.reset(token)
        step.finish()

    def transformation(
        self, init_fn: Callable[[optax.Params], Any], update: Callable[..., tuple[Any, Any]]
    ) -> optax.GradientTransformationExtraArgs:
        """A variant's optax transformation: `init_fn`, and an ``update_fn(updates, state,
        params=None, *, grad_fn=None, **extra_args)`` that runs :meth:`check_update_inputs` (with
        the state's step count) and then ``update(updates, state, params, grad_fn)``."""

        def update_fn(
            updates: optax.Updates | None,
            state: Any,
            params: optax.Params | None = None,
            *,
            grad_fn: GradFn | None = None,
            **extra_args: Any,
        ) -> tuple[optax.Updates, Any]:
            del extra_args
            params = self.check_update_inputs(updates, params, grad_fn, state.count)
            with self.checking_chain_order(updates, state.count):
                return update(updates, state, params, grad_fn)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

    # -- the perturbed gradient ---------------------------------------------------------------

    def average(self, values: Any) -> Any:
        """The mean over `axis_name` (the values themselves without one)."""
        return _parallel.average(values, self.axis_name)

    @property
    def needs_eps(self) -> bool:
        """Whether the output reads eps (StableSAM's adaptive norms)."""
        return self.stable and self.stable_norm == "adaptive"

    def typed_eps(self, eps: Any) -> Any:
        """eps in float32, typed as varying over `axis_name` (both branches of a cond agree);
        None when nothing reads it."""
        if not self.needs_eps:
            return None
        eps = tree.to_wide(eps)
        return eps if self.axis_name is None else per_device(eps, self.axis_name)

    def no_eps(self, params: Any) -> Any:
        """The eps of a step without ascent (None when nothing reads it)."""
        return self.typed_eps(jax.tree.map(jnp.zeros_like, params))

    def sam_gradient(self, direction: Any, like: Any, params: Any, grad_fn: GradFn, rho: Any):
        """(the local gradient at w + eps, eps) for the ascent from `direction`.

        The gradient has the structure and dtypes of `like`; it is NaN everywhere where
        `direction`, `like` or a gradient the ascent evaluates is not finite (the normalization
        would otherwise turn it into eps = 0 and hide it from optax.apply_if_finite).
        """
        eps, g_p = ascend(
            direction,
            params,
            grad_fn,
            rho,
            like=like,
            adaptive=self.adaptive,
            eta=self.eta,
            normalize=self.normalize,
            ascent_norm=DEFAULT_ASCENT_NORM if self.ascent_norm is None else self.ascent_norm,
            ascent_steps=DEFAULT_ASCENT_STEPS if self.ascent_steps is None else self.ascent_steps,
            mask=resolve_mask(self.perturb_mask, params),
            reduce_grads=self.average if self.sync_ascent else (lambda g: g),
            axis_name=self.axis_name,
        )
        step = _CHAIN_ORDER_STEP.get()
        if step is not None:  # Inside `update`, with `updates` to compare (the gradient `like`).
            step.check(like, g_p)
        return tree.nan_unless(tree.all_finite(like), g_p), self.typed_eps(eps)

    def perturbed_gradient(self, direction: Any, like: Any, params: Any, grad_fn: GradFn, rho: Any):
        """:meth:`sam_gradient`, or (like, 0) where rho is 0 without evaluating `grad_fn` at
        run time (`lax.cond` when rho is only known then)."""
        if self.static_rho == 0:
            return like, self.no_eps(params)
        if self.static_rho is not None:
            return self.sam_gradient(direction, like, params, grad_fn, rho)
        return jax.lax.cond(
            jnp.asarray(rho) > 0,
            lambda: self.sam_gradient(direction, like, params, grad_fn, rho),
            lambda: (like, self.no_eps(params)),
        )

    def rescale(self, out: Any, mean_grads: Any, params: Any, eps: Any) -> Any:
        """StableSAM's renormalization of the output (a no-op unless `stable`); `eps` is each
        device's own, averaged here."""
        if not self.stable:
            return out
        if self.stable_norm == "adaptive":
            eps = self.average(eps)
        return stable_rescale(
            out, mean_grads, params, eps, max_scale=self.stable_max_scale, norm=self.stable_norm
        )


def zero_buffers(params: optax.Params) -> optax.Updates:
    """The zero buffers of a variant's state (init's one use of the params): zeros shaped like
    the params, each in its wide dtype."""
    return tree.zeros_wide(_composition.lookahead_fast_params(params))


SHARED_ARGS_DOC = """
      adaptive: scale the ascent by T = |w| + eta (ASAM): eps = rho T n(T d) instead of
        rho n(d), d being the variant's ascent direction.
      eta: the offset of ASAM's T; ignored unless `adaptive`. Defaults to 0.01.
      stable: renormalize the output to the norm of the gradient (StableSAM), as in
        :func:`sam_optax.sam`, with `stable_max_scale` and `stable_norm` as there.
      stable_max_scale: with `stable`, cap the factor at this value (None: no cap).
      stable_norm: with `stable`, "plain" (L2 norms) or "adaptive" (the official StableSAM
        code's weighted norms ||(|w|) g|| / ||(|w + eps|) out||).
      axis_name: inside `jax.shard_map`/`jax.pmap`, the data-parallel axis; `updates` is each
        device's own gradient (see :func:`sam_optax.per_device`). Each device perturbs its weights
        along its own direction (m-sharpness) and the transformation averages over the axis.
      perturb_mask: pytree of booleans (or a function of the params returning one) marking the
        parameters to perturb, as in :func:`sam_optax.sam`.
      sync_ascent: with `axis_name`, build the ascent direction from the averaged gradient, so
        every device uses the same eps.
      check_input_gradient: on the first step, raise a ValueError if `updates` differs from
        grad_fn(params) (a transformation in front of it in the chain), as in
        :func:`sam_optax.sam`. A descent transformation in front is caught without it, from the
        perturbed gradient; this also sees a scaling or clipping. Costs one more `grad_fn`
        evaluation on the first step.
"""


class OnePassArgs(TypedDict, total=False):
    """The keywords of :func:`sam_optax.momentum_sam`, which every variant takes (see
    :data:`SHARED_ARGS_DOC`); their defaults are those of :class:`Ascent`."""

    adaptive: bool
    eta: float | jax.Array
    stable: bool
    stable_max_scale: float | jax.Array | None
    stable_norm: str
    axis_name: AxisName | None
    perturb_mask: PerturbMask


class SharedArgs(OnePassArgs, total=False):
    """The keywords that every variant with a perturbed-gradient pass takes."""

    sync_ascent: bool
    check_input_gradient: bool


def _spelled(hint: Any) -> Any:
    """An annotation as written (a TypedDict holds postponed annotations as ForwardRefs)."""
    return hint.__forward_arg__ if isinstance(hint, ForwardRef) else hint


Factory = TypeVar("Factory", bound=Callable[..., optax.GradientTransformationExtraArgs])


def with_shared_args(keywords: type = SharedArgs) -> Callable[[Factory], Factory]:
    """Gives a variant factory written as ``def variant(own args, *, **shared)`` the explicit
    signature ``variant(own args, *, adaptive=False, eta=0.01, ...)``: the keywords of
    `keywords`, with the defaults of :class:`Ascent`.

    `inspect.signature` (hence `optax.inject_hyperparams`, `help` and the docs) shows every
    keyword, and a type checker sees them through ``**shared: Unpack[SharedArgs]``. The call binds
    that signature (an unknown keyword is a TypeError, as for any function) and passes the factory
    every shared keyword. The docstring's ``{shared_args}`` line becomes :data:`SHARED_ARGS_DOC`.
    """
    KEYWORD_ONLY = inspect.Parameter.KEYWORD_ONLY
    defaults = {field.name: field.default for field in dataclasses.fields(Ascent)}
    shared = [
        inspect.Parameter(name, KEYWORD_ONLY, default=defaults[name], annotation=_spelled(hint))
        for name, hint in keywords.__annotations__.items()
    ]

    def decorate(factory: Factory) -> Factory:
        own = inspect.signature(factory).parameters.values()
        named = [p for p in own if p.kind is not inspect.Parameter.VAR_KEYWORD]
        signature = inspect.signature(factory).replace(parameters=named + shared)

        @functools.wraps(factory)
        def with_every_keyword(*args: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as error:  # Name the factory, as Python does for its own calls.
                raise TypeError(f"{factory.__name__}() {error}") from None
            bound.apply_defaults()
            return factory(**bound.arguments)

        with_every_keyword.__signature__ = signature  # type: ignore[attr-defined]
        with_every_keyword.__doc__ = factory.__doc__.replace(
            "      {shared_args}\n", SHARED_ARGS_DOC[1:]
        )
        return with_every_keyword  # type: ignore[return-value]

    return decorate
