"""SAM-ON's masks: the parameters of normalization layers, in linen and NNX models."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sam_optax


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(4)(x)
        return nn.BatchNorm(use_running_average=not train, name="bn1")(x)


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = LinenBlock(name="block")(x, train)
        x = nn.GroupNorm(num_groups=2)(x)
        return nn.Dense(2)(nn.LayerNorm()(x))


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.blocks = nnx.List([nnx.LayerNorm(4, rngs=rngs), nnx.Linear(4, 4, rngs=rngs)])
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        x = self.bn(self.dense(x))
        return self.head(self.blocks[1](self.blocks[0](x)))


def flat(tree):
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def test_linen_mask_selects_named_nested_and_auto_named_norms():
    x = jnp.ones((2, 3))
    mask = flat(sam_optax.linen.normalization_mask(LinenNet(), x, train=False))
    selected = sorted(name for name, m in mask.items() if m)
    assert selected == [
        "GroupNorm_0/bias",
        "GroupNorm_0/scale",
        "LayerNorm_0/bias",
        "LayerNorm_0/scale",
        "block/bn1/bias",
        "block/bn1/scale",
    ]
    assert not mask["block/Dense_0/kernel"] and not mask["Dense_0/kernel"]


def test_linen_eps_is_zero_outside_the_norms():
    x = jnp.ones((2, 3))
    model = LinenNet()
    params = model.init(jax.random.key(0), x)["params"]
    mask = sam_optax.linen.normalization_mask(model, x)
    grads = jax.tree.map(jnp.ones_like, params)
    eps = sam_optax.perturbation(grads, params, rho=0.1, perturb_mask=mask)
    for name, value in flat(eps).items():
        assert bool(jnp.any(value != 0)) == flat(mask)[name], name
    # The ascent's norm is taken over the selected leaves: ||eps|| = rho.
    chex.assert_trees_all_close(optax.tree.norm(eps), 0.1, rtol=1e-6)


def test_nnx_mask_and_an_optimizer_step():
    model = NNXNet(nnx.Rngs(0))
    mask = sam_optax.nnx.normalization_mask(model)
    selected = sorted(name for name, m in flat(mask).items() if m)
    assert selected == ["blocks/0/bias", "blocks/0/scale", "bn/bias", "bn/scale"]
    tx = optax.chain(sam_optax.sam(0.5, perturb_mask=mask), optax.sgd(0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x, y = jax.random.normal(jax.random.key(1), (4, 3)), jnp.ones((4, 2))

    def loss_fn(model, x, y):
        return jnp.mean((model(x) - y) ** 2)

    @nnx.jit
    def step(model, optimizer, x, y):
        grad_fn = sam_optax.nnx.grad_fn(loss_fn, model, x, y)
        grads = nnx.grad(loss_fn)(model, x, y)
        optimizer.update(model, grads, grad_fn=grad_fn)

    def weights():
        return jax.tree.map(np.array, nnx.as_pure(nnx.state(model, nnx.Param)))

    before = weights()
    step(model, optimizer, x, y)
    after = weights()
    chex.assert_tree_all_finite(after)
    assert not np.allclose(before["head"]["kernel"], after["head"]["kernel"])


def test_no_norm_layer_is_an_error():
    with pytest.raises(ValueError, match="has no layer of the types"):
        sam_optax.linen.normalization_mask(nn.Dense(2), jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="pass layers="):
        sam_optax.nnx.normalization_mask(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
