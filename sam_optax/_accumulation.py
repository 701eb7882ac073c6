"""Gradient accumulation for SAM: the gradient of a large batch with the memory of one micro-batch.

Two meanings, side by side (k micro-batches of m examples each):

* global ascent, :func:`accumulate_grad_fn`: eps from the mean gradient over the k micro-batches
  and the SAM gradient averaged over them, i.e. SAM on the whole batch up to float rounding. It is
  a plain `grad_fn`, so it works with every transformation of this library.
* per-micro-batch ascent, ``sam(...).update(None, state, params, grad_fn=per_batch_grad_fn,
  micro_batches=micro_batches)``: each micro-batch ascends from its own gradient and the k SAM
  gradients are averaged, i.e. m-sharpness with m the micro-batch size (the same as
  ``sam(axis_name=...)`` under ``jax.vmap`` over the same sub-batches).

Both run the micro-batches through `lax.scan`, so the temporaries of the compiled step grow with
the micro-batch, not with k.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_optax._grad_fn import GradFn, micro_batch_count
from sam_optax._parallel import varying_like
from sam_optax._tree import wide_dtype

BatchGradFn = Callable[[optax.Params, Any], optax.Updates]


def accumulate_grad_fn(grad_fn: BatchGradFn, micro_batches: Any) -> GradFn:
    r"""The mean gradient over stacked micro-batches, one micro-batch in memory at a time.

    Returns ``p -> (1/k) sum_i grad_fn(p, micro_batches[i])``, computed with `lax.scan` (sums in
    at least float32), where every leaf of `micro_batches` stacks the k micro-batches on its
    leading axis. Use it for both gradients of a SAM step to get SAM on the whole batch (the
    ascent from the mean gradient) with the memory of one micro-batch:

    .. math::

      g = \frac1k \sum_i \nabla L_i(w), \quad \epsilon = \rho\, g / \|g\|_2, \quad
      g_{\rm SAM} = \frac1k \sum_i \nabla L_i(w + \epsilon).

    Args:
      grad_fn: ``grad_fn(params, micro_batch) -> gradient pytree``, e.g. ``jax.grad(loss_fn)``
        for a loss that averages over the micro-batch (equal micro-batch sizes then make the mean
        of the k gradients the gradient of the whole batch).
      micro_batches: a pytree whose leaves have a leading axis of size k, e.g.
        ``jax.tree.map(lambda x: x.reshape(k, -1, *x.shape[1:]), batch)``.

    Returns:
      A function of the params returning the mean gradient, to pass as `grad_fn` and to call
      once for `updates`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> def loss_fn(params, batch):
      ...   x, y = batch
      ...   return jnp.mean((x @ params["w"] - y) ** 2)
      >>> x, y = jnp.ones((8, 3)), jnp.arange(8.0)
      >>> micro_batches = (x.reshape(4, 2, 3), y.reshape(4, 2))   # k = 4 micro-batches of 2
      >>> params = {"w": jnp.zeros(3)}
      >>> grad_fn = sam_optax.accumulate_grad_fn(jax.grad(loss_fn), micro_batches)
      >>> tx = optax.chain(sam_optax.sam(0.05), optax.sgd(0.1))
      >>> updates, _ = tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)
      >>> whole = lambda p: jax.grad(loss_fn)(p, (x, y))
      >>> expected, _ = tx.update(whole(params), tx.init(params), params, grad_fn=whole)
      >>> bool(jnp.allclose(updates["w"], expected["w"], rtol=1e-6))
      True
    """
    k = micro_batch_count(micro_batches)

    def mean_grad_fn(params: optax.Params) -> optax.Updates:
        first = jax.tree.map(lambda x: x[0], micro_batches)
        shapes = jax.eval_shape(grad_fn, params, first)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, wide_dtype(s.dtype)), shapes)
        zeros = varying_like(zeros, params, micro_batches)

        def body(total, batch):
            g = grad_fn(params, batch)
            return jax.tree.map(lambda t, x: t + jnp.asarray(x, t.dtype), total, g), None

        total, _ = jax.lax.scan(body, zeros, micro_batches)
        return jax.tree.map(lambda t, s: (t / k).astype(s.dtype), total, shapes)

    return mean_grad_fn
