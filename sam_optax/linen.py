"""Flax linen helpers: a `TrainState` that forwards `grad_fn` to the optimizer, and `grad_fn`.

`flax.training.train_state.TrainState.apply_gradients(grads=..., **kwargs)` treats its keywords
as fields to replace and calls ``tx.update(grads, opt_state, params)`` without extra arguments,
so sam_optax never sees `grad_fn`. :class:`TrainState` forwards every keyword that is not a
field of the state to ``tx.update``::

  state = sam_optax.linen.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  grads = jax.grad(loss_fn)(state.params, batch)
  state = state.apply_gradients(grads=grads, grad_fn=lambda p: jax.grad(loss_fn)(p, batch))

With BatchNorm, the statistics come from the first pass only: the loss returns the new
statistics as aux, the state takes those of the first pass and :func:`grad_fn` drops those of
the perturbed pass (see its example).

This module imports Flax (without it, the ImportError names the install); ``import sam_optax``
alone does not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

from sam_optax._grad_fn import missing_flax, scalar_loss
from sam_optax._masks import layer_mask

try:
    import flax.linen as nn
    from flax.training import train_state
except ModuleNotFoundError as error:
    raise missing_flax(error, "sam_optax.linen") from None

__all__ = ["NORMALIZATION_LAYERS", "TrainState", "grad_fn", "normalization_mask"]


class TrainState(train_state.TrainState):
    """`flax.training.train_state.TrainState` whose `apply_gradients` forwards extra keywords.

    ``apply_gradients(grads=g, grad_fn=f, batch_stats=s)`` replaces the fields it names (here
    `batch_stats`, as Flax does) and passes every other keyword (here `grad_fn`) to
    ``tx.update(grads, opt_state, params, **extra)``, as `nnx.Optimizer.update` does.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> import flax.linen as nn
      >>> model = nn.Dense(1)
      >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
      >>> state = sam_optax.linen.TrainState.create(
      ...     apply_fn=model.apply, params=model.init(jax.random.key(0), x)["params"],
      ...     tx=optax.chain(sam_optax.sam(0.05), optax.sgd(0.1)))
      >>> def loss_fn(params, x, y):
      ...   return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)
      >>> grads = jax.grad(loss_fn)(state.params, x, y)
      >>> state = state.apply_gradients(
      ...     grads=grads, grad_fn=lambda p: jax.grad(loss_fn)(p, x, y))
      >>> int(state.step)
      1
    """

    def apply_gradients(self, *, grads: Any, **kwargs: Any) -> TrainState:
        """Updates `step`, `params`, `opt_state` and the fields named in `kwargs`.

        Args:
          grads: gradients with the structure of `params`.
          **kwargs: keywords naming a field of the state replace it; every other keyword (e.g.
            `grad_fn`) is passed to ``tx.update``.

        Returns:
          The new state, with `step` incremented by one.
        """
        fields = {field.name for field in dataclasses.fields(self)}
        replace = {k: v for k, v in kwargs.items() if k in fields}
        extra_args = {k: v for k, v in kwargs.items() if k not in fields}
        overwrite = train_state.OVERWRITE_WITH_GRADIENT
        if overwrite in grads:
            grads_with_opt, params_with_opt = grads["params"], self.params["params"]
        else:
            grads_with_opt, params_with_opt = grads, self.params
        updates, new_opt_state = self.tx.update(
            grads_with_opt, self.opt_state, params_with_opt, **extra_args
        )
        new_params_with_opt = optax.apply_updates(params_with_opt, updates)
        if overwrite in grads:
            new_params = {"params": new_params_with_opt, overwrite: grads[overwrite]}
        else:
            new_params = new_params_with_opt
        return self.replace(
            step=self.step + 1, params=new_params, opt_state=new_opt_state, **replace
        )


def grad_fn(
    loss_fn: Callable[..., Any], *args: Any, has_aux: bool = False, **kwargs: Any
) -> Callable[[Any], Any]:
    """``params -> jax.grad(loss_fn)(params, *args, **kwargs)``, dropping aux with `has_aux`.

    For BatchNorm models the loss returns ``(loss, new_batch_stats)``: the first pass's
    statistics go into the state and the perturbed pass's are dropped, with the statistics the
    first pass started from in both passes.

    Args:
      loss_fn: ``loss_fn(params, *args, **kwargs) -> loss`` (or ``(loss, aux)`` with `has_aux`).
      *args: its other arguments (batch statistics, batch, dropout key, ...).
      has_aux: `loss_fn` returns ``(loss, aux)``; aux is dropped. A loss that returns a tuple
        without it is a TypeError naming it.
      **kwargs: its keyword arguments.

    Returns:
      A `grad_fn` for sam_optax: params in, gradient pytree out.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> import flax.linen as nn
      >>> class Net(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x, train):
      ...     return nn.Dense(1)(nn.BatchNorm(use_running_average=not train)(x))
      >>> model, x, y = Net(), jnp.arange(8.0).reshape(4, 2), jnp.zeros((4, 1))
      >>> variables = model.init(jax.random.key(0), x, train=False)
      >>> class State(sam_optax.linen.TrainState):
      ...   batch_stats: dict
      >>> state = State.create(apply_fn=model.apply, params=variables["params"],
      ...                      batch_stats=variables["batch_stats"],
      ...                      tx=optax.chain(sam_optax.sam(0.05), optax.sgd(0.1)))
      >>> def loss_fn(params, batch_stats, x, y):
      ...   out, updates = state.apply_fn({"params": params, "batch_stats": batch_stats}, x,
      ...                                 train=True, mutable=["batch_stats"])
      ...   return jnp.mean((out - y) ** 2), updates["batch_stats"]
      >>> (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      ...     state.params, state.batch_stats, x, y)
      >>> state = state.apply_gradients(
      ...     grads=grads, batch_stats=new_stats,
      ...     grad_fn=sam_optax.linen.grad_fn(loss_fn, state.batch_stats, x, y, has_aux=True))
      >>> same = jax.tree.map(jnp.array_equal, state.batch_stats, new_stats)  # the first pass's
      >>> all(jax.tree.leaves(same))
      True
    """

    def loss(params: Any) -> Any:
        out = loss_fn(params, *args, **kwargs)
        return out if has_aux else scalar_loss(out, "sam_optax.linen.grad_fn")

    def gradient(params: Any) -> Any:
        grads = jax.grad(loss, has_aux=has_aux)(params)
        return grads[0] if has_aux else grads

    return gradient


#: The layers whose parameters :func:`normalization_mask` selects.
NORMALIZATION_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.InstanceNorm,
)


def normalization_mask(
    module: nn.Module,
    *init_args: Any,
    rngs: Any = None,
    layers: tuple[type[nn.Module], ...] = NORMALIZATION_LAYERS,
    **init_kwargs: Any,
) -> Any:
    """The `perturb_mask` of SAM-ON: True on the parameters of normalization layers only.

    SAM-ON (Mueller et al.) perturbs only the normalization layers' scales and biases and
    reports most of SAM's gain, sometimes more; the second pass still runs over the whole model.
    The layers are found by their type while ``module.init(rngs, *init_args, **init_kwargs)`` is
    traced abstractly (``jax.eval_shape``: nothing is computed), so named and nested layers
    count as well as auto-named ones.

    Args:
      module: the linen model.
      *init_args: the arguments of its `init` after the keys (an input batch, ...).
      rngs: the keys of `init` (default ``jax.random.key(0)``; only shapes are traced).
      layers: the layer types to select (default :data:`NORMALIZATION_LAYERS`).
      **init_kwargs: keyword arguments of its `init` (e.g. ``train=False``).

    Returns:
      A tree of booleans shaped as the model's ``params`` collection.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> import flax.linen as nn
      >>> class Net(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x):
      ...     return nn.Dense(1)(nn.LayerNorm()(nn.Dense(4)(x)))
      >>> x = jnp.ones((2, 3))
      >>> mask = sam_optax.linen.normalization_mask(Net(), x)
      >>> mask["LayerNorm_0"], mask["Dense_0"]
      ({'bias': True, 'scale': True}, {'bias': False, 'kernel': False})
      >>> tx = optax.chain(sam_optax.sam(0.5, perturb_mask=mask), optax.sgd(0.1))

    References:
      Mueller et al., `Normalization Layers Are All That Sharpness-Aware Minimization Needs
      <https://arxiv.org/abs/2306.04226>`_, NeurIPS 2023.
    """
    paths: set[tuple] = set()

    def record(next_fun: Callable[..., Any], args: Any, kwargs: Any, context: Any) -> Any:
        if isinstance(context.module, layers) and context.method_name == "__call__":
            paths.add(tuple(context.module.path))
        return next_fun(*args, **kwargs)

    keys = jax.random.key(0) if rngs is None else rngs
    with nn.intercept_methods(record):
        variables = jax.eval_shape(lambda: module.init(keys, *init_args, **init_kwargs))
    if "params" not in variables:
        raise ValueError(f"{type(module).__name__}.init returned no 'params' collection.")
    return layer_mask(variables["params"], paths, model=module, layers=layers)
