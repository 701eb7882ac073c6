"""Tests of Sparse SAM (SSAM-F, SSAM-D): NumPy transcriptions of the mask rules and of the masked,
unnormalized perturbation over several steps, reductions to SAM, grad_fn calls counted at run
time, inject_hyperparams, StableSAM, shard_map and the argument checks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from test_efficient_variants import (
    LR,
    N_DEVICES,
    W0,
    X,
    Y,
    assert_outputs,
    flat,
    loss,
    make_grad_fn,
    np_grad,
    np_normalized,
    np_sam,
    run,
    split,
)

import sam_optax
from sam_optax import _sparse_sam

N = W0.size  # 5 coordinates, two leaves


def np_top_k(scores, k):
    """True on the k largest (ties: the first), as the library's ranking."""
    order = np.argsort(-scores, kind="stable")
    mask = np.zeros(scores.size, bool)
    mask[order[:k]] = True
    return mask


def np_ssam_f(rho, steps, *, sparsity, update_every, rows=slice(None)):
    k = int(np.floor(N * (1 - sparsity)))
    w, outs, masks = W0.astype(np.float64), [], []
    fisher, mask = np.zeros(N), np.zeros(N, bool)
    for t in range(steps):
        g = np_grad(w, rows)
        fisher = fisher + g**2
        if t % update_every == 0:
            mask, fisher = np_top_k(fisher, k), np.zeros(N)
        out = np_grad(w + rho * np_normalized(g) * mask, rows)
        outs.append(out)
        masks.append(mask)
        w = w - LR * out
    return outs, masks


class SSAMFTest(chex.TestCase):
    @parameterized.parameters((0.4, 1), (0.4, 3), (0.8, 2))
    def test_numpy_transcription(self, sparsity, update_every):
        tx = sam_optax.sparse_sam(0.3, sparsity, update_every=update_every)
        outs, state = run(tx, 7)
        want, masks = np_ssam_f(0.3, 7, sparsity=sparsity, update_every=update_every)
        assert_outputs(outs, want)
        np.testing.assert_array_equal(flat(state.mask).astype(bool), masks[-1])
        assert int(flat(state.mask).sum()) == int(np.floor(N * (1 - sparsity)))

    def test_sparsity_zero_is_sam(self):
        outs, _ = run(sam_optax.sparse_sam(0.3, 0.0), 5)
        assert_outputs(outs, np_sam(0.3, 5))

    def test_the_perturbation_is_not_renormalized(self):
        params = split(W0)
        grads = jax.grad(loss)(params, (jnp.asarray(X), jnp.asarray(Y)))
        seen = []

        def grad_fn(p):
            seen.append(p)
            return grads

        tx = sam_optax.sparse_sam(0.3, 0.6)
        tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
        eps = flat(seen[0]) - flat(params)
        g = flat(grads)
        mask = np_top_k(g**2, 2)
        np.testing.assert_allclose(eps, 0.3 * g / np.linalg.norm(g) * mask, rtol=1e-5, atol=1e-7)
        assert np.linalg.norm(eps) < 0.3


def np_death_rate(t, drop_rate, num_steps):
    return drop_rate * (1 + np.cos(np.pi * min(t / num_steps, 1.0))) / 2


class SSAMDTest(chex.TestCase):
    def test_live_count_is_constant_and_refreshes_follow_the_rule(self):
        params = {"w": jnp.asarray(np.linspace(-1, 1, 40), jnp.float32)}
        k = int(np.floor(40 * 0.75))
        tx = sam_optax.sparse_sam(
            0.1, 0.25, mask="dynamic", update_every=2, num_steps=8, drop_rate=0.8, seed=1
        )
        state = tx.init(params)
        assert int(state.mask["w"].sum()) == k
        rng = np.random.default_rng(0)
        for t in range(8):
            g = {"w": jnp.asarray(rng.normal(size=40), jnp.float32)}
            before = np.asarray(state.mask["w"])
            _, state = tx.update(g, state, params, grad_fn=lambda p, g=g: g)
            after = np.asarray(state.mask["w"])
            assert after.sum() == k
            if t > 0 and t % 2 == 0:
                dropped = int(np.floor(k * np_death_rate(t, 0.8, 8)))
                # The live coordinates of largest |g| stay (all but `dropped` of them).
                magnitude = np.where(before, np.abs(np.asarray(g["w"])), -np.inf)
                kept = np_top_k(magnitude, k - dropped)
                assert np.all(after[kept]) and (after & ~kept).sum() == dropped
            else:
                np.testing.assert_array_equal(after, before)

    def test_drop_rate_schedule(self):
        for t in (0, 3, 8, 12):
            np.testing.assert_allclose(
                float(_sparse_sam.drop_rate_at(jnp.asarray(t), 0.5, 8)),
                np_death_rate(t, 0.5, 8),
                rtol=1e-6,
            )

    def test_dynamic_perturbation_uses_the_mask(self):
        tx = sam_optax.sparse_sam(0.3, 0.4, mask="dynamic", update_every=100, num_steps=10)
        params = split(W0)
        mask = flat(tx.init(params).mask).astype(bool)
        w, want = W0.astype(np.float64), []
        for _ in range(4):
            g = np_grad(w)
            out = np_grad(w + 0.3 * np_normalized(g) * mask)
            want.append(out)
            w = w - LR * out
        assert_outputs(run(tx, 4)[0], want)


class SharedTest(chex.TestCase):
    @parameterized.parameters("fisher", "dynamic")
    def test_steps_with_rho_zero_skip_the_pass(self, mask):
        calls = []
        rho = sam_optax.periodic_rho_schedule(0.3, every=3)
        tx = sam_optax.sparse_sam(rho, 0.4, mask=mask, num_steps=9)
        run(tx, 9, calls=calls)
        jax.effects_barrier()
        assert len(calls) == 3

    def test_stable_keeps_the_gradient_norm(self):
        outs, _ = run(sam_optax.sparse_sam(0.3, 0.4, stable=True), 5)
        w = W0.astype(np.float64)
        for out in outs:
            np.testing.assert_allclose(np.linalg.norm(out), np.linalg.norm(np_grad(w)), rtol=1e-5)
            w = w - LR * out

    @parameterized.parameters("fisher", "dynamic")
    def test_inject_hyperparams(self, mask):
        hyper = dict(rho=0.3, sparsity=0.4, mask=mask, update_every=2, num_steps=6)
        static = ("sparsity",)
        injected = optax.inject_hyperparams(sam_optax.sparse_sam, static_args=static)(**hyper)
        assert_outputs(run(injected, 6)[0], run(sam_optax.sparse_sam(**hyper), 6)[0])

    def test_traced_sparsity_names_static_args(self):
        injected = optax.inject_hyperparams(sam_optax.sparse_sam)(rho=0.3, sparsity=0.4)
        with pytest.raises(TypeError, match=r"static_args=\('sparsity',\)"):
            run(injected, 1)

    def test_shard_map_masks_from_the_averaged_gradient(self):
        tx = sam_optax.sparse_sam(0.3, 0.4, update_every=2, axis_name="data")
        mesh = jax.make_mesh((N_DEVICES,), ("data",))
        P = jax.sharding.PartitionSpec
        sharding = jax.sharding.NamedSharding(mesh, P("data"))
        xs, ys = jax.device_put((X.reshape(N_DEVICES, -1, 5), Y.reshape(N_DEVICES, -1)), sharding)

        def device_step(params, state, x, y):
            batch = (x[0], y[0])
            grads = jax.grad(loss)(sam_optax.per_device(params, "data"), batch)
            return tx.update(grads, state, params, grad_fn=make_grad_fn(batch))

        step = jax.jit(
            jax.shard_map(
                device_step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=P()
            )
        )
        params, state = split(W0), tx.init(split(W0))
        rows = [slice(4 * d, 4 * d + 4) for d in range(N_DEVICES)]
        w, fisher, mask = W0.astype(np.float64), np.zeros(N), None
        for t in range(5):
            out, state = step(params, state, xs, ys)
            params = jax.tree.map(lambda p, u: p - LR * u, params, out)
            grads = [np_grad(w, r) for r in rows]
            fisher = fisher + np.mean(grads, axis=0) ** 2
            if t % 2 == 0:
                mask, fisher = np_top_k(fisher, 3), np.zeros(N)
            want = np.mean(
                [
                    np_grad(w + 0.3 * np_normalized(g) * mask, r)
                    for g, r in zip(grads, rows, strict=True)
                ],
                axis=0,
            )
            np.testing.assert_allclose(flat(out), want, rtol=2e-5, atol=2e-5, err_msg=f"step {t}")
            w = w - LR * want


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sparsity=1.0), r"sparsity must be < 1"),
        (dict(sparsity=-0.1), r"sparsity must be in \[0.0, 1.0\]"),
        (dict(mask="random"), r"mask must be one of \('fisher', 'dynamic'\)"),
        (dict(update_every=0), r"update_every must be an int >= 1"),
        (dict(mask="dynamic"), r"mask='dynamic' .* needs num_steps"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        sam_optax.sparse_sam(0.05, **kwargs)
    assert "sparse_sam(rho=0.05, sparsity=0.5" in str(error.value)
