"""The small MLP problem of the library's tests: its parameters, loss and batches."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def mlp_params(key, sizes=(4, 8, 3)):
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        key, k1, k2 = jax.random.split(key, 3)
        params[f"layer{i}"] = {
            "kernel": jax.random.normal(k1, (fan_in, fan_out)) / np.sqrt(fan_in),
            "bias": 0.1 * jax.random.normal(k2, (fan_out,)),
        }
    return params


def mlp_loss(params, batch):
    x, y = batch
    for i in range(len(params)):
        x = x @ params[f"layer{i}"]["kernel"] + params[f"layer{i}"]["bias"]
        if i < len(params) - 1:
            x = jnp.tanh(x)
    return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()


def mlp_batch(key, n=16):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (n, 4)), jax.random.randint(ky, (n,), 0, 3)
