"""The optimizer built for a configuration: the registry's variants, the schedules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from experiments import config as config_lib
from experiments import optimizer_registry, optimizers

# What each --optimizer name must stand for, written out here apart from the registry.
EXPECTED_KNOBS: dict[str, dict[str, bool]] = {
    "sam": dict(normalize=True, stable=False, adaptive=False),
    "stable_sam": dict(normalize=True, stable=True, adaptive=False),
    "asam": dict(normalize=True, stable=False, adaptive=True),
    "stable_asam": dict(normalize=True, stable=True, adaptive=True),
    "usam": dict(normalize=False, stable=False, adaptive=False),
    "stable_usam": dict(normalize=False, stable=True, adaptive=False),
}


def tiny_config(**overrides) -> config_lib.TrainConfig:
    values = dict(dataset="cifar10", batch_size=16, epochs=2, output_dir="unused")
    values.update(overrides)
    return config_lib.resolve(config_lib.TrainConfig(**values))


def test_the_registry_holds_the_expected_variants():
    assert set(EXPECTED_KNOBS) <= set(optimizer_registry.VARIANTS)
    for name, variant in optimizer_registry.VARIANTS.items():
        assert variant.name == name and variant.label and variant.color and variant.paper
        # The last-layer penalty is a regularizer: it has no ascent and no rho.
        assert variant.default_rho > 0 or name == "last_layer_penalty"
        assert variant.adaptive_rho == variant.knobs.get("adaptive", False)


@pytest.mark.parametrize("name", list(EXPECTED_KNOBS))
def test_optimizer_names_are_the_right_sam_variants(name):
    # Without a device axis, compare one update with sam_optax's own transformation.
    config = tiny_config(optimizer=name)
    knobs = EXPECTED_KNOBS[name]
    tx = optimizers.build_optimizer(config, steps_per_epoch=2, axis_name=None)
    sgd = optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(optimizers.learning_rate_schedule(config, 2), momentum=0.9),
    )
    reference = optax.chain(sam_optax.sam(config.rho, **knobs), sgd)
    params = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([0.3])}

    def loss(p):
        return jnp.sum(jnp.sin(p["w"]) ** 2) + jnp.sum(p["w"] ** 3) * p["b"][0]

    grad_fn = jax.grad(loss)
    grads = grad_fn(params)
    got, _ = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
    want, _ = reference.update(grads, reference.init(params), params, grad_fn=grad_fn)
    jax.tree.map(np.testing.assert_allclose, got, want)
    sgd_update, _ = sgd.update(grads, sgd.init(params), params)
    assert not np.allclose(got["w"], sgd_update["w"])  # the ascent changed the gradient


def test_learning_rate_schedules():
    cosine = optimizers.learning_rate_schedule(tiny_config(epochs=4), steps_per_epoch=10)
    assert float(cosine(0)) == pytest.approx(0.1) and float(cosine(40)) == pytest.approx(0.0)
    assert float(cosine(20)) == pytest.approx(0.05)
    multistep = optimizers.learning_rate_schedule(
        tiny_config(epochs=4, lr_schedule="multistep", lr_milestones="1,3"), steps_per_epoch=10
    )
    assert [float(multistep(s)) for s in (9, 10, 29, 30)] == pytest.approx([0.1, 0.01, 0.01, 0.001])
    warm = optimizers.learning_rate_schedule(tiny_config(warmup_epochs=1), steps_per_epoch=10)
    assert float(warm(0)) == 0.0 and float(warm(10)) == pytest.approx(0.1)


# The variants beyond sam(): --optimizer name -> (factory, its keywords from the config's flags).
EXPECTED_FACTORIES = {
    "gsam": (sam_optax.gsam, dict(alpha=0.1)),
    "stable_gsam": (sam_optax.gsam, dict(alpha=0.1, stable=True)),
    "looksam": (sam_optax.looksam, dict(k=5, alpha=0.7)),
    "stable_looksam": (sam_optax.looksam, dict(k=5, alpha=0.7, stable=True)),
    "friendly_sam": (sam_optax.friendly_sam, dict(sigma=1.0, lmbda=0.9)),
    "stable_friendly_sam": (sam_optax.friendly_sam, dict(sigma=1.0, lmbda=0.9, stable=True)),
    "vasso": (sam_optax.vasso, dict(theta=0.9)),
    "stable_vasso": (sam_optax.vasso, dict(theta=0.9, stable=True)),
}


@pytest.mark.parametrize("name", list(EXPECTED_FACTORIES))
def test_new_variants_build_their_factory_with_the_flags(name):
    factory, kwargs = EXPECTED_FACTORIES[name]
    config = tiny_config(optimizer=name)
    tx = optimizers.build_optimizer(config, steps_per_epoch=2, axis_name=None)
    reference = factory(config.rho, **kwargs)
    params = {"w": jnp.array([1.0, -2.0, 0.5])}

    def loss(p):
        return jnp.sum(jnp.sin(p["w"]) ** 2 + p["w"] ** 3)

    sgd = optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(optimizers.learning_rate_schedule(config, 2), momentum=0.9),
    )
    reference = optax.chain(reference, sgd)
    grad_fn = jax.grad(loss)
    state, ref_state = tx.init(params), reference.init(params)
    for _ in range(3):  # several steps: the stateful variants' buffers matter
        grads = grad_fn(params)
        got, state = tx.update(grads, state, params, grad_fn=grad_fn)
        want, ref_state = reference.update(grads, ref_state, params, grad_fn=grad_fn)
        np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)
        params = optax.apply_updates(params, got)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(optimizer="looksam", looksam_k=0), "--looksam-k must be >= 1"),
        (dict(optimizer="friendly_sam", fsam_lambda=1.5), "--fsam-lambda must be a finite number"),
        (dict(optimizer="vasso", vasso_theta=float("nan")), "--vasso-theta must be a finite"),
        (dict(optimizer="gsam", gsam_alpha=-1.0), "--gsam-alpha must be a finite number"),
    ],
)
def test_bad_variant_flags_are_refused(changes, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        tiny_config(**changes)
