"""Exact per-example SAM (sam_optax.per_example, sam_optax.losses) against vmap of jax.grad at
each example's own perturbed parameters."""

from __future__ import annotations

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sam_optax
from sam_optax.per_example import dense

RHO = 0.3
TOLERANCE = dict(atol=1e-6, rtol=1e-5)  # float32


def mlp_params(key, sizes, *, bias=True):
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        key, w_key, b_key = jax.random.split(key, 3)
        params[f"w{i}"] = jax.random.normal(w_key, (fan_in, fan_out)) / np.sqrt(fan_in)
        if bias:
            params[f"b{i}"] = 0.1 * jax.random.normal(b_key, (fan_out,))
    return params


def mlp(params, x, activation=jax.nn.relu):
    layers = sum(name.startswith("w") for name in params)
    for i in range(layers):
        x = dense(x, params[f"w{i}"], params.get(f"b{i}"))
        if i < layers - 1:
            x = activation(x)
    return x


def batch(size=8, features=5, classes=3):
    x = jax.random.normal(jax.random.key(1), (size, features))
    y = jax.nn.one_hot(jax.random.randint(jax.random.key(2), (size,), 0, classes), classes)
    return x, y


def cross_entropy_loss(model):
    return lambda params, x, y: jnp.mean(optax.softmax_cross_entropy(model(params, x), y))


def reference(loss_fn, params, x, y, rho, group_size=1, perturbed=None):
    """The mean over groups of grad L_g at (w + rho n(grad L_g)); eps only on the entries of a
    dict of params that `perturbed` accepts (every parameter of any pytree without it)."""

    def one(xg, yg):
        g = jax.grad(loss_fn)(params, xg, yg)
        if perturbed is not None:
            g = {k: v if perturbed(k) else jnp.zeros_like(v) for k, v in g.items()}
        norm = optax.global_norm(g)
        eps = jax.tree.map(lambda v: jnp.where(norm > 0, rho * v / norm, 0.0), g)
        return jax.grad(loss_fn)(jax.tree.map(jnp.add, params, eps), xg, yg)

    groups = lambda v: v.reshape(-1, group_size, *v.shape[1:])  # noqa: E731
    return jax.tree.map(lambda v: v.mean(0), jax.vmap(one)(groups(x), groups(y)))


@pytest.mark.parametrize("group_size", [1, 4])
@pytest.mark.parametrize("activation", [jax.nn.relu, jax.nn.gelu], ids=["relu", "gelu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_every_dense_layer_matches_vmap(group_size, activation, bias):
    params = mlp_params(jax.random.key(0), [5, 7, 6, 3], bias=bias)
    loss_fn = cross_entropy_loss(lambda p, x: mlp(p, x, activation))
    x, y = batch()
    loss, grads, sam_grad_fn = sam_optax.per_example.value_and_grad(loss_fn, group_size=group_size)(
        params, x, y
    )
    chex.assert_trees_all_close(loss, loss_fn(params, x, y), **TOLERANCE)
    chex.assert_trees_all_close(grads, jax.grad(loss_fn)(params, x, y), **TOLERANCE)
    expected = reference(loss_fn, params, x, y, RHO, group_size)
    chex.assert_trees_all_close(sam_grad_fn(RHO), expected, **TOLERANCE)
    chex.assert_trees_all_close(sam_grad_fn(0.0), grads, **TOLERANCE)


@pytest.mark.parametrize("last_layers", [1, 2])
@pytest.mark.parametrize("activation", [jax.nn.relu, jax.nn.gelu], ids=["relu", "gelu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_last_layers_in_one_pass_match_vmap(last_layers, activation, bias):
    params = mlp_params(jax.random.key(0), [5, 7, 6, 3], bias=bias)
    loss_fn = cross_entropy_loss(lambda p, x: mlp(p, x, activation))
    x, y = batch()
    shifted = sam_optax.per_example.sam_loss(loss_fn, RHO, last_layers=last_layers)
    (value, loss), grads = jax.value_and_grad(shifted, has_aux=True)(params, x, y)
    last = {str(i) for i in range(3 - last_layers, 3)}
    expected = reference(loss_fn, params, x, y, RHO, perturbed=lambda name: name[1:] in last)
    chex.assert_trees_all_close(grads, expected, **TOLERANCE)
    chex.assert_trees_all_close(loss, loss_fn(params, x, y), **TOLERANCE)
    assert value > loss  # the loss at the ascent points
    at_zero = sam_optax.per_example.sam_loss(loss_fn, 0.0, last_layers=last_layers)
    chex.assert_trees_all_close(
        jax.grad(lambda p: at_zero(p, x, y)[0])(params), jax.grad(loss_fn)(params, x, y),
        **TOLERANCE,
    )  # fmt: skip


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_head_sam_cross_entropy_is_the_one_pass_head(bias):
    params = mlp_params(jax.random.key(0), [5, 7, 6, 3], bias=bias)
    x, y = batch()

    def features(p, x):
        for i in range(2):
            x = jax.nn.gelu(x @ p[f"w{i}"] + (p[f"b{i}"] if bias else 0))
        return x

    def head_sam_loss(p, rho):
        a = features(p, x)
        logits = a @ p["w2"] + (p["b2"] if bias else 0)
        return jnp.mean(
            sam_optax.losses.head_sam_softmax_cross_entropy(logits, y, a, rho, bias=bias)
        )

    loss_fn = cross_entropy_loss(lambda p, x: mlp(p, x, jax.nn.gelu))
    expected = reference(loss_fn, params, x, y, RHO, perturbed=lambda name: name[1:] == "2")
    chex.assert_trees_all_close(jax.grad(head_sam_loss)(params, RHO), expected, **TOLERANCE)
    chex.assert_trees_all_close(
        jax.grad(head_sam_loss)(params, 0.0), jax.grad(loss_fn)(params, x, y), **TOLERANCE
    )


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(16)(x))
        x = nn.relu(nn.Dense(16, use_bias=False)(x))
        return nn.Dense(3)(x)


class NNXMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(5, 16, rngs=rngs)
        self.head = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.hidden(x)))


def linen_problem():
    model = LinenMLP()
    x, y = batch()
    params = model.init(jax.random.key(0), x)["params"]
    return params, cross_entropy_loss(lambda p, x: model.apply({"params": p}, x))


def nnx_problem():
    graphdef, params = nnx.split(NNXMLP(nnx.Rngs(0)), nnx.Param)
    return params, cross_entropy_loss(lambda p, x: nnx.merge(graphdef, p)(x))


@pytest.mark.parametrize("group_size", [1, 4])
@pytest.mark.parametrize("problem", [linen_problem, nnx_problem], ids=["linen", "nnx"])
def test_flax_models_match_vmap(problem, group_size):
    params, loss_fn = problem()
    x, y = batch()
    _, _, sam_grad_fn = sam_optax.per_example.value_and_grad(loss_fn, group_size=group_size)(
        params, x, y
    )
    chex.assert_trees_all_close(
        sam_grad_fn(RHO), reference(loss_fn, params, x, y, RHO, group_size), **TOLERANCE
    )


def test_nnx_linear_is_restored_after_the_trace():
    call = nnx.Linear.__call__
    params, loss_fn = nnx_problem()
    sam_optax.per_example.value_and_grad(loss_fn)(params, *batch())
    assert nnx.Linear.__call__ is call


def test_per_example_sam_in_a_jitted_chain():
    params, loss_fn = linen_problem()
    x, y = batch()
    schedule = lambda count: jnp.where(count >= 2, 1.0, 0.0)  # noqa: E731  SGD first, then SAM
    tx = optax.chain(sam_optax.per_example_sam(schedule, stable=True), optax.sgd(0.1))

    @jax.jit
    def step(params, state):
        _, grads, sam_grad_fn = sam_optax.per_example.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params, sam_grad_fn=sam_grad_fn)
        return updates, state, grads, sam_grad_fn(1.0)

    state = tx.init(params)
    for count in range(3):
        updates, state, grads, g_sam = step(params, state)
        expected = grads if count < 2 else g_sam
        scale = -0.1 * optax.global_norm(grads) / optax.global_norm(expected)
        chex.assert_trees_all_close(updates, optax.tree.scale(scale, expected), **TOLERANCE)
    assert int(state[0].count) == 3


def test_per_example_sam_static_zero_rho_and_non_finite():
    tx = sam_optax.per_example_sam(0.0)
    grads = {"w": jnp.ones(2)}
    updates, _ = tx.update(grads, tx.init(grads), grads, sam_grad_fn=lambda rho: 1 / 0)
    chex.assert_trees_all_equal(updates, grads)
    tx = sam_optax.per_example_sam(0.1)
    nan = {"w": jnp.array([1.0, jnp.nan])}
    updates, _ = tx.update(nan, tx.init(nan), nan, sam_grad_fn=lambda rho: {"w": jnp.ones(2)})
    assert jnp.all(jnp.isnan(updates["w"]))


def test_per_example_sam_under_inject_hyperparams():
    params = mlp_params(jax.random.key(0), [5, 4, 3])
    loss_fn = cross_entropy_loss(mlp)
    tx = optax.inject_hyperparams(sam_optax.per_example_sam)(rho=RHO)
    _, grads, sam_grad_fn = sam_optax.per_example.value_and_grad(loss_fn)(params, *batch())
    updates, state = jax.jit(lambda s: tx.update(grads, s, params, sam_grad_fn=sam_grad_fn))(
        tx.init(params)
    )
    chex.assert_trees_all_close(updates, sam_grad_fn(RHO), **TOLERANCE)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: sam_optax.per_example.value_and_grad(lambda p, x: 0.0)({}, 1.0), "no dense"),
        (lambda: sam_optax.per_example.value_and_grad(print, group_size=0), "group_size"),
        (lambda: sam_optax.per_example.sam_loss(print, 0.1, last_layers=0), "last_layers"),
        (
            lambda: sam_optax.per_example.value_and_grad(
                lambda p, x: jnp.sum(dense(x, p)), group_size=3
            )(jnp.ones((2, 2)), jnp.ones((4, 2)))[2](0.1),
            "must divide",
        ),
        (
            lambda: sam_optax.per_example.value_and_grad(lambda p, x: jnp.sum(dense(x, p)))(
                jnp.ones((2, 2)), jnp.ones((4, 3, 2))
            ),
            "(batch, features)",
        ),
        (
            lambda: sam_optax.per_example.value_and_grad(lambda p, x: dense(x, p))(
                jnp.ones((2, 2)), jnp.ones((4, 2))
            ),
            "jnp.mean",
        ),
    ],
    ids=["no_dense_layer", "group_size", "last_layers", "group_divides", "rank", "scalar"],
)
def test_bad_input_is_one_clear_error(call, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        call()


def test_missing_sam_grad_fn_shows_the_call():
    tx = sam_optax.per_example_sam(0.1)
    with pytest.raises(TypeError, match="sam_grad_fn=sam_grad_fn"):
        tx.update({"w": jnp.ones(1)}, tx.init({}), {})


def test_head_step_costs_a_plain_step_in_flops():
    """The one-pass head ascent on the frontier's MLP (784-512-512-10, batch 128)."""
    params = mlp_params(jax.random.key(0), [784, 512, 512, 10])
    x, y = batch(128, 784, 10)
    loss_fn = cross_entropy_loss(mlp)
    shifted = sam_optax.per_example.sam_loss(loss_fn, RHO, last_layers=1)

    def flops(fn):
        cost = jax.jit(fn).lower(params).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    plain = flops(lambda p: jax.grad(loss_fn)(p, x, y))
    head = flops(lambda p: jax.grad(lambda p: shifted(p, x, y)[0])(p))
    assert head <= 1.05 * plain, (head, plain)


def test_per_device_examples_under_shard_map():
    """Each device's examples ascend on their own; the output is the mean over all examples."""
    params = mlp_params(jax.random.key(0), [5, 7, 3])
    loss_fn = cross_entropy_loss(mlp)
    x, y = batch(16)
    tx = sam_optax.per_example_sam(RHO, axis_name="data")
    mesh = jax.make_mesh((8,), ("data",))
    P = jax.sharding.PartitionSpec

    def step(params, x, y):
        local = sam_optax.per_device(params, "data")
        _, grads, sam_grad_fn = sam_optax.per_example.value_and_grad(loss_fn)(local, x, y)
        return tx.update(grads, tx.init(params), params, sam_grad_fn=sam_grad_fn)[0]

    sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P())
    expected = reference(loss_fn, params, x, y, RHO)
    x, y = jax.device_put((x, y), jax.sharding.NamedSharding(mesh, P("data")))
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, P()))
    chex.assert_trees_all_close(jax.jit(sharded)(params, x, y), expected, **TOLERANCE)


@pytest.mark.parametrize("stable", [False, True])
def test_micro_batches_in_vectorized_chunks_match_the_scan(stable):
    """The exact path for any model: one ascent per example, chunks of them under vmap."""
    params = mlp_params(jax.random.key(0), [5, 7, 3])
    loss_fn = cross_entropy_loss(mlp)
    x, y = batch(8)
    tx = sam_optax.sam(RHO, stable=stable)
    micro_batches = (x.reshape(8, 1, 5), y.reshape(8, 1, 3))

    def update(chunk):
        return tx.update(
            None, tx.init(params), params, grad_fn=lambda p, b: jax.grad(loss_fn)(p, *b),
            micro_batches=micro_batches, micro_batch_chunk=chunk,
        )[0]  # fmt: skip

    scanned = update(1)
    if not stable:
        chex.assert_trees_all_close(scanned, reference(loss_fn, params, x, y, RHO), **TOLERANCE)
    for chunk in (4, 8):
        chex.assert_trees_all_close(jax.jit(update, static_argnums=0)(chunk), scanned, **TOLERANCE)
    with pytest.raises(ValueError, match="micro_batch_chunk must be an int >= 1 that divides"):
        update(3)
