"""sam-optax transformations inside and around optax's wrappers: what works, and what is refused
with the call to write instead (docs/guides/composing.md)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

# Every public factory of a SAM transformation, with small hyperparameters.
FACTORIES = {
    "sam": (sam_optax.sam, dict(rho=0.1)),
    "stable_sam": (sam_optax.stable_sam, dict(rho=0.1)),
    "asam": (sam_optax.asam, dict(rho=0.5)),
    "usam": (sam_optax.usam, dict(rho=0.1)),
    "gsam": (sam_optax.gsam, dict(rho=0.1, alpha=0.3)),
    "looksam": (sam_optax.looksam, dict(rho=0.1, k=2)),
    "friendly_sam": (sam_optax.friendly_sam, dict(rho=0.1)),
    "vasso": (sam_optax.vasso, dict(rho=0.1)),
}

# L(w, b) = 1/2 w^T A w + 1/2 |b - 1|^2.
A = jnp.array([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.25]])
PARAMS = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.zeros(2)}


def grad_fn(params):
    return {"w": A @ params["w"], "b": params["b"] - 1.0}


def step(tx, params=PARAMS, grads=None, fn=grad_fn):
    state = tx.init(params)
    grads = fn(params) if grads is None else grads
    return tx.update(grads, state, params, grad_fn=fn)


def factory(name, **kwargs):
    make, hyperparameters = FACTORIES[name]
    return make(**hyperparameters, **kwargs)


# --------------------------------------------------------------------------------------------
# optax.masked and optax.multi_transform.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FACTORIES)
def test_masked_around_sam_says_to_use_perturb_mask(name):
    tx = optax.masked(factory(name), {"w": True, "b": False})
    with pytest.raises(ValueError, match=r"perturb_mask=mask\), optax.multi_transform"):
        step(tx)


@pytest.mark.parametrize("name", ["sam", "gsam"])
def test_multi_transform_with_sam_inside_raises_when_jitted(name):
    tx = optax.multi_transform(
        {"sam": optax.chain(factory(name), optax.sgd(0.1)), "plain": optax.sgd(0.1)},
        {"w": "sam", "b": "plain"},
    )
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match="SAM needs the full parameters"):
        jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))(grad_fn(PARAMS), state, PARAMS)


def test_perturb_mask_in_front_of_multi_transform_equals_masked_ascent():
    mask = {"w": True, "b": False}
    tx = optax.chain(
        sam_optax.sam(0.1, perturb_mask=mask),
        optax.multi_transform({"a": optax.sgd(0.1), "b": optax.sgd(0.2)}, {"w": "a", "b": "b"}),
    )
    updates, _ = step(tx)
    g_sam, _ = step(sam_optax.sam(0.1, perturb_mask=mask))
    np.testing.assert_allclose(updates["w"], -0.1 * g_sam["w"], rtol=1e-6)
    np.testing.assert_allclose(updates["b"], -0.2 * g_sam["b"], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# optax.apply_if_finite.
# --------------------------------------------------------------------------------------------


def edge_grad_fn(params):  # the gradient of -sum(sqrt(1.2 - w)): NaN for w > 1.2
    return jax.grad(lambda p: -jnp.sum(jnp.sqrt(1.2 - p["w"])))(params)


EDGE = {"w": jnp.array([1.15])}


def test_apply_if_finite_around_the_base_optimizer_skips_a_nan_at_w_plus_eps():
    tx = optax.chain(sam_optax.sam(0.1), optax.apply_if_finite(optax.sgd(0.01), 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        updates, state = step(tx, EDGE, fn=edge_grad_fn)
    assert int(state[1].total_notfinite) == 1
    np.testing.assert_array_equal(updates["w"], 0.0)


@pytest.mark.parametrize("name", ["sam", "vasso"])
def test_apply_if_finite_around_sam_warns(name):
    tx = optax.apply_if_finite(optax.chain(factory(name), optax.sgd(0.01)), 5)
    with pytest.warns(UserWarning, match=r"optax.chain\(sam_optax.\w+\(rho\), optax.apply_if"):
        step(tx)


# --------------------------------------------------------------------------------------------
# optax.lookahead.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FACTORIES)
def test_lookahead_behind_sam_perturbs_the_fast_weights(name):
    fast = {"w": jnp.array([0.5, -1.0, 0.25]), "b": jnp.ones(2)}
    params = optax.LookaheadParams(fast=fast, slow=PARAMS)
    tx = optax.chain(
        factory(name), optax.lookahead(optax.sgd(0.1), sync_period=5, slow_step_size=0.5)
    )
    updates, _ = step(tx, params, grads=grad_fn(fast))
    # Before the first sync, lookahead applies the fast optimizer to the fast weights only.
    expected, _ = step(optax.chain(factory(name), optax.sgd(0.1)), fast)
    for key in fast:
        np.testing.assert_allclose(updates.fast[key], expected[key], rtol=1e-6)
        np.testing.assert_array_equal(updates.slow[key], 0.0)


@pytest.mark.parametrize("name", ["sam", "looksam"])
def test_lookahead_around_sam_names_the_alternative(name):
    # Called with grad_fn=, optax's lookahead itself refuses the keyword before sam runs; inside a
    # chain (which drops grad_fn for a plain GradientTransformation) sam is called without it.
    tx = optax.chain(optax.lookahead(optax.chain(factory(name), optax.sgd(0.1)), 5, 0.5))
    params = optax.LookaheadParams.init_synced(PARAMS)
    with pytest.raises(TypeError, match=r"optax.chain\(sam_optax.sam\(rho\), optax.lookahead"):
        tx.update(grad_fn(PARAMS), tx.init(params), params, grad_fn=grad_fn)


# --------------------------------------------------------------------------------------------
# Chain order: check_input_gradient.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FACTORIES)
def test_check_input_gradient_catches_a_transformation_in_front(name):
    wrong = optax.chain(optax.sgd(0.1, momentum=0.9), factory(name, check_input_gradient=True))
    with pytest.raises(ValueError, match="sam must come first"):
        step(wrong)
    right = optax.chain(factory(name, check_input_gradient=True), optax.sgd(0.1, momentum=0.9))
    checked, _ = step(right)
    unchecked, _ = step(optax.chain(factory(name), optax.sgd(0.1, momentum=0.9)))
    for key in PARAMS:
        np.testing.assert_array_equal(checked[key], unchecked[key])


@pytest.mark.parametrize("name", FACTORIES)
def test_a_descent_step_in_front_is_caught_without_check_input_gradient(name):
    # The default check compares the updates with the perturbed gradient (tests/test_chain_order).
    with pytest.raises(ValueError, match=r"optax.chain\(sam_optax.\w+\(...\), optax.adamw"):
        step(optax.chain(optax.sgd(0.1), factory(name)))


def test_check_input_gradient_sees_what_the_default_check_cannot():
    # A scaling in front keeps the gradient's direction: only an evaluation of grad_fn sees it.
    scaled = optax.chain(optax.scale(0.5), sam_optax.sam(0.1))
    step(scaled)
    with pytest.raises(ValueError, match="sam must come first"):
        step(optax.chain(optax.scale(0.5), sam_optax.sam(0.1, check_input_gradient=True)))


def test_check_input_gradient_under_jit_raises_on_the_first_step_only():
    tx = sam_optax.sam(0.1, check_input_gradient=True)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))
    wrong = jax.tree.map(lambda g: -0.1 * g, grad_fn(PARAMS))
    with pytest.raises(jax.errors.JaxRuntimeError, match="sam must come first"):
        jax.block_until_ready(update(wrong, tx.init(PARAMS), PARAMS))
    later = sam_optax.SAMState(count=jnp.ones([], jnp.int32))
    jax.block_until_ready(update(wrong, later, PARAMS))  # not checked after the first step
    jax.block_until_ready(update(grad_fn(PARAMS), tx.init(PARAMS), PARAMS))


# --------------------------------------------------------------------------------------------
# grad_fn's signature.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FACTORIES)
def test_a_two_argument_grad_fn_names_the_fix(name):
    with pytest.raises(TypeError, match=r"lambda p: grad_fn\(p, 0\)"):
        step(factory(name), grads=grad_fn(PARAMS), fn=lambda params, i: grad_fn(params))


def test_micro_batches_need_a_two_argument_grad_fn():
    tx = sam_optax.sam(0.1)
    with pytest.raises(TypeError, match=r"grad_fn\(params, micro_batch\)"):
        tx.update(None, tx.init(PARAMS), PARAMS, grad_fn=grad_fn, micro_batches=jnp.ones((2, 1)))


# --------------------------------------------------------------------------------------------
# Flax's TrainState.
# --------------------------------------------------------------------------------------------


def test_flax_train_state_points_to_the_sam_optax_train_state():
    train_state = pytest.importorskip("flax.training.train_state")
    state = train_state.TrainState.create(
        apply_fn=None, params=PARAMS, tx=optax.chain(sam_optax.sam(0.1), optax.sgd(0.1))
    )
    with pytest.raises(TypeError, match=r"Use sam_optax.linen.TrainState"):
        state.apply_gradients(grads=grad_fn(PARAMS), grad_fn=grad_fn)
