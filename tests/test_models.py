"""Tests for the Flax model zoo in experiments/models.py.

The large models are only traced (`jax.eval_shape`); real computation runs on the small CNN,
ResNet-18 at batch 2 and tiny WideResNet/PyramidNet configurations.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import models

CIFAR_SHAPE = (2, 32, 32, 3)
MNIST_SHAPE = (2, 28, 28, 1)
DIGITS_SHAPE = (2, 8, 8, 1)

# Exact parameter counts (10 classes) of the public reference implementations, which ours
# reproduce layer for layer.
REFERENCE_EXACT_COUNTS = {
    "resnet18": 11_173_962,  # kuangliu/pytorch-cifar ResNet18
    "resnet34": 21_282_122,  # kuangliu/pytorch-cifar ResNet34
    "resnet50": 23_520_842,  # kuangliu/pytorch-cifar ResNet50
    "wrn28_10": 36_479_194,  # osmr/imgclsmob wrn28_10_cifar10
    "resnext29_32x4d": 4_775_754,  # osmr/imgclsmob resnext29_32x4d_cifar10
    "pyramidnet110_270": 28_485_477,  # osmr/imgclsmob pyramidnet110_a270_cifar10
    "vgg16_bn": 14_728_266,  # kuangliu/pytorch-cifar VGG('VGG16')
    # Ours; no public figure. Pinned so that accidental architecture changes show up.
    "wrn16_8": 10_961_370,
    "small_cnn": 98_682,
    "mlp": 669_706,  # 784-512-512-10
    "resnet8": 78_042,  # 3 input channels (77,754 on 1-channel Fashion-MNIST)
}

# Ours, without a published count.
OWN_MODELS = {"small_cnn", "mlp", "resnet8"}


def _input_shape(name):
    return MNIST_SHAPE if name in ("small_cnn", "mlp") else CIFAR_SHAPE


def _abstract_init(model, shape):
    """Variables as ShapeDtypeStructs: tracing only, no compute."""
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


def _abstract_logits(model, variables, shape, train=False):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    if train:
        apply = functools.partial(
            model.apply, train=True, mutable=["batch_stats"], rngs=_train_rngs()
        )
        return jax.eval_shape(apply, variables, x)[0]
    return jax.eval_shape(functools.partial(model.apply, train=False), variables, x)


def _train_rngs():
    return {"dropout": jax.random.key(1), "shakedrop": jax.random.key(2)}


def test_registry_names():
    assert set(models.MODELS) == {
        "resnet18",
        "resnet34",
        "resnet50",
        "wrn28_10",
        "wrn16_8",
        "resnext29_32x4d",
        "pyramidnet110_270",
        "vgg16_bn",
        "small_cnn",
        "mlp",
        "resnet8",
    }
    assert set(models.PUBLISHED_PARAM_COUNTS) == set(models.MODELS) - OWN_MODELS


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_param_count_and_output_shape(name):
    model = models.create_model(name, num_classes=10)
    variables = _abstract_init(model, _input_shape(name))
    # The MLP has no BatchNorm, hence no batch_stats.
    assert set(variables) == ({"params"} if name == "mlp" else {"params", "batch_stats"})
    num_params = models.count_params(variables["params"])
    assert num_params == REFERENCE_EXACT_COUNTS[name]
    if name in models.PUBLISHED_PARAM_COUNTS:
        published = models.PUBLISHED_PARAM_COUNTS[name]
        assert abs(num_params - published) <= 0.01 * published
    logits = _abstract_logits(model, variables, _input_shape(name))
    assert logits.shape == (2, 10)
    assert logits.dtype == jnp.float32


@pytest.mark.parametrize(
    "name,num_classes",
    [("resnet18", 100), ("wrn16_8", 100), ("pyramidnet110_270", 7), ("small_cnn", 3)],
)
def test_output_shape_other_num_classes(name, num_classes):
    model = models.create_model(name, num_classes=num_classes)
    variables = _abstract_init(model, _input_shape(name))
    assert _abstract_logits(model, variables, _input_shape(name)).shape == (2, num_classes)
    assert variables["params"]["classifier"]["bias"].shape == (num_classes,)


@pytest.mark.parametrize(
    "cardinality,base_width,published",
    # Xie et al. 2017, Table 7: ResNeXt-29 8x64d 34.4M, 16x64d 68.1M parameters.
    [(8, 64, 34_400_000), (16, 64, 68_100_000)],
)
def test_resnext_matches_paper_variants(cardinality, base_width, published):
    model = models.ResNeXt(depth=29, cardinality=cardinality, base_width=base_width, num_classes=10)
    num_params = models.count_params(_abstract_init(model, CIFAR_SHAPE)["params"])
    assert abs(num_params - published) <= 0.01 * published


@pytest.mark.parametrize("name", ["pyramidnet110_270", "wrn28_10"])
def test_train_mode_traces_with_rngs(name):
    kwargs = {"shakedrop": True} if name.startswith("pyramidnet") else {"dropout_rate": 0.3}
    model = models.create_model(name, num_classes=10, **kwargs)
    variables = _abstract_init(model, CIFAR_SHAPE)
    logits = _abstract_logits(model, variables, CIFAR_SHAPE, train=True)
    assert logits.shape == (2, 10)


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_forward_backward_train_and_eval(name):
    shape = _input_shape(name)
    model = models.create_model(name, num_classes=10)
    variables = models.init_variables(model, jax.random.key(0), shape)
    params, batch_stats = variables["params"], variables["batch_stats"]
    images = jax.random.normal(jax.random.key(1), shape)
    labels = jnp.array([3, 7])

    def loss_fn(params, train):
        if train:
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            new_stats = updates["batch_stats"]
        else:
            # No mutable collections: evaluation must not try to update the statistics.
            logits = model.apply({"params": params, "batch_stats": batch_stats}, images, False)
            new_stats = batch_stats
        log_probs = jax.nn.log_softmax(logits)
        loss = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))
        return loss, (logits, new_stats)

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=1)
    for train in (True, False):
        (loss, (logits, new_stats)), grads = grad_fn(params, train)
        assert logits.shape == (2, 10) and logits.dtype == jnp.float32
        assert np.isfinite(loss)
        leaves = jax.tree_util.tree_leaves(grads)
        assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
        assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
        assert sum(float(jnp.sum(jnp.abs(leaf))) for leaf in leaves) > 0
        stats_changed = [
            not np.allclose(old, new)
            for old, new in zip(
                jax.tree_util.tree_leaves(batch_stats),
                jax.tree_util.tree_leaves(new_stats),
                strict=True,
            )
        ]
        assert all(stats_changed) if train else not any(stats_changed)


def test_eval_mode_uses_running_statistics():
    """In eval mode an example's logits do not depend on the rest of the batch."""
    model = models.create_model("small_cnn", num_classes=10)
    variables = models.init_variables(model, jax.random.key(0), DIGITS_SHAPE)
    images = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    apply = jax.jit(functools.partial(model.apply, train=False))
    np.testing.assert_allclose(apply(variables, images)[:1], apply(variables, images[:1]), 1e-5)


def test_bn_axis_name_averages_statistics_over_the_axis():
    """Two shards of 2 examples with a shared axis give the statistics of the batch of 4."""
    images = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    local = models.create_model("small_cnn", num_classes=10)
    synced = models.create_model("small_cnn", num_classes=10, bn_axis_name="shards")
    variables = models.init_variables(local, jax.random.key(0), DIGITS_SHAPE)

    def train_stats(model, images):
        return model.apply(variables, images, train=True, mutable=["batch_stats"])[1]

    @jax.jit
    def both(images):
        full = train_stats(local, images)
        sharded = jax.vmap(lambda x: train_stats(synced, x), axis_name="shards")(
            images.reshape(2, 2, 8, 8, 1)
        )
        return full, sharded

    full, sharded = both(images)
    for full_leaf, sharded_leaf in zip(
        jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(sharded), strict=True
    ):
        np.testing.assert_allclose(sharded_leaf[0], full_leaf, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(sharded_leaf[1], full_leaf, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_bfloat16_gives_float32_logits_and_params(name):
    model = models.create_model(name, num_classes=10, dtype=jnp.bfloat16)
    variables = _abstract_init(model, _input_shape(name))
    leaves = jax.tree_util.tree_leaves(variables)
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)
    assert _abstract_logits(model, variables, _input_shape(name)).dtype == jnp.float32


def test_bfloat16_small_cnn_computes_in_bfloat16():
    model = models.create_model("small_cnn", num_classes=10, dtype=jnp.bfloat16)
    variables = models.init_variables(model, jax.random.key(0), DIGITS_SHAPE)
    images = jax.random.normal(jax.random.key(1), DIGITS_SHAPE)
    apply = functools.partial(model.apply, train=True, mutable=["batch_stats"])
    jaxpr = jax.make_jaxpr(apply)(variables, images)
    conv_dtypes = {
        eqn.outvars[0].aval.dtype
        for eqn in jaxpr.jaxpr.eqns
        if eqn.primitive.name == "conv_general_dilated"
    }
    assert conv_dtypes == {jnp.dtype(jnp.bfloat16)}
    logits, updates = jax.jit(apply)(variables, images)
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(updates))


def test_shakedrop_rng_only_when_training_and_enabled():
    tiny = functools.partial(models.PyramidNet, depth=8, alpha=12, num_classes=4)
    plain, shaken = tiny(), tiny(shakedrop=True)
    images = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    variables = _abstract_init(shaken, images.shape)
    # Same parameters with or without ShakeDrop.
    plain_params = _abstract_init(plain, images.shape)["params"]
    assert jax.tree_util.tree_structure(plain_params) == jax.tree_util.tree_structure(
        variables["params"]
    )

    def train_apply(model, **kwargs):
        apply = functools.partial(model.apply, train=True, mutable=["batch_stats"], **kwargs)
        return jax.eval_shape(apply, variables, images)[0]

    assert train_apply(plain).shape == (2, 4)  # no rng needed
    eval_apply = functools.partial(shaken.apply, train=False)
    assert jax.eval_shape(eval_apply, variables, images).shape == (2, 4)  # no rng needed
    with pytest.raises(Exception, match="shakedrop"):
        train_apply(shaken)
    assert train_apply(shaken, rngs={"shakedrop": jax.random.key(3)}).shape == (2, 4)


@jax.jit
def _shakedrop_vjp(x, key):
    """Forward value and input gradient of ShakeDrop at keep probabilities 0 and 1."""
    results = []
    for keep_prob in (0.0, 1.0):
        apply = lambda x, p=keep_prob: models.ShakeDrop(p).apply(
            {}, x, True, rngs={"shakedrop": key}
        )
        out, vjp = jax.vjp(apply, x)
        results.append((out, vjp(jnp.ones_like(out))[0]))
    return results


def test_shakedrop_forward_and_backward_factors():
    x = jnp.ones((256, 2, 2, 1))
    (dropped, dropped_grad), (kept, kept_grad) = _shakedrop_vjp(x, jax.random.key(0))
    # Always dropped: forward factor alpha in [-1, 1], backward factor beta in [0, 1].
    alpha, beta = dropped[:, 0, 0, 0], dropped_grad[:, 0, 0, 0]
    assert np.all((alpha >= -1) & (alpha <= 1)) and np.all((beta >= 0) & (beta <= 1))
    assert np.all(dropped == alpha[:, None, None, None])  # one factor per example
    assert np.all(dropped_grad == beta[:, None, None, None])
    assert not np.allclose(alpha, beta)
    assert alpha.min() < 0 < alpha.max()
    # Always kept: identity in both directions.
    np.testing.assert_array_equal(kept, x)
    np.testing.assert_array_equal(kept_grad, x)
    # Evaluation scales by the expected forward factor keep_prob + (1 - keep_prob) E[alpha].
    np.testing.assert_allclose(models.ShakeDrop(0.7).apply({}, x, False), 0.7 * x)


def test_wide_resnet_dropout_needs_rng_when_training():
    images = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    for dropout_rate in (0.0, 0.5):
        model = models.WideResNet(
            depth=10, widen_factor=1, num_classes=10, dropout_rate=dropout_rate
        )
        variables = _abstract_init(model, images.shape)
        train_apply = functools.partial(model.apply, train=True, mutable=["batch_stats"])
        if dropout_rate > 0:
            with pytest.raises(Exception, match="dropout"):
                jax.eval_shape(train_apply, variables, images)
        else:
            jax.eval_shape(train_apply, variables, images)
        rngs = {"dropout": jax.random.key(1)}
        logits, _ = jax.eval_shape(functools.partial(train_apply, rngs=rngs), variables, images)
        assert logits.shape == (2, 10)


def test_small_cnn_handles_digits_shape():
    model = models.create_model("small_cnn", num_classes=10)
    variables = models.init_variables(model, jax.random.key(0), (8, 8, 1))  # HWC is accepted
    assert models.count_params(variables["params"]) == REFERENCE_EXACT_COUNTS["small_cnn"]
    logits = jax.jit(functools.partial(model.apply, train=False))(variables, jnp.ones(DIGITS_SHAPE))
    assert logits.shape == (2, 10)


def test_mlp_widths_and_empty_batch_stats():
    model = models.create_model("mlp", num_classes=3, hidden=(16, 8))
    variables = models.init_variables(model, jax.random.key(0), (8, 8, 1))
    # 64*16+16 + 16*8+8 + 8*3+3
    assert models.count_params(variables["params"]) == 1_203
    assert variables["batch_stats"] == {}
    logits, state = model.apply(
        variables, jnp.ones(DIGITS_SHAPE), train=True, mutable=["batch_stats"]
    )
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    assert state.get("batch_stats", {}) == {}


def test_resnet8_takes_fewer_filters():
    model = models.create_model("resnet8", num_classes=10, num_filters=4)
    variables = _abstract_init(model, MNIST_SHAPE)
    assert models.count_params(variables["params"]) < REFERENCE_EXACT_COUNTS["resnet8"] / 10
    assert _abstract_logits(model, variables, MNIST_SHAPE, train=True).shape == (2, 10)


def test_unknown_model_name_lists_the_names():
    with pytest.raises(ValueError, match="resnet18") as error:
        models.create_model("resnet19", num_classes=10)
    for name in models.MODELS:
        assert name in str(error.value)


def test_bad_arguments_are_reported():
    with pytest.raises(TypeError, match="dropout_rate"):
        models.create_model("resnet18", num_classes=10, dropout_rate=0.3)
    with pytest.raises(ValueError, match="num_classes"):
        models.create_model("resnet18", num_classes=0)
    with pytest.raises(ValueError, match="NHWC"):
        models.init_variables(models.create_model("small_cnn", num_classes=2), None, (8, 8))
    model = models.WideResNet(depth=11, widen_factor=1, num_classes=10)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        _abstract_init(model, CIFAR_SHAPE)


def test_count_params_counts_every_scalar():
    params = {"a": jnp.zeros((2, 3)), "b": {"c": jnp.zeros(4), "d": jnp.zeros(())}}
    assert models.count_params(params) == 11
