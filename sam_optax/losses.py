r"""Loss-level relatives of per-example SAM, in the style of `optax.losses`.

* :func:`head_sam_softmax_cross_entropy`: per-example SAM on the last dense layer under
  cross-entropy, exactly, in the loss (one gradient evaluation);
* :func:`last_layer_l2_penalty`: the L2 penalties on the last layer's weights and on the
  features that Baek et al. derive as 1-SAM's effect in two-layer linear networks (a
  regularizer, not SAM).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["head_sam_softmax_cross_entropy", "last_layer_l2_penalty"]


def head_sam_softmax_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    features: jax.Array,
    rho: float | jax.Array,
    *,
    bias: bool = True,
) -> jax.Array:
    r"""Each example's cross-entropy at its own ascent point of the last dense layer.

    For logits z = W a + b and the per-example ascent on (W, b), eps_i = rho g_i / ||g_i|| with
    g_i = (d_i a_i^T, d_i) and d_i = softmax(z_i) - y_i, the perturbation only shifts the
    example's logits:

    .. math::

      l_i(W + \epsilon_{W,i}, b + \epsilon_{b,i}) =
      \ell\big(z_i + \rho\, \mathrm{sg}(d_i / \|d_i\|)\, \sqrt{\|a_i\|^2 + 1},\; y_i\big),

    and with a_i not stopped, the gradient of the mean of these losses with respect to every
    parameter of the network is the mean of the per-example gradients at (W + eps_i, b + eps_b,i):
    per-example SAM restricted to the head, exactly, at one gradient evaluation. rho = 0 is the
    plain cross-entropy. It is :func:`sam_optax.per_example.sam_loss` with ``last_layers=1`` in
    closed form, for code that has the logits and the head's input at hand.

    Args:
      logits: the head's outputs z, (batch, classes).
      labels: the targets y, probabilities of shape (batch, classes), as for
        `optax.softmax_cross_entropy` (e.g. `jax.nn.one_hot`, smoothed or not).
      features: the head's inputs a, (batch, features), not stopped: the gradient reaches the
        layers below through them.
      rho: the radius, >= 0. The norm covers the head only, so good values differ from SAM's.
      bias: whether the head has a bias (the + 1 under the square root).

    Returns:
      The per-example losses at the shifted logits, (batch,).

    Example:
      >>> import jax, jax.numpy as jnp, sam_optax
      >>> logits, features = jnp.array([[2.0, 0.0]]), jnp.array([[1.0, 1.0]])
      >>> labels = jnp.array([[0.0, 1.0]])
      >>> sam_optax.losses.head_sam_softmax_cross_entropy(logits, labels, features, 0.0)
      Array([2.126928], dtype=float32)

    References:
      Baek, Kolter and Raghunathan, `Why is SAM Robust to Label Noise?
      <https://arxiv.org/abs/2405.03676>`_, ICLR 2024.
    """
    wide = jnp.promote_types(logits.dtype, jnp.float32)
    z = logits.astype(wide)
    a = features.astype(wide).reshape(features.shape[0], -1)
    d = jax.lax.stop_gradient(jax.nn.softmax(z) - labels.astype(wide))
    a_first = jax.lax.stop_gradient(a)
    offset = 1.0 if bias else 0.0
    norm = jnp.linalg.norm(d, axis=-1, keepdims=True) * jnp.sqrt(
        jnp.sum(a_first**2, -1, keepdims=True) + offset
    )
    coefficient = jnp.asarray(rho, wide) * jnp.where(norm > 0, d / jnp.where(norm > 0, norm, 1), 0)
    # Equal to rho n(d) sqrt(||a||^2 + 1) in value; its gradient in a is (W + eps)'s contribution.
    shift = coefficient * (jnp.sum(a_first * a, -1, keepdims=True) + offset)
    return optax.softmax_cross_entropy(z + shift, labels.astype(wide))


def last_layer_l2_penalty(
    kernel: jax.Array,
    features: jax.Array,
    *,
    weight_penalty: float | jax.Array,
    feature_penalty: float | jax.Array,
) -> jax.Array:
    r"""gamma_w ||W||_F^2 + gamma_a mean_i ||a_i||^2: Baek et al.'s cheap stand-in for 1-SAM.

    Add it to the loss of plain SGD. In two-layer linear networks, 1-SAM's effect through the
    network's Jacobian equals L2 penalties on the last layer's weights W and on the features a_i
    that layer reads; Baek et al. report that adding them to SGD in deep networks recovers much
    of 1-SAM's gain under label noise. It is a regularizer, not SAM: no ascent, no second pass,
    and no claim to equal 1-SAM beyond the linear case. Tune both weights on validation data.

    Args:
      kernel: the last dense layer's weights W.
      features: its inputs a, (batch, ...); the mean over the batch of their squared norms.
      weight_penalty: gamma_w >= 0.
      feature_penalty: gamma_a >= 0.

    Returns:
      The penalty, a float32 scalar.

    Example:
      >>> import jax.numpy as jnp, sam_optax
      >>> penalty = sam_optax.losses.last_layer_l2_penalty(
      ...     jnp.ones((2, 2)), jnp.ones((3, 2)), weight_penalty=0.1, feature_penalty=0.5)
      >>> round(float(penalty), 4)
      1.4

    References:
      Baek, Kolter and Raghunathan, `Why is SAM Robust to Label Noise?
      <https://arxiv.org/abs/2405.03676>`_, ICLR 2024.
    """
    wide = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))  # noqa: E731
    a = wide(features).reshape(features.shape[0], -1)
    return weight_penalty * jnp.sum(wide(kernel) ** 2) + feature_penalty * jnp.mean(
        jnp.sum(a**2, -1)
    )
