r"""Exact per-example SAM (m-sharpness down to m = 1) on dense layers, at SAM's cost.

A dense layer z = W a + b applied to a batch has rank-one per-example gradients,
g_i = (d_i a_i^T, d_i) with d_i = dl_i/dz_i. The per-example ascent eps_i = rho g_i / ||g_i||
therefore changes nothing but example i's pre-activations: in the pass at w + eps_i, layer l
computes

.. math::

  z_l' = (W_l + \epsilon_{l,i}) a_l' + b_l + \epsilon_{b,l,i}
       = W_l a_l' + b_l + \rho\, \mathrm{sg}(d_l / N_i)\, (\mathrm{sg}(a_l) \cdot a_l' + 1),
  \qquad N_i = \Big(\sum_l \|d_l\|^2 (\|a_l\|^2 + 1)\Big)^{1/2},

where a_l and d_l come from the first pass, a_l' is the layer's input in the shifted pass, sg is
`stop_gradient` and the sum runs over the perturbed layers (drop the + 1 of a layer without
bias). The gradient of the shifted loss with respect to the weights is exactly the mean of the
per-example gradients at each example's own perturbed weights: SAM with m = 1 in two passes,
like SAM, with no `vmap` and no per-example weight copies. The d_l of every example are the
gradient of the batch loss with respect to zero shifts added to the pre-activations, which the
first pass computes together with the weight gradient. A group of m examples ascends along its
summed gradient: the shift of example j is rho / N_g sum_{i in g} d_i (a_i . a_j' + 1), with
N_g^2 = sum_l sum_{i,k in g} (d_i . d_k)(a_i . a_k + 1), a small Gram matrix per group.

The dense layers are found while the loss is traced: Flax linen `nn.Dense`, Flax NNX
`nnx.Linear`, and :func:`dense` in plain JAX code. Each must see one example per row, an input of
shape (batch, features), and must not mix examples (BatchNorm in training mode does; LayerNorm,
dropout and the other layers of an MLP do not). Other layers (convolutions, normalization
scales) are not perturbed: the ascent is per-example SAM restricted to the dense layers, which
is all of SAM for an MLP. For convolutions, ``sam(...).update(None, ..., micro_batches=...)``
runs the per-example ascent exactly, vectorized in chunks.

Two ways to use it:

* :func:`value_and_grad` and :func:`per_example_sam`: every dense layer (or the last few), two
  passes per step, any base optimizer, rho schedules and StableSAM;
* :func:`sam_loss` with ``last_layers``: the ascent on the last layers only, in one gradient
  evaluation (the first pass reaches back only through those layers), used in place of the loss.
  :func:`sam_optax.losses.head_sam_softmax_cross_entropy` is its closed form for the head under
  cross-entropy, for code that has the logits and the features at hand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _tree as tree
from sam_optax._ascent import Ascent
from sam_optax._parallel import AxisName, varying_like

# per_example_sam and its state are documented as sam_optax.per_example_sam.
__all__ = ["dense", "sam_loss", "value_and_grad"]

# The tapes of the losses being traced, innermost last; the dense layers report to the last one.
_TAPES: list[_Tape] = []


# --------------------------------------------------------------------------------------------
# The dense layers, seen while the loss is traced.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Shift:
    """The second pass's shifts: rho sg(d_l / N) per perturbed layer with its first-pass input."""

    coefficients: list[jax.Array]  # (batch, out), float32: rho d_l / N of each example's group
    inputs: list[jax.Array]  # (batch, in), float32: a_l of the first pass
    biases: list[bool]
    group_size: int

    def __call__(self, slot: int, a: jax.Array) -> jax.Array:
        coefficient, first_input = self.coefficients[slot], self.inputs[slot]
        a = a.astype(first_input.dtype)
        bias = float(self.biases[slot])
        if self.group_size == 1:
            return coefficient * (jnp.sum(first_input * a, axis=-1, keepdims=True) + bias)
        m = self.group_size
        grouped = lambda x: x.reshape(-1, m, x.shape[-1])  # noqa: E731
        gram = jnp.einsum("gif,gjf->gij", grouped(first_input), grouped(a)) + bias
        return jnp.einsum("gij,gio->gjo", gram, grouped(coefficient)).reshape(coefficient.shape)


class _Tape:
    """What one trace of the loss does at its dense layers: count them ("count"), add the zero
    shifts whose gradient is d and keep the inputs ("record"), or add the ascent's shifts."""

    def __init__(self, mode: str, perturbed: Sequence[int] = (), values: Any = None):
        self.mode = mode
        self.slots = {layer: slot for slot, layer in enumerate(perturbed)}
        self.values = values  # "record": the zero shifts; "shift": a _Shift
        self.biases: list[bool] = []
        self.outputs: list[jax.ShapeDtypeStruct] = []
        self.inputs: list[jax.Array] = []

    def __call__(self, a: jax.Array, z: jax.Array, has_bias: bool, name: str) -> jax.Array:
        layer = len(self.biases)
        if jnp.ndim(a) != 2 or jnp.ndim(z) != 2:
            raise ValueError(
                f"per-example SAM needs every dense layer to see one example per row, inputs of "
                f"shape (batch, features); {name} got an input of shape {jnp.shape(a)}. Flatten "
                "the input first (x.reshape(x.shape[0], -1)), or leave the model to "
                "sam(...).update(None, ..., micro_batches=...)."
            )
        self.biases.append(has_bias)
        self.outputs.append(jax.ShapeDtypeStruct(z.shape, z.dtype))
        slot = self.slots.get(layer)
        if self.mode == "count" or slot is None:
            return z
        if self.mode == "record":
            self.inputs.append(tree.to_wide(a))
            return z + self.values[slot].astype(z.dtype)
        return z + self.values(slot, a).astype(z.dtype)


def _report(a: jax.Array, z: jax.Array, has_bias: bool, name: str) -> jax.Array:
    return _TAPES[-1](a, z, has_bias, name) if _TAPES else z


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """``x @ kernel + bias``: a dense layer that the per-example ascent sees, for plain JAX code.

    Args:
      x: the inputs, (batch, in).
      kernel: the weights, (in, out).
      bias: the bias, (out,), or None.

    Returns:
      The pre-activations, (batch, out); inside :func:`value_and_grad` or :func:`sam_loss`, those
      of the pass they are tracing.

    Example:
      >>> import jax.numpy as jnp, sam_optax
      >>> sam_optax.per_example.dense(jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.zeros(4)).shape
      (2, 4)
    """
    z = x @ kernel
    if bias is not None:
        z = z + bias
    return _report(x, z, bias is not None, "sam_optax.per_example.dense")


def _linen_interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    import flax.linen as nn

    if context.method_name != "__call__" or type(context.module) is not nn.Dense:
        return out
    inputs = args[0] if args else kwargs["inputs"]
    name = f"nn.Dense {'/'.join(context.module.path) or context.module.name}"
    return _report(inputs, out, context.module.use_bias, name)


@contextlib.contextmanager
def _nnx_linear_reported() -> Iterator[None]:
    """`nnx.Linear.__call__` reports to the tape while the loss traces (NNX has no method
    interception like linen's)."""
    from flax import nnx

    original = nnx.Linear.__call__

    @functools.wraps(original)
    def reported(self, inputs, *args, **kwargs):
        out = original(self, inputs, *args, **kwargs)
        return _report(inputs, out, self.bias is not None, "nnx.Linear")

    nnx.Linear.__call__ = reported
    try:
        yield
    finally:
        nnx.Linear.__call__ = original


@contextlib.contextmanager
def _tracing(tape: _Tape) -> Iterator[_Tape]:
    """The dense layers report to `tape` while the loss traces: :func:`dense` always, Flax's
    when Flax is in use (imported already)."""
    with contextlib.ExitStack() as stack:
        if "flax.linen" in sys.modules:
            import flax.linen as nn

            stack.enter_context(nn.intercept_methods(_linen_interceptor))
        if "flax.nnx" in sys.modules:
            stack.enter_context(_nnx_linear_reported())
        _TAPES.append(tape)
        try:
            yield tape
        finally:
            _TAPES.pop()


# --------------------------------------------------------------------------------------------
# The two passes.
# --------------------------------------------------------------------------------------------


def _check_options(last_layers: int | None, group_size: int, call: str) -> None:
    if last_layers is not None and (
        isinstance(last_layers, bool) or not isinstance(last_layers, int) or last_layers < 1
    ):
        raise ValueError(
            f"last_layers must be None (every dense layer) or an int >= 1 (the last dense "
            f"layers), got {last_layers!r}; e.g. {call}(loss_fn, last_layers=1)."
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(
            f"group_size is m of m-sharpness, an int >= 1 (1: each example ascends alone), got "
            f"{group_size!r}; e.g. {call}(loss_fn, group_size=1)."
        )


def _split(out: Any, has_aux: bool) -> tuple[jax.Array, Any]:
    loss, aux = out if has_aux else (out, None)
    if jnp.ndim(loss) != 0:
        raise TypeError(
            "the loss must return a scalar, the mean (or sum) of the examples' losses, got shape "
            f"{jnp.shape(loss)}"
            + (
                "; it returns (loss, aux): pass has_aux=True."
                if isinstance(out, tuple)
                else "; reduce it with jnp.mean."
            )
        )
    return loss, aux


def _dense_layers(loss_fn, params, args, has_aux, last_layers, call) -> tuple[list[int], _Tape]:
    """The perturbed layers' positions in call order, from a shape-only trace of the loss."""
    with _tracing(_Tape("count")) as tape:
        jax.eval_shape(lambda p: _split(loss_fn(p, *args), has_aux)[0], params)
    count = len(tape.biases)
    if count == 0:
        raise ValueError(
            f"{call} found no dense layer in the loss: use flax.linen.Dense, flax.nnx.Linear or "
            "sam_optax.per_example.dense(x, kernel, bias) for the layers to perturb."
        )
    first = 0 if last_layers is None else max(count - last_layers, 0)
    return list(range(first, count)), tape


def _first_pass(loss_fn, params, args, has_aux, perturbed, counted, wrt_params: bool):
    """(loss, aux), params' gradient (None unless `wrt_params`), d and a of the perturbed
    layers: one forward, one backward."""
    zeros = [jnp.zeros(counted.outputs[i].shape, counted.outputs[i].dtype) for i in perturbed]
    # Inside shard_map, a gradient with respect to a value typed as the same on every device is
    # summed over the devices: the zero shifts vary like the batch they shift.
    zeros = varying_like(zeros, params, args)

    def with_shifts(params, shifts):
        with _tracing(_Tape("record", perturbed, shifts)) as tape:
            loss, aux = _split(loss_fn(params, *args), has_aux)
        if len(tape.biases) != len(counted.biases):
            raise ValueError(
                "the loss called a different number of dense layers in two traces "
                f"({len(counted.biases)}, then {len(tape.biases)}); the per-example ascent needs "
                "the same layers in the same order at every call."
            )
        return loss, (aux, tape.inputs)

    argnums = (0, 1) if wrt_params else 1
    (loss, (aux, inputs)), grads = jax.value_and_grad(with_shifts, argnums, has_aux=True)(
        params, zeros
    )
    grads, d = grads if wrt_params else (None, grads)
    return (loss, aux), grads, [tree.to_wide(x) for x in d], inputs


def _shift(rho: Any, d: list, inputs: list, biases: list[bool], group_size: int) -> _Shift:
    """rho d_l / N for every example (N of its group), all first-pass values stopped."""
    d = [jax.lax.stop_gradient(x) for x in d]
    inputs = [jax.lax.stop_gradient(x) for x in inputs]
    batch = d[0].shape[0]
    if batch % group_size:
        raise ValueError(
            f"group_size={group_size} must divide the batch size {batch} (the groups are "
            "consecutive examples)."
        )
    if group_size == 1:
        squares = sum(
            jnp.sum(x**2, -1) * (jnp.sum(a**2, -1) + b)
            for x, a, b in zip(d, inputs, biases, strict=True)
        )
        norms = jnp.sqrt(squares)[:, None]
    else:
        grouped = lambda x: x.reshape(-1, group_size, x.shape[-1])  # noqa: E731
        squares = sum(
            jnp.sum(
                jnp.einsum("gio,gko->gik", grouped(x), grouped(x))
                * (jnp.einsum("gif,gkf->gik", grouped(a), grouped(a)) + b),
                axis=(1, 2),
            )
            for x, a, b in zip(d, inputs, biases, strict=True)
        )
        # A group's Gram sum can round below 0 where its gradient cancels.
        norms = jnp.repeat(jnp.sqrt(jnp.maximum(squares, 0.0)), group_size)[:, None]
    rho = jnp.asarray(rho, d[0].dtype)
    coefficients = [rho * tree.safe_divide(x, norms) for x in d]
    return _Shift(coefficients, inputs, list(biases), group_size)


def _shifted_loss(loss_fn, args, has_aux, perturbed, shift: _Shift):
    def shifted(params):
        with _tracing(_Tape("shift", perturbed, shift)):
            return _split(loss_fn(params, *args), has_aux)[0]

    return shifted


SAMGradFn = Callable[[Any], optax.Updates]


def value_and_grad(
    loss_fn: Callable[..., Any],
    *,
    group_size: int = 1,
    last_layers: int | None = None,
    has_aux: bool = False,
) -> Callable[..., tuple[Any, optax.Updates, SAMGradFn]]:
    r"""The loss, its gradient, and the per-example SAM gradient as a function of rho.

    Returns ``f(params, *args) -> (value, grads, sam_grad_fn)``: `value` and `grads` as
    ``jax.value_and_grad(loss_fn, has_aux=has_aux)(params, *args)`` gives them, and
    ``sam_grad_fn(rho)``, the gradient with respect to `params` of the mean of the examples'
    losses, each at its own ascent point (m-sharpness with m = `group_size`):

    .. math::

      g_{\rm SAM} = \frac1B \sum_i \nabla l_i(w + \epsilon_{g(i)}), \qquad
      \epsilon_g = \rho\, \frac{\sum_{i \in g} \nabla l_i(w)}{\|\sum_{i \in g} \nabla l_i(w)\|_2}

    with eps restricted to the dense layers (all of them, or the last `last_layers`). The first
    pass computes `value`, `grads` and the pre-activation gradients of every example in one
    forward-backward pass; `sam_grad_fn(rho)` is the second pass (see the module's docstring for
    the formula). Hand both to :func:`per_example_sam`, which calls `sam_grad_fn` only where rho
    is not 0; ``sam_grad_fn(0.0)`` is `grads`.

    Args:
      loss_fn: ``loss_fn(params, *args)``, the mean (or sum) over the batch of per-example
        losses; its dense layers are Flax linen `nn.Dense`, NNX `nnx.Linear` (called inside the
        loss, e.g. on ``nnx.merge(graphdef, params)``) or :func:`dense`, each applied to a
        (batch, features) input, and no layer mixes examples.
      group_size: m, the number of consecutive examples that ascend together; divides the batch.
        Defaults to 1.
      last_layers: perturb only the last this many dense layers (in call order); None (default)
        perturbs every one.
      has_aux: `loss_fn` returns (loss, aux), as for `jax.value_and_grad`.

    Returns:
      ``f(params, *args) -> (value, grads, sam_grad_fn)``, value being the loss or (loss, aux).

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> from sam_optax.per_example import dense
      >>> def loss_fn(params, x, y):
      ...   h = jax.nn.relu(dense(x, params["w1"], params["b1"]))
      ...   return jnp.mean((dense(h, params["w2"], params["b2"])[:, 0] - y) ** 2)
      >>> keys = jax.random.split(jax.random.key(0), 3)
      >>> params = {"w1": jax.random.normal(keys[0], (3, 8)), "b1": jnp.zeros(8),
      ...           "w2": jax.random.normal(keys[1], (8, 1)), "b2": jnp.zeros(1)}
      >>> x, y = jax.random.normal(keys[2], (16, 3)), jnp.ones(16)
      >>> tx = optax.chain(sam_optax.per_example_sam(rho=0.05), optax.sgd(0.01))
      >>> loss, grads, sam_grad_fn = sam_optax.per_example.value_and_grad(loss_fn)(params, x, y)
      >>> updates, _ = tx.update(grads, tx.init(params), params, sam_grad_fn=sam_grad_fn)
      >>> params = optax.apply_updates(params, updates)

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving Generalization
      <https://arxiv.org/abs/2010.01412>`_, ICLR 2021 (m-sharpness).

      Baek, Kolter and Raghunathan, `Why is SAM Robust to Label Noise?
      <https://arxiv.org/abs/2405.03676>`_, ICLR 2024 (1-SAM).
    """
    _check_options(last_layers, group_size, "sam_optax.per_example.value_and_grad")

    def evaluate(params: Any, *args: Any) -> tuple[Any, optax.Updates, SAMGradFn]:
        perturbed, counted = _dense_layers(
            loss_fn, params, args, has_aux, last_layers, "value_and_grad"
        )
        (loss, aux), grads, d, inputs = _first_pass(
            loss_fn, params, args, has_aux, perturbed, counted, wrt_params=True
        )
        biases = [counted.biases[i] for i in perturbed]

        def sam_grad_fn(rho: Any) -> optax.Updates:
            shift = _shift(rho, d, inputs, biases, group_size)
            return jax.grad(_shifted_loss(loss_fn, args, has_aux, perturbed, shift))(params)

        return ((loss, aux) if has_aux else loss), grads, sam_grad_fn

    return evaluate


def sam_loss(
    loss_fn: Callable[..., Any],
    rho: Any,
    *,
    last_layers: int | None = 1,
    group_size: int = 1,
    has_aux: bool = False,
) -> Callable[..., tuple[jax.Array, Any]]:
    r"""A loss whose gradient is per-example SAM's on the last dense layers, in one pass.

    Returns ``f(params, *args) -> (shifted_loss, aux)`` for ``jax.value_and_grad(f,
    has_aux=True)``: its gradient with respect to `params` (every parameter, not only the
    perturbed layers') is the mean over the examples of the gradient at each example's own ascent
    point, the ascent restricted to the last `last_layers` dense layers:
    eps_i = rho g_i|_L / ||g_i|_L||, g_i|_L the example's gradient with respect to those layers'
    weights and biases. `aux` is the loss at the params themselves (or (loss, aux) with
    `has_aux`), for logging. rho = 0 gives the loss's own gradient.

    It is :func:`value_and_grad`'s second pass with the first pass folded in: the pre-activation
    gradients of the last layers need a backward pass through those layers only, and the shared
    forward pass up to them is one computation for XLA (measured by the benchmarks: no more FLOPs
    than a plain step, beyond the last layers' small share). For a cross-entropy head with the
    logits and features at hand, :func:`sam_optax.losses.head_sam_softmax_cross_entropy` is the
    same thing in closed form.

    This is exactly 1-SAM restricted to the chosen layers; it is not 1-SAM (which perturbs every
    layer, see :func:`value_and_grad`) and not the full-batch SAM on those layers. The norm
    covers fewer parameters than SAM's, so its good rho differs (tune it on validation data).

    Args:
      loss_fn: as for :func:`value_and_grad`.
      rho: the radius, >= 0 (a float or an array, e.g. a schedule's value at the step).
      last_layers: how many dense layers, counted from the last, the ascent perturbs; None
        perturbs every one (then the first pass is a full backward pass: use
        :func:`value_and_grad`, which also gives the plain gradient). Defaults to 1, the head.
      group_size: m of m-sharpness, as for :func:`value_and_grad`. Defaults to 1.
      has_aux: `loss_fn` returns (loss, aux).

    Returns:
      ``f(params, *args) -> (loss at the shifted pre-activations, aux)``.

    Example:
      >>> import jax, jax.numpy as jnp, sam_optax
      >>> from sam_optax.per_example import dense
      >>> def loss_fn(params, x, y):
      ...   h = jax.nn.relu(dense(x, params["w1"], params["b1"]))
      ...   return jnp.mean((dense(h, params["w2"], params["b2"])[:, 0] - y) ** 2)
      >>> keys = jax.random.split(jax.random.key(0), 3)
      >>> params = {"w1": jax.random.normal(keys[0], (3, 8)), "b1": jnp.zeros(8),
      ...           "w2": jax.random.normal(keys[1], (8, 1)), "b2": jnp.zeros(1)}
      >>> x, y = jax.random.normal(keys[2], (16, 3)), jnp.ones(16)
      >>> f = sam_optax.per_example.sam_loss(loss_fn, rho=0.05, last_layers=1)
      >>> (shifted, loss), grads = jax.value_and_grad(f, has_aux=True)(params, x, y)
      >>> bool(shifted >= loss)
      True

    References:
      Baek, Kolter and Raghunathan, `Why is SAM Robust to Label Noise?
      <https://arxiv.org/abs/2405.03676>`_, ICLR 2024 (1-SAM; its gain through the last
      layers).
    """
    _check_options(last_layers, group_size, "sam_optax.per_example.sam_loss")

    def shifted(params: Any, *args: Any) -> tuple[jax.Array, Any]:
        perturbed, counted = _dense_layers(loss_fn, params, args, has_aux, last_layers, "sam_loss")
        # The first pass is a constant of the second: no gradient flows back through it.
        (loss, aux), _, d, inputs = _first_pass(
            loss_fn, jax.lax.stop_gradient(params), args, has_aux, perturbed, counted,
            wrt_params=False,
        )  # fmt: skip
        shift = _shift(rho, d, inputs, [counted.biases[i] for i in perturbed], group_size)
        value = _shifted_loss(loss_fn, args, has_aux, perturbed, shift)(params)
        return value, ((loss, aux) if has_aux else loss)

    return shifted


# --------------------------------------------------------------------------------------------
# The transformation.
# --------------------------------------------------------------------------------------------


class PerExampleSAMState(NamedTuple):
    """State of :func:`per_example_sam`: the number of `update` calls so far (rho schedules)."""

    count: jax.Array


MISSING_SAM_GRAD_FN = (
    "per_example_sam needs the keyword argument `sam_grad_fn`, the third output of "
    "sam_optax.per_example.value_and_grad, e.g.\n"
    "    loss, grads, sam_grad_fn = sam_optax.per_example.value_and_grad(loss_fn)(params, batch)\n"
    "    updates, opt_state = tx.update(grads, opt_state, params, sam_grad_fn=sam_grad_fn)"
)


def per_example_sam(
    rho: float | jax.Array | optax.Schedule = 0.05,
    *,
    stable: bool = False,
    stable_max_scale: float | jax.Array | None = None,
    axis_name: AxisName | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Per-example SAM (m-sharpness with small m) on dense layers, at the cost of SAM.

    Chain it in front of any base optimizer, like :func:`sam_optax.sam`. Its `update` takes the
    gradient g and ``sam_grad_fn``, the third output of
    :func:`sam_optax.per_example.value_and_grad`, and returns

    .. math::

      g_{\rm SAM} = \frac1B \sum_i \nabla l_i(w + \epsilon_{g(i)}), \qquad
      \epsilon_g = \rho\, n\Big(\sum_{i \in g} \nabla l_i(w)\Big),

    the mean of the examples' gradients each at its own group's ascent point (the group size m
    and the perturbed dense layers are chosen in `value_and_grad`), computed exactly in one more
    forward-backward pass. With `stable` (StableSAM) the output is rescaled to g's norm.

    Args:
      rho: the radius, >= 0, or an optax schedule of the step count. Where rho is 0 the output
        is g and `sam_grad_fn` is not evaluated at run time. Defaults to 0.05. Per-example
        gradients are larger than the batch's, so the good rho is usually smaller than SAM's
        (Baek et al. use 0.01).
      stable: renormalize the output to the norm of g (StableSAM).
      stable_max_scale: with `stable`, cap the factor at this value (None: no cap).
      axis_name: inside `jax.shard_map`, the data-parallel axis: g and the output are averaged
        over it (each device's examples ascend on their own in any case).

    Returns:
      An `optax.GradientTransformationExtraArgs` whose ``update(updates, state, params=None, *,
      sam_grad_fn, **extra_args)`` needs `sam_grad_fn`.

    Example:
      See :func:`sam_optax.per_example.value_and_grad`.

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving Generalization
      <https://arxiv.org/abs/2010.01412>`_, ICLR 2021 (m-sharpness).

      Baek, Kolter and Raghunathan, `Why is SAM Robust to Label Noise?
      <https://arxiv.org/abs/2405.03676>`_, ICLR 2024.
    """
    ascent = Ascent(
        call="per_example_sam",
        rho=rho,
        stable=stable,
        stable_max_scale=stable_max_scale,
        axis_name=axis_name,
    )

    def init_fn(params: optax.Params) -> PerExampleSAMState:
        del params
        return PerExampleSAMState(count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: optax.Updates,
        state: PerExampleSAMState,
        params: optax.Params | None = None,
        *,
        sam_grad_fn: SAMGradFn | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, PerExampleSAMState]:
        del extra_args
        if sam_grad_fn is None:
            raise TypeError(MISSING_SAM_GRAD_FN)
        rho_now = ascent.rho_at(state.count)
        new_state = PerExampleSAMState(count=optax.safe_increment(state.count))
        mean_grads = ascent.average(updates)
        if ascent.static_rho == 0:
            return mean_grads, new_state

        def sam_gradient():
            g_sam = tree.cast_like(sam_grad_fn(rho_now), updates)
            return tree.nan_unless(tree.all_finite(updates), g_sam)

        if ascent.static_rho is not None:
            g_sam = sam_gradient()
        else:
            g_sam = jax.lax.cond(jnp.asarray(rho_now) > 0, sam_gradient, lambda: updates)
        g_sam = ascent.average(g_sam)
        return ascent.rescale(g_sam, mean_grads, params, None), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
