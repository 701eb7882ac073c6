"""Tests of the cheaper SAM variants AE-SAM, ESAM (SWP and its data selection) and Momentum-SAM:
NumPy transcriptions of the papers' algorithms over several steps, reductions to SAM and to the
gradient, grad_fn calls counted at run time, jit, inject_hyperparams, StableSAM, shard_map and
the argument checks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized

import sam_optax

# --------------------------------------------------------------------------------------------
# The problem: least squares on 32 examples; the params are two leaves, "a" (3) and "b" (2).
# --------------------------------------------------------------------------------------------

_rng = np.random.default_rng(0)
X = _rng.normal(size=(32, 5)).astype(np.float32)
Y = _rng.normal(size=32).astype(np.float32)
W0 = _rng.normal(size=5).astype(np.float32)
LR = 0.1
N_DEVICES = 8
LEAF_OF_COORDINATE = np.array([0, 0, 0, 1, 1])  # "a" then "b", jax.tree's order


def np_grad(w, rows=slice(None)):
    x, y = X[rows].astype(np.float64), Y[rows].astype(np.float64)
    return x.T @ (x @ w - y) / len(y)


def np_normalized(v):
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else np.zeros_like(v)


def split(w):
    return {"a": jnp.asarray(w[:3], jnp.float32), "b": jnp.asarray(w[3:], jnp.float32)}


def flat(tree):
    return np.concatenate([np.asarray(tree["a"]), np.asarray(tree["b"])]).astype(np.float64)


def per_example_loss(params, batch):
    x, y = batch
    w = jnp.concatenate([params["a"], params["b"]])
    return 0.5 * (x @ w - y) ** 2


def loss(params, batch):
    return jnp.mean(per_example_loss(params, batch))


def make_grad_fn(batch, calls=None):
    def grad_fn(p):
        if calls is not None:
            jax.debug.callback(lambda: calls.append(1))
        return jax.grad(loss)(p, batch)

    return grad_fn


def run(tx, steps, *, pass_updates=True, calls=None):
    """Runs tx alone (w -= LR * out) under jit; returns the outputs (flat) and the last state."""
    batch = (jnp.asarray(X), jnp.asarray(Y))
    grad_fn = make_grad_fn(batch, calls)
    params = split(W0)
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        updates = jax.grad(loss)(p, batch) if pass_updates else None
        return tx.update(updates, s, p, grad_fn=grad_fn)

    outs = []
    for _ in range(steps):
        out, state = step(params, state)
        outs.append(flat(out))
        params = jax.tree.map(lambda w, u: w - LR * u, params, out)
    return outs, state


def assert_outputs(outs, want):
    for t, (got, expected) in enumerate(zip(outs, want, strict=True)):
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5, err_msg=f"step {t}")


def np_sam(rho, steps, mask=None):
    w, outs = W0.astype(np.float64), []
    for _ in range(steps):
        g = np_grad(w)
        d = g if mask is None else g * mask
        out = np_grad(w + rho * np_normalized(d))
        outs.append(out)
        w = w - LR * out
    return outs


# --------------------------------------------------------------------------------------------
# AE-SAM.
# --------------------------------------------------------------------------------------------


def np_ae_sam(rho, steps, *, num_steps, decay, lambda_1, lambda_2, mask=None):
    w, outs, ascents = W0.astype(np.float64), [], 0
    mean = variance = 0.0
    for t in range(steps):
        g = np_grad(w)
        s = g @ g
        mean = decay * mean + (1 - decay) * s
        variance = decay * variance + (1 - decay) * (s - mean) ** 2
        c = lambda_1 + (lambda_2 - lambda_1) * min(t / num_steps, 1.0)
        if s >= mean + c * np.sqrt(variance):
            d = g if mask is None else g * mask
            out = np_grad(w + rho * np_normalized(d))
            ascents += 1
        else:
            out = g
        outs.append(out)
        w = w - LR * out
    return outs, ascents, mean, variance


AE_HYPER = dict(num_steps=6, decay=0.8, lambda_1=-0.5, lambda_2=1.5)


class AESAMTest(chex.TestCase):
    @parameterized.parameters(False, True)
    def test_against_numpy(self, masked):
        mask = {"a": True, "b": False} if masked else None
        np_mask = np.array([1, 1, 1, 0, 0.0]) if masked else None
        tx = sam_optax.ae_sam(0.2, perturb_mask=mask, **AE_HYPER)
        outs, state = run(tx, 10)
        want, ascents, mean, variance = np_ae_sam(0.2, 10, mask=np_mask, **AE_HYPER)
        assert_outputs(outs, want)
        self.assertEqual(int(state.ascents), ascents)
        self.assertTrue(0 < ascents < 10)  # both branches are exercised
        self.assertEqual(int(state.count), 10)
        np.testing.assert_allclose(state.mean, mean, rtol=1e-5)
        np.testing.assert_allclose(state.variance, variance, rtol=1e-4)

    def test_always_firing_is_sam(self):
        calls = []
        tx = sam_optax.ae_sam(0.1, num_steps=5, lambda_1=-1e9, lambda_2=-1e9)
        outs, state = run(tx, 6, calls=calls)
        assert_outputs(outs, np_sam(0.1, 6))
        self.assertEqual((len(calls), int(state.ascents)), (6, 6))

    def test_never_firing_is_the_gradient_without_grad_fn(self):
        calls = []
        tx = sam_optax.ae_sam(0.1, num_steps=5, lambda_1=1e9, lambda_2=1e9)
        outs, state = run(tx, 6, calls=calls)
        assert_outputs(outs, np_sam(0.0, 6))
        self.assertEqual((len(calls), int(state.ascents)), (0, 0))

    def test_calls_equal_ascents(self):
        calls = []
        _, state = run(sam_optax.ae_sam(0.2, **AE_HYPER), 10, calls=calls)
        self.assertEqual(len(calls), int(state.ascents))

    def test_zero_rho_steps_of_a_schedule_do_not_ascend(self):
        calls = []
        rho = sam_optax.periodic_rho_schedule(0.1, every=2)
        tx = sam_optax.ae_sam(rho, num_steps=5, lambda_1=-1e9, lambda_2=-1e9)
        _, state = run(tx, 6, calls=calls)
        self.assertEqual((len(calls), int(state.ascents)), (3, 3))

    def test_static_zero_rho(self):
        calls = []
        outs, state = run(sam_optax.ae_sam(0.0, num_steps=5), 4, calls=calls)
        assert_outputs(outs, np_sam(0.0, 4))
        self.assertEqual((len(calls), int(state.ascents)), (0, 0))

    def test_non_finite_gradient_keeps_the_statistics(self):
        tx = sam_optax.ae_sam(0.1, num_steps=5)
        params = split(W0)
        state = tx.init(params)
        bad = jax.tree.map(lambda x: x * jnp.nan, params)
        out, new_state = tx.update(bad, state, params, grad_fn=lambda p: bad)
        self.assertTrue(np.isnan(flat(out)).all())
        self.assertEqual((float(new_state.mean), float(new_state.variance)), (0.0, 0.0))


# --------------------------------------------------------------------------------------------
# ESAM.
# --------------------------------------------------------------------------------------------


def np_esam(rho, beta, steps, *, seed=0, mask=None):
    key = jax.random.PRNGKey(seed)
    w, outs, kept = W0.astype(np.float64), [], []
    for _ in range(steps):
        key, draw = jax.random.split(key)
        keep = np.asarray(jax.random.bernoulli(draw, jnp.float32(beta), (2,)), np.float64)
        kept.append(tuple(keep))
        m = keep[LEAF_OF_COORDINATE] * (1.0 if mask is None else mask)
        g = np_grad(w)
        out = np_grad(w + rho / beta * np_normalized(m * g))
        outs.append(out)
        w = w - LR * out
    return outs, kept


class ESAMTest(chex.TestCase):
    @parameterized.parameters(False, True)
    def test_against_numpy(self, masked):
        mask = {"a": True, "b": False} if masked else None
        np_mask = np.array([1, 1, 1, 0, 0.0]) if masked else None
        outs, state = run(sam_optax.esam(0.1, beta=0.5, seed=3, perturb_mask=mask), 8)
        want, kept = np_esam(0.1, 0.5, 8, seed=3, mask=np_mask)
        assert_outputs(outs, want)
        self.assertGreater(len(set(kept)), 1)  # the draws differ between steps
        self.assertEqual(int(state.count), 8)

    def test_beta_one_is_sam(self):
        outs, _ = run(sam_optax.esam(0.1, beta=1.0), 5)
        assert_outputs(outs, np_sam(0.1, 5))

    def test_same_seed_same_draws_other_seed_other(self):
        a, _ = run(sam_optax.esam(0.1, beta=0.5, seed=1), 6)
        b, _ = run(sam_optax.esam(0.1, beta=0.5, seed=1), 6)
        c, _ = run(sam_optax.esam(0.1, beta=0.5, seed=2), 6)
        assert_outputs(a, b)
        self.assertFalse(all(np.allclose(x, y) for x, y in zip(a, c, strict=True)))

    def test_zero_rho_steps_skip_grad_fn(self):
        calls = []
        rho = sam_optax.periodic_rho_schedule(0.1, every=3)
        run(sam_optax.esam(rho, beta=0.5), 7, calls=calls)
        self.assertEqual(len(calls), 3)


class ESAMSelectionTest(chex.TestCase):
    def numpy_selected_grad(self, w_at, w_p, fraction):
        rise = 0.5 * (X @ w_p - Y) ** 2 - 0.5 * (X @ w_at - Y) ** 2
        k = int(fraction * len(Y))
        rows = np.argsort(-rise, kind="stable")[:k]
        return np_grad(w_p, rows)

    @parameterized.parameters(0.25, 0.5)
    def test_selects_the_largest_rises(self, fraction):
        batch = (jnp.asarray(X), jnp.asarray(Y))
        w = split(W0)
        losses = per_example_loss(w, batch)
        grad_fn = sam_optax.esam_selected_grad_fn(per_example_loss, batch, losses, fraction)
        w_p = W0 + np.array([0.3, -0.2, 0.1, 0.4, -0.3], np.float32)
        got = flat(jax.jit(grad_fn)(split(w_p)))
        want = self.numpy_selected_grad(W0.astype(np.float64), w_p.astype(np.float64), fraction)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    def test_fraction_one_is_the_batch_gradient(self):
        batch = (jnp.asarray(X), jnp.asarray(Y))
        losses = per_example_loss(split(W0), batch)
        grad_fn = sam_optax.esam_selected_grad_fn(per_example_loss, batch, losses, 1.0)
        w_p = split(W0 + 0.1)
        np.testing.assert_allclose(flat(grad_fn(w_p)), np_grad(flat(w_p)), rtol=1e-5, atol=1e-6)

    def test_composes_with_esam(self):
        batch = (jnp.asarray(X), jnp.asarray(Y))
        tx = sam_optax.esam(0.1, beta=1.0)
        params = split(W0)

        @jax.jit
        def step(p, s):
            losses, grads = per_example_loss(p, batch), jax.grad(loss)(p, batch)
            grad_fn = sam_optax.esam_selected_grad_fn(per_example_loss, batch, losses, 0.5)
            return tx.update(grads, s, p, grad_fn=grad_fn)

        out, _ = step(params, tx.init(params))
        g = np_grad(W0.astype(np.float64))
        w_p = W0 + 0.1 * np_normalized(g)
        want = self.numpy_selected_grad(W0.astype(np.float64), w_p, 0.5)
        np.testing.assert_allclose(flat(out), want, rtol=1e-5, atol=1e-6)

    @parameterized.parameters(
        (dict(fraction=0.0), ValueError, "keeps no example"),
        (dict(fraction=0.01), ValueError, "keeps no example"),
        (dict(fraction=1.5), ValueError, "must be in"),
        (dict(losses=jnp.zeros((32, 2))), ValueError, "per-example losses"),
    )
    def test_bad_arguments(self, kwargs, error, message):
        arguments = {"losses": jnp.zeros(32), "fraction": 0.5, **kwargs}
        with self.assertRaisesRegex(error, message):
            sam_optax.esam_selected_grad_fn(per_example_loss, (X, Y), **arguments)


# --------------------------------------------------------------------------------------------
# Momentum-SAM.
# --------------------------------------------------------------------------------------------


def np_momentum_sam(rho, momentum, steps, *, mask=None):
    w, v, outs = W0.astype(np.float64), np.zeros(5), []
    for _ in range(steps):
        d = -v if mask is None else -v * mask
        out = np_grad(w + rho * np_normalized(d))
        v = momentum * v + out
        outs.append(out)
        w = w - LR * out
    return outs, v


class MomentumSAMTest(chex.TestCase):
    @parameterized.product(masked=[False, True], pass_updates=[False, True])
    def test_against_numpy(self, masked, pass_updates):
        mask = {"a": True, "b": False} if masked else None
        np_mask = np.array([1, 1, 1, 0, 0.0]) if masked else None
        tx = sam_optax.momentum_sam(0.3, momentum=0.8, perturb_mask=mask)
        outs, state = run(tx, 8, pass_updates=pass_updates)
        want, v = np_momentum_sam(0.3, 0.8, 8, mask=np_mask)
        assert_outputs(outs, want)
        np.testing.assert_allclose(flat(state.momentum), v, rtol=2e-5, atol=2e-5)

    def test_one_grad_fn_call_per_step(self):
        calls = []
        run(sam_optax.momentum_sam(0.3), 5, pass_updates=False, calls=calls)
        self.assertEqual(len(calls), 5)

    def test_given_updates_serve_the_first_step(self):
        calls = []
        run(sam_optax.momentum_sam(0.3), 5, calls=calls)
        self.assertEqual(len(calls), 4)

    @parameterized.parameters(False, True)
    def test_zero_rho_is_the_gradient(self, pass_updates):
        calls = []
        outs, _ = run(sam_optax.momentum_sam(0.0), 4, pass_updates=pass_updates, calls=calls)
        assert_outputs(outs, np_sam(0.0, 4))
        self.assertEqual(len(calls), 0 if pass_updates else 4)

    def test_zero_rho_steps_of_a_schedule(self):
        calls = []
        rho = sam_optax.periodic_rho_schedule(0.3, every=2)
        run(sam_optax.momentum_sam(rho), 6, calls=calls)
        self.assertEqual(len(calls), 2)  # steps 2 and 4 (step 0 has v = 0)

    def test_stable_needs_updates(self):
        tx = sam_optax.momentum_sam(0.3, stable=True)
        with self.assertRaisesRegex(TypeError, "pass it as updates"):
            run(tx, 1, pass_updates=False)

    def test_stable_rescales_to_the_given_gradient(self):
        outs, _ = run(sam_optax.momentum_sam(0.3, stable=True), 4)
        want, _ = np_momentum_sam(0.3, 0.9, 4)
        w = W0.astype(np.float64)
        for t in range(4):  # the run follows the rescaled outputs
            g = np_grad(w)
            np.testing.assert_allclose(np.linalg.norm(outs[t]), np.linalg.norm(g), rtol=1e-5)
            w = w - LR * outs[t]
        np.testing.assert_allclose(outs[0], want[0], rtol=1e-5)


# --------------------------------------------------------------------------------------------
# What the three share: StableSAM, inject_hyperparams, shard_map, argument checks.
# --------------------------------------------------------------------------------------------

FACTORIES = {
    "ae_sam": (sam_optax.ae_sam, dict(rho=0.2, **AE_HYPER)),
    "esam": (sam_optax.esam, dict(rho=0.1, beta=0.5, seed=3)),
    "momentum_sam": (sam_optax.momentum_sam, dict(rho=0.3, momentum=0.8)),
}


class SharedTest(chex.TestCase):
    @parameterized.parameters("ae_sam", "esam")
    def test_stable_keeps_the_gradient_norm(self, name):
        factory, hyper = FACTORIES[name]
        outs, _ = run(factory(**hyper, stable=True), 6)
        plain, _ = run(factory(**hyper), 1)
        w = W0.astype(np.float64)
        for out in outs:
            np.testing.assert_allclose(np.linalg.norm(out), np.linalg.norm(np_grad(w)), rtol=1e-5)
            w = w - LR * out
        # The direction is the plain variant's.
        np.testing.assert_allclose(np_normalized(outs[0]), np_normalized(plain[0]), atol=1e-6)

    @parameterized.parameters("ae_sam", "esam", "momentum_sam")
    def test_inject_hyperparams(self, name):
        factory, hyper = FACTORIES[name]
        static = ("seed",) if name == "esam" else ()
        injected = optax.inject_hyperparams(factory, static_args=static)(**hyper)
        pass_updates = name != "momentum_sam"
        got, _ = run(injected, 6, pass_updates=pass_updates)
        want, _ = run(factory(**hyper), 6, pass_updates=pass_updates)
        assert_outputs(got, want)

    def test_inject_hyperparams_seed_as_array(self):
        injected = optax.inject_hyperparams(sam_optax.esam)(rho=0.1, beta=0.5, seed=3)
        got, _ = run(injected, 4)
        assert_outputs(got, run(sam_optax.esam(0.1, beta=0.5, seed=3), 4)[0])

    @parameterized.parameters(
        ("ae_sam", True), ("esam", True), ("momentum_sam", False), ("momentum_sam", True)
    )
    def test_shard_map(self, name, pass_updates):
        factory, hyper = FACTORIES[name]
        tx = factory(**hyper, axis_name="data")
        mesh = jax.make_mesh((N_DEVICES,), ("data",))
        P = jax.sharding.PartitionSpec
        sharding = jax.sharding.NamedSharding(mesh, P("data"))
        xs, ys = jax.device_put((X.reshape(N_DEVICES, -1, 5), Y.reshape(N_DEVICES, -1)), sharding)

        def device_step(params, state, x, y):
            batch = (x[0], y[0])
            grads = jax.grad(loss)(sam_optax.per_device(params, "data"), batch)
            grad_fn = make_grad_fn(batch)
            return tx.update(grads if pass_updates else None, state, params, grad_fn=grad_fn)

        step = jax.jit(
            jax.shard_map(
                device_step,
                mesh=mesh,
                in_specs=(P(), P(), P("data"), P("data")),
                out_specs=P(),
            )
        )
        params, state = split(W0), tx.init(split(W0))
        outs = []
        for _ in range(6):
            out, state = step(params, state, xs, ys)
            outs.append(flat(out))
            params = jax.tree.map(lambda w, u: w - LR * u, params, out)
        assert_outputs(outs, self.sharded_reference(name, 6))

    def sharded_reference(self, name, steps):
        """Each device's eps from its own gradient; s, v and the output from the averages."""
        rows = [slice(4 * d, 4 * d + 4) for d in range(N_DEVICES)]
        w, outs = W0.astype(np.float64), []
        mean = variance = 0.0
        v = np.zeros(5)
        key = jax.random.PRNGKey(3)
        for t in range(steps):
            grads = [np_grad(w, r) for r in rows]
            g = np.mean(grads, axis=0)
            if name == "ae_sam":
                s = g @ g
                mean = 0.8 * mean + 0.2 * s
                variance = 0.8 * variance + 0.2 * (s - mean) ** 2
                c = -0.5 + 2.0 * min(t / 6, 1.0)
                sharp = s >= mean + c * np.sqrt(variance)
                epss = [0.2 * np_normalized(gd) if sharp else None for gd in grads]
            elif name == "esam":
                key, draw = jax.random.split(key)
                keep = np.asarray(jax.random.bernoulli(draw, jnp.float32(0.5), (2,)), np.float64)
                m = keep[LEAF_OF_COORDINATE]
                epss = [0.1 / 0.5 * np_normalized(m * gd) for gd in grads]
            else:
                epss = [0.3 * np_normalized(-v)] * N_DEVICES
            pairs = zip(grads, epss, rows, strict=True)
            out = np.mean([gd if e is None else np_grad(w + e, r) for gd, e, r in pairs], axis=0)
            v = 0.8 * v + out
            outs.append(out)
            w = w - LR * out
        return outs

    @parameterized.parameters(
        (sam_optax.ae_sam, dict(), TypeError, r"needs num_steps.*ae_sam\(rho=0.05, num_steps="),
        (sam_optax.ae_sam, dict(num_steps=0), ValueError, r"ae_sam\(rho=0.05, num_steps="),
        (sam_optax.ae_sam, dict(num_steps=2.5), TypeError, "num_steps must be an int"),
        (sam_optax.ae_sam, dict(num_steps=10, decay=1.0), ValueError, "decay must be < 1"),
        (sam_optax.ae_sam, dict(num_steps=10, decay=-0.1), ValueError, "decay must be in"),
        (
            sam_optax.ae_sam,
            dict(num_steps=10, lambda_1=2.0, lambda_2=1.0),
            ValueError,
            "lambda_2 must be >= lambda_1",
        ),
        (sam_optax.ae_sam, dict(rho=-1.0, num_steps=10), ValueError, "rho must be"),
        (sam_optax.esam, dict(beta=0.0), ValueError, r"esam\(rho=0.05, beta=0.6\)"),
        (sam_optax.esam, dict(beta=1.5), ValueError, "beta must be in"),
        (sam_optax.esam, dict(seed=1.5), TypeError, r"esam\(rho=0.05, seed=0\)"),
        (sam_optax.esam, dict(sync_ascent=True), ValueError, "pass axis_name too"),
        (sam_optax.momentum_sam, dict(momentum=1.0), ValueError, "momentum must be < 1"),
        (sam_optax.momentum_sam, dict(momentum=-0.5), ValueError, r"momentum_sam\(rho=0.3"),
        (
            sam_optax.momentum_sam,
            dict(stable_norm="adaptive"),
            ValueError,
            r"momentum_sam\(rho, stable=True",
        ),
    )
    def test_bad_arguments(self, factory, kwargs, error, message):
        with self.assertRaisesRegex(error, message):
            factory(**kwargs)

    @parameterized.parameters("ae_sam", "esam", "momentum_sam")
    def test_missing_grad_fn(self, name):
        factory, hyper = FACTORIES[name]
        tx = factory(**hyper)
        params = split(W0)
        with self.assertRaisesRegex(TypeError, "grad_fn"):
            tx.update(params, tx.init(params), params)
