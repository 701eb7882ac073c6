"""Flax NNX helpers: the `grad_fn` that `nnx.Optimizer.update` forwards to sam_optax.

`nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads, grad_fn=...)` calls
``tx.update(grads, opt_state, params, grad_fn=grad_fn)`` with `params` a *pure* `nnx.State` of
the `wrt` variables (arrays, no `nnx.Variable`), so `grad_fn` must take a pure state and return
a pure gradient state. :func:`grad_fn` builds it from a loss of the model::

  @nnx.jit
  def train_step(model, optimizer, x, y):
      grad_fn = sam_optax.nnx.grad_fn(loss_fn, model, x, y)   # before the first pass
      loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
      optimizer.update(model, grads, grad_fn=grad_fn)
      return loss

This module imports Flax (without it, the ImportError names the install); ``import sam_optax``
alone does not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from sam_optax._grad_fn import missing_flax, scalar_loss
from sam_optax._masks import layer_mask

try:
    from flax import nnx
except ModuleNotFoundError as error:
    raise missing_flax(error, "sam_optax.nnx") from None

__all__ = ["NORMALIZATION_LAYERS", "grad_fn", "normalization_mask"]


def grad_fn(
    loss_fn: Callable[..., Any],
    model: nnx.Module,
    *args: Any,
    wrt: Any = nnx.Param,
    has_aux: bool = False,
    **kwargs: Any,
) -> Callable[[nnx.State], nnx.State]:
    """The `grad_fn` for `nnx.Optimizer.update`: pure params state in, pure gradient state out.

    ``grad_fn(params)`` is the gradient of ``loss_fn(model, *args, **kwargs)`` with respect to
    the `wrt` variables, evaluated at `params` (the perturbed weights sam_optax passes) with every
    other variable of the model (BatchNorm statistics, RNG stream counters, ...) as it was when
    :func:`grad_fn` was called. The loss runs on a copy of the model rebuilt from a pure snapshot of
    that state, so whatever the perturbed pass changes is discarded: BatchNorm running statistics
    come from the first (unperturbed) pass only and RNG streams advance as in one step. Called
    before the first pass, both passes see the same RNG state, hence the same dropout masks (the
    loss and its perturbed counterpart are then one function of the weights).

    Works under `nnx.jit` (and `jax.jit` of split/merged code), inside the `lax.cond`/`lax.scan`
    that sam_optax may put around it.

    Args:
      loss_fn: ``loss_fn(model, *args, **kwargs) -> scalar loss`` (or ``(loss, aux)`` with
        `has_aux`), the same function as for the first gradient.
      model: the model, in its state before the first pass of the step.
      *args: the loss's other arguments (the batch).
      wrt: the variables to differentiate, as given to `nnx.Optimizer` (default `nnx.Param`).
      has_aux: `loss_fn` returns ``(loss, aux)``; aux is dropped. A loss that returns a tuple
        without it is a TypeError naming it.
      **kwargs: keyword arguments of `loss_fn`.

    Returns:
      ``grad_fn(params: nnx.State, *more_args) -> nnx.State`` of pure arrays shaped like
      `params`; `more_args` follow `args` in the call of `loss_fn`, so that
      ``sam_optax.accumulate_grad_fn(sam_optax.nnx.grad_fn(loss_fn, model), micro_batches)``
      gives the mean gradient over micro-batches (``loss_fn(model, micro_batch)``).

    Example:
      >>> import jax.numpy as jnp, optax, sam_optax
      >>> from flax import nnx
      >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(
      ...     model, optax.chain(sam_optax.sam(0.05), optax.sgd(0.1)), wrt=nnx.Param)
      >>> def loss_fn(model, x, y):
      ...   return jnp.mean((model(x) - y) ** 2)
      >>> @nnx.jit
      ... def train_step(model, optimizer, x, y):
      ...   grad_fn = sam_optax.nnx.grad_fn(loss_fn, model, x, y)
      ...   loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
      ...   optimizer.update(model, grads, grad_fn=grad_fn)
      ...   return loss
      >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
      >>> losses = [float(train_step(model, optimizer, x, y)) for _ in range(3)]
      >>> losses[2] < losses[0]
      True
    """
    graphdef, _, rest = nnx.split(model, wrt, ...)
    rest = nnx.as_pure(rest)  # a snapshot: the first pass's updates do not reach it

    def loss_at(params: nnx.State, *more_args: Any) -> Any:
        copy = nnx.merge(graphdef, params, rest)
        out = loss_fn(copy, *args, *more_args, **kwargs)
        return out if has_aux else scalar_loss(out, "sam_optax.nnx.grad_fn")

    def gradient(params: nnx.State, *more_args: Any) -> nnx.State:
        grads = jax.grad(loss_at, has_aux=has_aux)(nnx.as_pure(params), *more_args)
        return grads[0] if has_aux else grads

    return gradient


#: The layers whose parameters :func:`normalization_mask` selects.
NORMALIZATION_LAYERS: tuple[type[nnx.Module], ...] = (
    nnx.BatchNorm,
    nnx.LayerNorm,
    nnx.GroupNorm,
    nnx.RMSNorm,
)


def normalization_mask(
    model: nnx.Module,
    *,
    wrt: Any = nnx.Param,
    layers: tuple[type[nnx.Module], ...] = NORMALIZATION_LAYERS,
) -> nnx.State:
    """The `perturb_mask` of SAM-ON: True on the parameters of normalization layers only.

    SAM-ON (Mueller et al.) perturbs only the normalization layers' scales and biases; the
    second pass still runs over the whole model. The layers are found by their type in the
    model's graph.

    Args:
      model: the NNX model.
      wrt: the variables the optimizer updates (as for ``nnx.Optimizer``; default `nnx.Param`).
      layers: the layer types to select (default :data:`NORMALIZATION_LAYERS`).

    Returns:
      An `nnx.State` of booleans shaped as the pure state ``nnx.Optimizer`` passes as params.

    Example:
      >>> import optax, sam_optax
      >>> from flax import nnx
      >>> class Net(nnx.Module):
      ...   def __init__(self, rngs):
      ...     self.dense = nnx.Linear(3, 4, rngs=rngs)
      ...     self.norm = nnx.LayerNorm(4, rngs=rngs)
      >>> model = Net(nnx.Rngs(0))
      >>> mask = sam_optax.nnx.normalization_mask(model)
      >>> bool(mask["norm"]["scale"]), bool(mask["dense"]["kernel"])
      (True, False)
      >>> tx = optax.chain(sam_optax.sam(0.5, perturb_mask=mask), optax.sgd(0.1))
      >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    References:
      Mueller et al., `Normalization Layers Are All That Sharpness-Aware Minimization Needs
      <https://arxiv.org/abs/2306.04226>`_, NeurIPS 2023.
    """
    paths = [tuple(path) for path, node in nnx.iter_graph(model) if isinstance(node, layers)]
    return layer_mask(nnx.as_pure(nnx.state(model, wrt)), paths, model=model, layers=layers)
