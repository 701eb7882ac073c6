"""Variants of SAM that change the ascent direction or the output: GSAM, LookSAM, Friendly SAM
and VaSSO, as Optax gradient transformations in the style of :func:`sam_optax.sam`.

Notation: g = the gradient at w (`updates`), n(v) = v / ||v||_2 (0 for v = 0), g_p = the gradient
at w + eps. Norms and inner products are global over the pytree and accumulated in float32 (or
the parameters' dtype if wider).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax import _composition
from sam_optax._sam import (
    _MISSING_GRAD_FN,
    AxisName,
    GradFn,
    PerturbMask,
    _add,
    _all_finite,
    _ascend,
    _cast_like,
    _check_args,
    _check_per_device_gradient,
    _check_stable_args,
    _concrete_float,
    _evaluate_grad_fn,
    _l2_norm,
    _nan_unless,
    _resolve_mask,
    _safe_divide,
    _stable_rescale,
    _typed_eps,
    per_device,
)
from sam_optax._typing import Schedule

# --------------------------------------------------------------------------------------------
# States.
# --------------------------------------------------------------------------------------------


class GSAMState(NamedTuple):
    """State of :func:`gsam`: the number of `update` calls so far (drives rho schedules)."""

    count: jax.Array


class LookSAMState(NamedTuple):
    """State of :func:`looksam`: the step count and g_v, the component of the last SAM gradient
    orthogonal to the gradient (of the averaged gradients, with `axis_name`)."""

    count: jax.Array
    g_v: optax.Updates


class FriendlySAMState(NamedTuple):
    """State of :func:`friendly_sam`: the step count and m, the exponential moving average of
    the gradients (of the averaged gradients, with `axis_name`)."""

    count: jax.Array
    m: optax.Updates


class VaSSOState(NamedTuple):
    """State of :func:`vasso`: the step count and d, the exponential moving average of the
    gradients that sets the ascent direction (of the averaged gradients, with `axis_name`)."""

    count: jax.Array
    d: optax.Updates


# --------------------------------------------------------------------------------------------
# Shared machinery.
# --------------------------------------------------------------------------------------------


def _call_grad_fn(grad_fn: GradFn, perturbed: optax.Params, like: optax.Updates):
    """Every evaluation of `grad_fn` in this module goes through here (one place for checks)."""
    return _cast_like(_evaluate_grad_fn(grad_fn, perturbed, like), like)


def _wide(dtype) -> jnp.dtype:
    """float32, or the given dtype if it is a wider float."""
    return jnp.promote_types(dtype, jnp.float32)


def _to_wide(tree):
    return jax.tree.map(lambda x: jnp.asarray(x).astype(_wide(jnp.asarray(x).dtype)), tree)


def _inner(a, b) -> jax.Array:
    """<a, b> over two pytrees of the same structure, accumulated in float32 or wider."""
    leaves = [
        jnp.sum(x.astype(_wide(x.dtype)) * y.astype(_wide(y.dtype)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return sum(leaves) if leaves else jnp.zeros([], jnp.float32)


def _projection_coefficient(v, u):
    """<v, u> / ||u||^2 (0 for u = 0): v - c u is the part of v orthogonal to u. Written with
    the two sums over the same arrays and no normalized copy of u, so that a whole projection
    costs one reduction pass and one elementwise pass over the parameters."""
    return _safe_divide(_inner(v, u), _inner(u, u))


def _axpby(a, x, b, y):
    """a * x + b * y, leaf by leaf, for scalars a and b."""
    return jax.tree.map(
        lambda xi, yi: jnp.asarray(a, xi.dtype) * xi + jnp.asarray(b, yi.dtype) * yi, x, y
    )


def _axpy(a, x, y):
    """a * x + y, leaf by leaf, for a scalar a."""
    return jax.tree.map(lambda xi, yi: jnp.asarray(a, xi.dtype) * xi + yi, x, y)


def _zero_buffers(params):
    """Zeros shaped like the params, in float32 or the params' dtype if wider."""
    params = _composition.lookahead_fast_params(params)
    return jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), _wide(jnp.asarray(w).dtype)), params)


def _check_real(name: str, value: Any, low: float, high: float | None, hint: str) -> None:
    """value in [low, high] (or >= low without high) when it is known at construction."""
    if isinstance(value, jax.core.Tracer):
        return
    real = isinstance(value, (numbers.Real, jax.Array, np.ndarray))
    number = _concrete_float(value) if real else None
    if number is None or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {value!r}. {hint}")
    if not (number >= low and (high is None or number <= high)):
        interval = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {interval}, got {value!r}. {hint}")


@dataclasses.dataclass(frozen=True)
class _Ascent:
    """The keywords the variants share with :func:`sam_optax.sam`, and what they do."""

    rho: Any
    adaptive: bool
    eta: Any
    stable: bool
    stable_max_scale: Any
    stable_norm: str
    axis_name: AxisName | None
    sync_ascent: bool
    perturb_mask: PerturbMask
    call: str
    check_input_gradient: bool = False

    def check(self) -> None:
        _check_args(self.rho, self.eta, 2.0, 1)
        _check_stable_args(self.stable, self.stable_max_scale, self.stable_norm, self.call)
        if self.sync_ascent and self.axis_name is None:
            raise ValueError(
                "sync_ascent=True averages gradients over `axis_name`; pass axis_name too, e.g. "
                f"{self.call}(rho, axis_name='data', sync_ascent=True)."
            )

    @property
    def static_rho(self) -> float | None:
        """rho as a Python float when known at construction (picks branches when tracing)."""
        if callable(self.rho) or isinstance(self.rho, jax.Array):
            return None
        return _concrete_float(self.rho)

    def rho_at(self, count: jax.Array):
        return self.rho(count) if callable(self.rho) else self.rho

    def average(self, tree):
        return tree if self.axis_name is None else jax.lax.pmean(tree, self.axis_name)

    def check_call(self, updates, params, grad_fn, count):
        """The checks of `update`'s arguments; returns the params the ascent perturbs."""
        params = _composition.check_inputs(updates, params, grad_fn, call=self.call)
        if grad_fn is None:
            raise TypeError(_MISSING_GRAD_FN)
        if params is None:
            raise ValueError(
                "sam_optax transformations need `params`: call tx.update(grads, state, params, "
                "grad_fn=...)."
            )
        if self.axis_name is not None:
            _check_per_device_gradient(updates, self.axis_name)
        if self.check_input_gradient:
            _composition.check_input_gradient(
                updates, params, grad_fn, count, call=self.call, axis_name=self.axis_name
            )
        return params

    @property
    def needs_eps(self) -> bool:
        return self.stable and self.stable_norm == "adaptive"

    def no_eps(self, params):
        """The eps of a step without ascent (None when nothing reads it)."""
        if not self.needs_eps:
            return None
        return _typed_eps(jax.tree.map(jnp.zeros_like, params), self.axis_name)

    def second_pass(self, direction, updates, params, grad_fn, rho):
        """(the local gradient at w + eps, eps) with eps = rho T n(T direction); eps is None
        when nothing reads it."""
        eps, _ = _ascend(
            direction,
            params,
            None,
            rho,
            adaptive=self.adaptive,
            eta=self.eta,
            normalize=True,
            ascent_norm=2.0,
            ascent_steps=1,
            mask=_resolve_mask(self.perturb_mask, params),
            final_gradient=False,
        )
        perturbed = _add(params, eps)
        if self.axis_name is not None:
            perturbed = per_device(perturbed, self.axis_name)
        g_p = _call_grad_fn(grad_fn, perturbed, updates)
        # A non-finite gradient or direction must reach the output (the ascent's normalization
        # would otherwise turn it into eps = 0 and hide it from optax.apply_if_finite).
        g_p = _nan_unless(_all_finite((direction, updates, g_p)), g_p)
        return g_p, (_typed_eps(eps, self.axis_name) if self.needs_eps else None)

    def perturbed_gradient(self, direction, updates, params, grad_fn, rho):
        """:meth:`second_pass`, or (updates, 0) where rho is 0 without evaluating `grad_fn` at
        run time (`lax.cond` when rho is only known then)."""
        if self.static_rho == 0:
            return updates, self.no_eps(params)
        if self.static_rho is not None:
            return self.second_pass(direction, updates, params, grad_fn, rho)
        return jax.lax.cond(
            jnp.asarray(rho) > 0,
            lambda: self.second_pass(direction, updates, params, grad_fn, rho),
            lambda: (updates, self.no_eps(params)),
        )

    def rescale(self, out, mean_grads, params, eps):
        """StableSAM's renormalization of the output (a no-op unless `stable`)."""
        if not self.stable:
            return out
        if self.stable_norm == "adaptive":
            eps = self.average(eps)
        return _stable_rescale(
            out, mean_grads, params, eps, max_scale=self.stable_max_scale, norm=self.stable_norm
        )


def _ascent(call: str, **kwargs: Any) -> _Ascent:
    ascent = _Ascent(call=call, **kwargs)
    ascent.check()
    return ascent


_SHARED_ARGS_DOC = """
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
      sync_ascent: with `axis_name`, build the ascent direction from the averaged gradient, so
        every device uses the same eps.
      perturb_mask: pytree of booleans (or a function of the params returning one) marking the
        parameters to perturb, as in :func:`sam_optax.sam`.
      check_input_gradient: on the first step, raise a ValueError if `updates` differs from
        grad_fn(params) (a transformation in front of it in the chain), as in
        :func:`sam_optax.sam`. Costs one more `grad_fn` evaluation on the first step.
"""


def _with_shared_args(function: Callable) -> Callable:
    function.__doc__ = function.__doc__.replace("      {shared_args}\n", _SHARED_ARGS_DOC[1:])
    return function


# --------------------------------------------------------------------------------------------
# GSAM.
# --------------------------------------------------------------------------------------------


@_with_shared_args
def gsam(
    rho: float | jax.Array | Schedule = 0.05,
    alpha: float | jax.Array = 0.1,
    *,
    minimize_perturbed: bool = True,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    stable: bool = False,
    stable_max_scale: float | jax.Array | None = None,
    stable_norm: str = "plain",
    axis_name: AxisName | None = None,
    sync_ascent: bool = False,
    perturb_mask: PerturbMask = None,
    check_input_gradient: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Surrogate gap guided SAM (GSAM): SAM plus a descent step on the surrogate gap.

    With eps = rho n(g) and g_p the gradient at w + eps:

    .. math::

      g_{\rm GSAM} = g_p - \alpha\, (g - \langle g, n(g_p) \rangle\, n(g_p))
      \quad\text{(minimize\_perturbed)}, \qquad
      g_{\rm GSAM} = g + \alpha\, (g_p - \langle g_p, n(g) \rangle\, n(g)) \quad\text{(otherwise)},

    i.e. the perturbed gradient minus alpha times the component of g orthogonal to it, which
    descends the surrogate gap L(w + eps) - L(w) without changing the descent of L(w + eps).
    alpha = 0 with `minimize_perturbed` is SAM exactly. Costs two passes per step (one where rho
    is 0, as for :func:`sam_optax.sam`). The paper ties rho to the learning rate: see
    :func:`gsam_rho_schedule`.

    With `axis_name` the decomposition uses the averaged g and the averaged g_p (the official
    big_vision code decomposes each worker's gradients before averaging).

    Example:

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda w: jnp.sum(w ** 2 * jnp.arange(1.0, 4.0))
      >>> params = jnp.ones(3)
      >>> tx = optax.chain(sam_optax.gsam(rho=0.05, alpha=0.1), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                            grad_fn=jax.grad(loss))
      >>> params = optax.apply_updates(params, updates)

    Args:
      rho: radius of the ascent, >= 0, or an optax schedule of the step count (e.g.
        :func:`gsam_rho_schedule`). Defaults to 0.05.
      alpha: weight of the surrogate-gap step, >= 0. Defaults to 0.1 (the paper searches
        0.01 to 0.3).
      minimize_perturbed: the paper's (and big_vision's default) form, which follows g_p;
        False gives the form that follows g and adds alpha times the part of g_p orthogonal
        to g (big_vision's ``minimize_fp=False``).
      {shared_args}

    Returns:
      An `optax.GradientTransformationExtraArgs` whose `update` needs `params` and
      `grad_fn(params) -> gradient pytree`, as :func:`sam_optax.sam`.

    References:
      Zhuang et al., `Surrogate Gap Guided Sharpness-Aware Minimization
      <https://arxiv.org/abs/2203.08065>`_, ICLR 2022 (official code: google-research/big_vision,
      ``big_vision/trainers/proj/gsam/gsam.py``).
    """
    ascent = _ascent(
        "gsam",
        rho=rho,
        adaptive=adaptive,
        eta=eta,
        stable=stable,
        stable_max_scale=stable_max_scale,
        stable_norm=stable_norm,
        axis_name=axis_name,
        sync_ascent=sync_ascent,
        perturb_mask=perturb_mask,
        check_input_gradient=check_input_gradient,
    )
    _check_real("alpha", alpha, 0.0, None, "E.g. gsam(rho=0.05, alpha=0.1).")

    def init_fn(params: optax.Params) -> GSAMState:
        del params
        return GSAMState(count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: optax.Updates,
        state: GSAMState,
        params: optax.Params | None = None,
        *,
        grad_fn: GradFn | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, GSAMState]:
        del extra_args
        params = ascent.check_call(updates, params, grad_fn, state.count)
        rho_now = ascent.rho_at(state.count)
        new_state = GSAMState(count=optax.safe_increment(state.count))
        g = ascent.average(updates)
        if ascent.static_rho == 0:
            return g, new_state
        g_p, eps = ascent.perturbed_gradient(
            g if sync_ascent else updates, updates, params, grad_fn, rho_now
        )
        g_p = _to_wide(ascent.average(g_p))
        g_wide = _to_wide(g)
        # Where rho is 0 at run time g_p = g and the output is g exactly.
        weight = alpha if ascent.static_rho is not None else jnp.where(rho_now > 0, alpha, 0.0)
        weight = jnp.asarray(weight, jnp.float32)
        if minimize_perturbed:
            # g_p - alpha (g - c g_p) with c = <g, g_p> / ||g_p||^2.
            c = _projection_coefficient(g_wide, g_p)
            out = _axpby(1 + weight * c, g_p, -weight, g_wide)
        else:
            # g + alpha (g_p - c g) with c = <g_p, g> / ||g||^2.
            c = _projection_coefficient(g_p, g_wide)
            out = _axpby(1 - weight * c, g_wide, weight, g_p)
        out = ascent.rescale(_cast_like(out, updates), g, params, eps)
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gsam_rho_schedule(
    learning_rate: float | Schedule,
    rho_max: float,
    rho_min: float = 0.0,
    *,
    lr_max: float,
    lr_min: float = 0.0,
) -> Callable[[jax.typing.ArrayLike], jax.Array]:
    r"""GSAM's rho tied to the learning rate, never below `rho_min`.

    .. math::

      \rho_t = \max\Big(\rho_{\min},\; \rho_{\min} + (\rho_{\max} - \rho_{\min})
      \frac{\eta_t - \eta_{\min}}{\eta_{\max} - \eta_{\min}}\Big)

    with eta_t = `learning_rate(t)`. The paper's formula (and its official code) goes below
    rho_min, even negative, where eta_t < eta_min, e.g. during a linear warm-up from 0 with
    eta_min > 0; here rho stays at rho_min there. With lr_max == lr_min, rho is rho_max.

    Example:

      >>> import optax, sam_optax
      >>> lr = optax.warmup_cosine_decay_schedule(0.0, 0.1, 100, 1000, end_value=0.001)
      >>> rho = sam_optax.gsam_rho_schedule(lr, rho_max=0.1, rho_min=0.01,
      ...                                   lr_max=0.1, lr_min=0.001)
      >>> tx = optax.chain(sam_optax.gsam(rho, alpha=0.1), optax.sgd(lr, momentum=0.9))

    Args:
      learning_rate: the base optimizer's learning rate: a schedule of the step count (the
        same count as the SAM transformation's when both are in one chain) or a constant.
      rho_max: rho at the peak learning rate lr_max, >= rho_min.
      rho_min: rho at lr_min and the floor of the schedule, >= 0. Defaults to 0.
      lr_max: the peak learning rate of the schedule.
      lr_min: the final learning rate of the schedule, <= lr_max. Defaults to 0.

    Returns:
      An optax schedule of the step count.

    References:
      Zhuang et al., `Surrogate Gap Guided Sharpness-Aware Minimization
      <https://arxiv.org/abs/2203.08065>`_, ICLR 2022.
    """
    if not 0 <= rho_min <= rho_max:
        raise ValueError(
            f"gsam_rho_schedule needs 0 <= rho_min <= rho_max, got rho_min={rho_min!r}, "
            f"rho_max={rho_max!r}; e.g. gsam_rho_schedule(lr, rho_max=0.1, rho_min=0.01, "
            "lr_max=0.1, lr_min=0.001)."
        )
    if not lr_max >= lr_min:
        raise ValueError(
            f"gsam_rho_schedule needs lr_max >= lr_min, got lr_max={lr_max!r}, "
            f"lr_min={lr_min!r}; lr_max is the peak of the learning-rate schedule."
        )
    lr_fn = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def schedule(count: jax.typing.ArrayLike) -> jax.Array:
        if lr_max == lr_min:
            return jnp.asarray(rho_max, jnp.float32)
        lr = jnp.asarray(lr_fn(count), jnp.float32)
        rho = rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)
        return jnp.maximum(rho, rho_min)

    return schedule


# --------------------------------------------------------------------------------------------
# LookSAM.
# --------------------------------------------------------------------------------------------


def _check_k(k: Any) -> None:
    hint = "E.g. looksam(rho=0.05, k=5) (k = 1 is SAM)."
    if isinstance(k, jax.core.Tracer):
        return
    if isinstance(k, (jax.Array,)) or hasattr(k, "dtype"):
        if not jnp.issubdtype(k.dtype, jnp.integer) or jnp.ndim(k) != 0:
            raise TypeError(f"k must be an int >= 1, got {k!r}. {hint}")
        k = int(k)
    elif isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int >= 1, got {k!r}. {hint}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}. {hint}")


@_with_shared_args
def looksam(
    rho: float | jax.Array | Schedule = 0.05,
    k: int | jax.Array = 5,
    alpha: float | jax.Array = 0.7,
    *,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    stable: bool = False,
    stable_max_scale: float | jax.Array | None = None,
    stable_norm: str = "plain",
    axis_name: AxisName | None = None,
    sync_ascent: bool = False,
    perturb_mask: PerturbMask = None,
    check_input_gradient: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""LookSAM: the SAM gradient every k steps, reused in between at the cost of one pass.

    On steps t with t % k == 0 (t the number of earlier `update` calls), with eps = rho n(g):

    .. math::

      g_s = \nabla L(w + \epsilon), \qquad
      g_v = g_s - \langle g_s, n(g) \rangle\, n(g), \qquad \text{output } g_s,

    and g_v, the part of g_s orthogonal to g, is stored. On the other steps

    .. math::

      \text{output } g + \alpha\, \frac{\|g\|}{\|g_v\|}\, g_v,

    and `grad_fn` is not evaluated at run time (the second pass sits in a `lax.cond`), so the
    average step costs (k + 1) / (2k) of a SAM step. k = 1 is SAM. With a rho schedule, a SAM
    step whose rho is 0 stores g_v = 0 (the following steps output g).

    With `axis_name`, g_s and g (hence g_v) are averaged over the axis; each device's eps comes
    from its own gradient unless `sync_ascent`.

    Example:

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda w: jnp.sum(w ** 2 * jnp.arange(1.0, 4.0))
      >>> params = jnp.ones(3)
      >>> tx = optax.chain(sam_optax.looksam(rho=0.05, k=5, alpha=0.7), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...   updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                              grad_fn=jax.grad(loss))
      ...   params = optax.apply_updates(params, updates)

    Args:
      rho: radius of the ascent, >= 0, or an optax schedule of the step count. Defaults to 0.05.
      k: period of the SAM steps, an int >= 1 (an integer array under `inject_hyperparams`,
        which may change it). Defaults to 5 (the paper's main setting).
      alpha: weight of the reused component, >= 0. Defaults to 0.7 (the paper's value).
      {shared_args}

    Returns:
      An `optax.GradientTransformationExtraArgs` whose `update` needs `params` and
      `grad_fn(params) -> gradient pytree`, as :func:`sam_optax.sam`. Its state holds g_v.

    References:
      Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
      <https://arxiv.org/abs/2203.02714>`_, CVPR 2022.
    """
    ascent = _ascent(
        "looksam",
        rho=rho,
        adaptive=adaptive,
        eta=eta,
        stable=stable,
        stable_max_scale=stable_max_scale,
        stable_norm=stable_norm,
        axis_name=axis_name,
        sync_ascent=sync_ascent,
        perturb_mask=perturb_mask,
        check_input_gradient=check_input_gradient,
    )
    _check_k(k)
    _check_real("alpha", alpha, 0.0, None, "E.g. looksam(rho=0.05, k=5, alpha=0.7).")

    def init_fn(params: optax.Params) -> LookSAMState:
        return LookSAMState(count=jnp.zeros([], jnp.int32), g_v=_zero_buffers(params))

    def update_fn(
        updates: optax.Updates,
        state: LookSAMState,
        params: optax.Params | None = None,
        *,
        grad_fn: GradFn | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, LookSAMState]:
        del extra_args
        params = ascent.check_call(updates, params, grad_fn, state.count)
        rho_now = ascent.rho_at(state.count)
        count = optax.safe_increment(state.count)
        g = ascent.average(updates)
        if ascent.static_rho == 0:
            return g, LookSAMState(count=count, g_v=state.g_v)
        sam_step = state.count % jnp.asarray(k, state.count.dtype) == 0
        g_wide = _to_wide(g)

        # Each kind of step computes only its own quantities, inside its branch.
        def sam_branch():
            g_s, eps = ascent.second_pass(
                g if sync_ascent else updates, updates, params, grad_fn, rho_now
            )
            g_s = _to_wide(ascent.average(g_s))
            c = _projection_coefficient(g_s, g_wide)  # g_v = g_s - <g_s, n(g)> n(g)
            g_v = jax.tree.map(
                lambda x, y, old: (x - c.astype(x.dtype) * y).astype(old.dtype),
                g_s,
                g_wide,
                state.g_v,
            )
            return _cast_like(g_s, updates), g_v, eps

        def reuse_branch():
            scale = jnp.asarray(alpha, jnp.float32) * _safe_divide(
                _l2_norm(g_wide), _l2_norm(state.g_v)
            )
            out = _axpy(scale, state.g_v, g_wide)
            return _cast_like(out, updates), state.g_v, ascent.no_eps(params)

        def no_ascent_branch():  # a SAM step whose rho is 0: output g, store g_v = 0
            return g, jax.tree.map(jnp.zeros_like, state.g_v), ascent.no_eps(params)

        if ascent.static_rho is None:
            index = jnp.where(sam_step, jnp.where(jnp.asarray(rho_now) > 0, 0, 2), 1)
            branches = (sam_branch, reuse_branch, no_ascent_branch)
            out, g_v, eps = jax.lax.switch(index, branches)
        else:
            out, g_v, eps = jax.lax.cond(sam_step, sam_branch, reuse_branch)
        out = ascent.rescale(out, g, params, eps)
        return out, LookSAMState(count=count, g_v=g_v)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# Friendly SAM.
# --------------------------------------------------------------------------------------------


@_with_shared_args
def friendly_sam(
    rho: float | jax.Array | Schedule = 0.05,
    sigma: float | jax.Array = 1.0,
    lmbda: float | jax.Array = 0.9,
    *,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    stable: bool = False,
    stable_max_scale: float | jax.Array | None = None,
    stable_norm: str = "plain",
    axis_name: AxisName | None = None,
    sync_ascent: bool = False,
    perturb_mask: PerturbMask = None,
    check_input_gradient: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Friendly SAM (F-SAM): the ascent along the gradient minus its running mean.

    With m an exponential moving average of the gradients: at the first step d = g and m = g;
    at the later steps

    .. math::

      d = g - \sigma\, m_{t-1}, \qquad m_t = \lambda\, m_{t-1} + (1 - \lambda)\, g, \qquad
      \epsilon = \rho\, n(d), \qquad \text{output } \nabla L(w + \epsilon).

    Removing the full-gradient component (estimated by m) keeps the batch-specific part of the
    ascent, which the paper finds to be what helps generalization. sigma = 0 is SAM. Costs two
    passes per step (one where rho is 0; m is updated on every step).

    With `axis_name`, m is the average of the averaged gradients (the same on every device);
    each device's d uses its own g unless `sync_ascent`.

    Example:

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda w: jnp.sum(w ** 2 * jnp.arange(1.0, 4.0))
      >>> params = jnp.ones(3)
      >>> tx = optax.chain(sam_optax.friendly_sam(rho=0.05, sigma=1.0, lmbda=0.9),
      ...                  optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                            grad_fn=jax.grad(loss))

    Args:
      rho: radius of the ascent, >= 0, or an optax schedule of the step count. Defaults to 0.05.
      sigma: weight of the mean removed from g, >= 0. Defaults to 1.0 (the official code's).
      lmbda: EMA decay of m, in [0, 1]. Defaults to 0.9 (the official optimizer's default; its
        training script uses 0.95).
      {shared_args}

    Returns:
      An `optax.GradientTransformationExtraArgs` whose `update` needs `params` and
      `grad_fn(params) -> gradient pytree`, as :func:`sam_optax.sam`. Its state holds m.

    References:
      Li et al., `Friendly Sharpness-Aware Minimization <https://arxiv.org/abs/2403.12350>`_,
      CVPR 2024 (official code: nblt/F-SAM).
    """
    ascent = _ascent(
        "friendly_sam",
        rho=rho,
        adaptive=adaptive,
        eta=eta,
        stable=stable,
        stable_max_scale=stable_max_scale,
        stable_norm=stable_norm,
        axis_name=axis_name,
        sync_ascent=sync_ascent,
        perturb_mask=perturb_mask,
        check_input_gradient=check_input_gradient,
    )
    hint = "E.g. friendly_sam(rho=0.05, sigma=1.0, lmbda=0.9)."
    _check_real("sigma", sigma, 0.0, None, hint)
    _check_real("lmbda", lmbda, 0.0, 1.0, hint)

    def init_fn(params: optax.Params) -> FriendlySAMState:
        return FriendlySAMState(count=jnp.zeros([], jnp.int32), m=_zero_buffers(params))

    def update_fn(
        updates: optax.Updates,
        state: FriendlySAMState,
        params: optax.Params | None = None,
        *,
        grad_fn: GradFn | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, FriendlySAMState]:
        del extra_args
        params = ascent.check_call(updates, params, grad_fn, state.count)
        rho_now = ascent.rho_at(state.count)
        first = state.count == 0
        # The first step: d = g and m = g (m_prev is 0 there).
        sigma_now = jnp.where(first, 0.0, jnp.asarray(sigma, jnp.float32))
        lmbda_now = jnp.where(first, 0.0, jnp.asarray(lmbda, jnp.float32))
        g = ascent.average(updates)
        m = jax.tree.map(
            lambda m_prev, x: (lmbda_now * m_prev + (1 - lmbda_now) * x).astype(m_prev.dtype),
            state.m,
            g,
        )
        new_state = FriendlySAMState(count=optax.safe_increment(state.count), m=m)
        if ascent.static_rho == 0:
            return g, new_state
        d = _axpy(-sigma_now, state.m, _to_wide(g if sync_ascent else updates))
        g_p, eps = ascent.perturbed_gradient(d, updates, params, grad_fn, rho_now)
        out = ascent.rescale(ascent.average(g_p), g, params, eps)
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# VaSSO.
# --------------------------------------------------------------------------------------------


@_with_shared_args
def vasso(
    rho: float | jax.Array | Schedule = 0.05,
    theta: float | jax.Array = 0.9,
    *,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    stable: bool = False,
    stable_max_scale: float | jax.Array | None = None,
    stable_norm: str = "plain",
    axis_name: AxisName | None = None,
    sync_ascent: bool = False,
    perturb_mask: PerturbMask = None,
    check_input_gradient: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Variance-suppressed sharpness-aware optimization (VaSSO): the ascent along an EMA.

    At the first step d = g; at the later steps

    .. math::

      d_t = (1 - \theta)\, d_{t-1} + \theta\, g, \qquad
      \epsilon = \rho\, \frac{d_t}{\|d_t\|}, \qquad \text{output } \nabla L(w + \epsilon).

    Averaging the ascent direction over steps suppresses the variance of the stochastic
    gradient's direction. theta = 1 is SAM. Costs two passes per step (one where rho is 0; d is
    updated on every step). The official code divides by ||d|| + 1e-7; here a zero d gives
    eps = 0.

    With `axis_name`, the stored d is built from the averaged gradients (the same on every
    device); each device's ascent uses (1 - theta) d_{t-1} + theta g with its own g unless
    `sync_ascent` (the average of those is the stored d).

    Example:

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda w: jnp.sum(w ** 2 * jnp.arange(1.0, 4.0))
      >>> params = jnp.ones(3)
      >>> tx = optax.chain(sam_optax.vasso(rho=0.05, theta=0.9), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                            grad_fn=jax.grad(loss))

    Args:
      rho: radius of the ascent, >= 0, or an optax schedule of the step count. Defaults to 0.05.
      theta: weight of the new gradient in the EMA, in (0, 1]. Defaults to 0.9 (the official
        code's default).
      {shared_args}

    Returns:
      An `optax.GradientTransformationExtraArgs` whose `update` needs `params` and
      `grad_fn(params) -> gradient pytree`, as :func:`sam_optax.sam`. Its state holds d.

    References:
      Li and Giannakis, `Enhancing Sharpness-Aware Optimization Through Variance Suppression
      <https://arxiv.org/abs/2309.15639>`_, NeurIPS 2023 (official code: BingcongLi/VaSSO).
    """
    ascent = _ascent(
        "vasso",
        rho=rho,
        adaptive=adaptive,
        eta=eta,
        stable=stable,
        stable_max_scale=stable_max_scale,
        stable_norm=stable_norm,
        axis_name=axis_name,
        sync_ascent=sync_ascent,
        perturb_mask=perturb_mask,
        check_input_gradient=check_input_gradient,
    )
    hint = "E.g. vasso(rho=0.05, theta=0.9) (theta = 1 is SAM)."
    _check_real("theta", theta, 0.0, 1.0, hint)
    theta_value = _concrete_float(theta)
    if theta_value == 0:
        raise ValueError(f"theta must be > 0 (theta = 0 never uses the gradient). {hint}")

    def init_fn(params: optax.Params) -> VaSSOState:
        return VaSSOState(count=jnp.zeros([], jnp.int32), d=_zero_buffers(params))

    def update_fn(
        updates: optax.Updates,
        state: VaSSOState,
        params: optax.Params | None = None,
        *,
        grad_fn: GradFn | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, VaSSOState]:
        del extra_args
        params = ascent.check_call(updates, params, grad_fn, state.count)
        rho_now = ascent.rho_at(state.count)
        # The first step: d = g (d_prev is 0 there).
        theta_now = jnp.where(state.count == 0, 1.0, jnp.asarray(theta, jnp.float32))

        def ema(d_prev, x):
            return ((1 - theta_now) * d_prev + theta_now * x).astype(d_prev.dtype)

        g = ascent.average(updates)
        d = jax.tree.map(ema, state.d, g)
        new_state = VaSSOState(count=optax.safe_increment(state.count), d=d)
        if ascent.static_rho == 0:
            return g, new_state
        direction = d if sync_ascent or axis_name is None else jax.tree.map(ema, state.d, updates)
        g_p, eps = ascent.perturbed_gradient(direction, updates, params, grad_fn, rho_now)
        out = ascent.rescale(ascent.average(g_p), g, params, eps)
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
