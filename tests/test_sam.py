"""Tests of the SAM family against closed forms, direct computations and optax compositions."""

import functools

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized
from mlp_problem import mlp_batch, mlp_loss, mlp_params

import sam_optax

# A quadratic L(w) = 1/2 w^T A w with a known, non-isotropic Hessian; its gradient is A w.
A = np.array([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.25]], np.float32)
W0 = np.array([1.0, -2.0, 0.5], np.float32)


def quadratic_loss(w):
    return 0.5 * w @ jnp.asarray(A) @ w


quadratic_grad = jax.grad(quadratic_loss)


def dual_direction(v, p):
    """d(v) written out for a flat numpy vector."""
    if p == 2:
        return v / np.linalg.norm(v)
    if np.isinf(p):
        return np.sign(v)
    q = p / (p - 1)
    return np.sign(v) * np.abs(v) ** (q - 1) / np.sum(np.abs(v) ** q) ** ((q - 1) / q)


def reference_sam(
    w,
    grad,
    rho,
    *,
    adaptive=False,
    eta=0.01,
    normalize=True,
    stable=False,
    p=2.0,
    steps=1,
):
    """The reference formulas, one flat numpy vector at a time, in float64."""
    w = np.asarray(w, np.float64)
    g = grad(w)
    t = np.abs(w) + eta if adaptive else np.ones_like(w)
    eps = np.zeros_like(w)
    g_i = g
    for _ in range(steps):
        direction = t * dual_direction(t * g_i, p) if normalize else t * t * g_i
        eps = eps + rho / steps * direction
        g_i = grad(w + eps)
    if stable:
        g_i = g_i * np.linalg.norm(g) / np.linalg.norm(g_i)
    return g_i


def numpy_quadratic_grad(w):
    return A.astype(np.float64) @ w


def run_update(tx, grads, params, grad_fn, state=None):
    state = tx.init(params) if state is None else state
    return tx.update(grads, state, params, grad_fn=grad_fn)


VARIANTS = [
    dict(testcase_name="sam"),
    dict(testcase_name="stable_sam", stable=True),
    dict(testcase_name="asam", adaptive=True, rho=0.5),
    dict(testcase_name="asam_eta0", adaptive=True, rho=0.5, eta=0.0),
    dict(testcase_name="stable_asam", adaptive=True, rho=0.5, stable=True),
    dict(testcase_name="usam", normalize=False),
    dict(testcase_name="stable_usam", normalize=False, stable=True),
    dict(testcase_name="adaptive_usam", normalize=False, adaptive=True),
    dict(testcase_name="sign", p=np.inf),
    dict(testcase_name="l3", p=3.0),
    dict(testcase_name="l1_5_stable", p=1.5, stable=True),
    dict(testcase_name="two_steps", steps=2),
    dict(testcase_name="five_steps_stable_asam", steps=5, adaptive=True, rho=1.0, stable=True),
    dict(testcase_name="three_steps_sign", steps=3, p=np.inf),
]


class ClosedFormTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    @parameterized.named_parameters(*VARIANTS)
    def test_quadratic(self, rho=0.1, p=2.0, steps=1, **kw):
        tx = sam_optax.sam(rho, ascent_norm=p, ascent_steps=steps, **kw)
        params = jnp.asarray(W0)

        @self.variant
        def update(grads, params):
            return run_update(tx, grads, params, quadratic_grad)

        out, state = update(quadratic_grad(params), params)
        expected = reference_sam(W0, numpy_quadratic_grad, rho, p=p, steps=steps, **kw)
        np.testing.assert_allclose(out, expected, rtol=2e-5, atol=1e-6)
        self.assertEqual(int(state.count), 1)

    def test_usam_closed_form(self):
        # USAM on a quadratic: g_sam = A (w + rho A w) = (A + rho A^2) w.
        out, _ = run_update(sam_optax.usam(0.3), quadratic_grad(W0), W0, quadratic_grad)
        np.testing.assert_allclose(out, (A + 0.3 * A @ A) @ W0, rtol=1e-5)

    def test_sam_closed_form(self):
        # SAM on a quadratic: g_sam = A w + rho A A w / ||A w||.
        g = A @ W0
        out, _ = run_update(sam_optax.sam(0.2), g, W0, quadratic_grad)
        np.testing.assert_allclose(out, g + 0.2 * A @ g / np.linalg.norm(g), rtol=1e-5)

    def test_shortcuts(self):
        g = quadratic_grad(W0)
        pairs = [
            (sam_optax.stable_sam(0.1), dict(stable=True)),
            (sam_optax.asam(), dict(adaptive=True, rho=0.5, eta=0.01)),
            (sam_optax.usam(0.1), dict(normalize=False)),
            (sam_optax.asam(1.0, stable=True), dict(adaptive=True, rho=1.0, stable=True)),
            (sam_optax.stable_sam(0.1, normalize=False), dict(stable=True, normalize=False)),
        ]
        for tx, kw in pairs:
            out, _ = run_update(tx, g, W0, quadratic_grad)
            kw.setdefault("rho", 0.1)
            np.testing.assert_allclose(
                out, reference_sam(W0, numpy_quadratic_grad, **kw), rtol=2e-5
            )


class MLPTest(chex.TestCase):
    """The pytree code against the same formulas on the flattened parameter vector."""

    @parameterized.named_parameters(*VARIANTS)
    def test_against_flat_reference(self, rho=0.1, p=2.0, steps=1, **kw):
        params = mlp_params(jax.random.key(0))
        batch = mlp_batch(jax.random.key(1))
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        grad_fn = jax.grad(lambda q: mlp_loss(q, batch))

        flat_grad_f32 = jax.jit(lambda v: jax.flatten_util.ravel_pytree(grad_fn(unravel(v)))[0])

        def flat_grad(v):
            return np.asarray(flat_grad_f32(jnp.asarray(v, jnp.float32)), np.float64)

        tx = sam_optax.sam(rho, ascent_norm=p, ascent_steps=steps, **kw)
        out, _ = jax.jit(functools.partial(run_update, tx, grad_fn=grad_fn))(
            grad_fn(params), params
        )
        expected = reference_sam(np.asarray(flat), flat_grad, rho, p=p, steps=steps, **kw)
        np.testing.assert_allclose(jax.flatten_util.ravel_pytree(out)[0], expected, atol=2e-5)

    def test_perturb_mask(self):
        params = mlp_params(jax.random.key(0))
        batch = mlp_batch(jax.random.key(1))
        grad_fn = jax.grad(lambda q: mlp_loss(q, batch))
        grads = grad_fn(params)
        mask = {name: {"kernel": True, "bias": False} for name in params}
        eps = sam_optax.perturbation(grads, params, rho=0.2, perturb_mask=mask)
        for name in params:
            np.testing.assert_array_equal(eps[name]["bias"], 0.0)
        kernels = {name: grads[name]["kernel"] for name in params}
        norm = optax.tree.norm(kernels)
        for name in params:
            np.testing.assert_allclose(eps[name]["kernel"], 0.2 * kernels[name] / norm, rtol=1e-5)
        # A function of the params works too, and the output still covers every parameter.
        tx = sam_optax.sam(0.2, perturb_mask=lambda p: jax.tree.map(lambda x: x.ndim == 2, p))
        out, _ = run_update(tx, grads, params, grad_fn)
        expected = grad_fn(jax.tree.map(jnp.add, params, eps))
        chex.assert_trees_all_close(out, expected, rtol=1e-5)


class DataParallelSetup(chex.TestCase):
    """Per-device batches and the per-device reference (no tests of its own)."""

    n_devices = 8

    def setUp(self):
        super().setUp()
        self.params = mlp_params(jax.random.key(0))
        x, y = mlp_batch(jax.random.key(1), n=4 * self.n_devices)
        self.batches = (
            x.reshape(self.n_devices, 4, 4),
            y.reshape(self.n_devices, 4),
        )

    def sharded_batches(self, mesh):
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        return jax.device_put(self.batches, sharding)

    def device_grad_fn(self, d):
        batch = jax.tree.map(lambda b: b[d], self.batches)
        return jax.grad(lambda q: mlp_loss(q, batch))

    def expected(self, **kwargs):
        return jax.jit(functools.partial(self._expected, **kwargs))()

    def _expected(self, *, sync_ascent, stable, rho=0.1, steps=1):
        """Per-device SAM gradients averaged, computed one device at a time."""
        local_grads = [self.device_grad_fn(d)(self.params) for d in range(self.n_devices)]
        mean_grad = jax.tree.map(lambda *g: sum(g) / len(g), *local_grads)
        outs = []
        for d in range(self.n_devices):
            grad_fn = self.device_grad_fn(d)
            if sync_ascent:
                # Every device's ascent step starts from the averaged gradient.
                def reduced(p, grad_fn=grad_fn):
                    return jax.tree.map(
                        lambda *g: sum(g) / len(g),
                        *[self.device_grad_fn(e)(p) for e in range(self.n_devices)],
                    )

                eps = sam_optax.perturbation(
                    mean_grad, self.params, rho=rho, ascent_steps=steps, grad_fn=reduced
                )
            else:
                eps = sam_optax.perturbation(
                    local_grads[d], self.params, rho=rho, ascent_steps=steps, grad_fn=grad_fn
                )
            outs.append(grad_fn(jax.tree.map(jnp.add, self.params, eps)))
        out = jax.tree.map(lambda *g: sum(g) / len(g), *outs)
        if stable:
            out = optax.tree.scale(optax.tree.norm(mean_grad) / optax.tree.norm(out), out)
        return out

    def step(self, tx, axis_name=None):
        def device_step(params, batch):
            def loss(q):
                return mlp_loss(q, batch)

            # Inside shard_map, jax.grad of replicated params would sum over the devices.
            local = params if axis_name is None else sam_optax.per_device(params, axis_name)
            grads = jax.grad(loss)(local)
            out, _ = tx.update(grads, tx.init(params), params, grad_fn=jax.grad(loss))
            return out

        return device_step


class DataParallelTest(DataParallelSetup):
    """m-sharpness semantics across 8 simulated devices, under pmap and shard_map."""

    @parameterized.parameters(
        dict(sync_ascent=False, stable=False, steps=1),
        dict(sync_ascent=True, stable=False, steps=1),
        dict(sync_ascent=False, stable=True, steps=2),
        dict(sync_ascent=True, stable=True, steps=2),
    )
    def test_pmap(self, sync_ascent, stable, steps):
        tx = sam_optax.sam(
            0.1, stable=stable, ascent_steps=steps, axis_name="batch", sync_ascent=sync_ascent
        )
        out = jax.pmap(self.step(tx), axis_name="batch", in_axes=(None, 0))(
            self.params, self.batches
        )
        expected = self.expected(sync_ascent=sync_ascent, stable=stable, steps=steps)
        for d in range(self.n_devices):  # every device holds the same averaged result
            chex.assert_trees_all_close(jax.tree.map(lambda x, d=d: x[d], out), expected, atol=1e-6)

    @parameterized.product(sync_ascent=(False, True), stable=(False, True))
    def test_shard_map(self, sync_ascent, stable):
        mesh = jax.make_mesh((self.n_devices,), ("data",))
        P = jax.sharding.PartitionSpec
        tx = sam_optax.sam(0.1, stable=stable, axis_name="data", sync_ascent=sync_ascent)

        def device_step(params, batch):
            return self.step(tx, "data")(params, jax.tree.map(lambda b: b[0], batch))

        step = jax.jit(
            jax.shard_map(device_step, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
        )
        out = step(self.params, self.sharded_batches(mesh))
        expected = self.expected(sync_ascent=sync_ascent, stable=stable)
        chex.assert_trees_all_close(out, expected, atol=1e-6)

    def test_summed_gradient_is_refused(self):
        mesh = jax.make_mesh((self.n_devices,), ("data",))
        P = jax.sharding.PartitionSpec
        tx = sam_optax.sam(0.1, axis_name="data")

        def device_step(params, batch):
            return self.step(tx)(params, jax.tree.map(lambda b: b[0], batch))

        step = jax.jit(
            jax.shard_map(device_step, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
        )
        with self.assertRaisesRegex(ValueError, r"sam_optax.per_device\(params, 'data'\)"):
            step(self.params, self.sharded_batches(mesh))

    def test_m_sharpness_differs_from_sync(self):
        """Per-device ascent is not the global-batch ascent (or the test above proves nothing)."""
        per_device = self.expected(sync_ascent=False, stable=False)
        synced = self.expected(sync_ascent=True, stable=False)
        diff = optax.tree.norm(jax.tree.map(jnp.subtract, per_device, synced))
        self.assertGreater(float(diff), 1e-4)

    def test_schedule_under_shard_map(self):
        """A rho schedule (lax.cond around a collective) inside shard_map."""
        mesh = jax.make_mesh((self.n_devices,), ("data",))
        P = jax.sharding.PartitionSpec
        schedule = optax.constant_schedule(0.1)
        tx = sam_optax.sam(schedule, stable=True, axis_name="data", sync_ascent=True)

        def device_step(params, batch):
            return self.step(tx, "data")(params, jax.tree.map(lambda b: b[0], batch))

        out = jax.jit(
            jax.shard_map(device_step, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
        )(self.params, self.sharded_batches(mesh))
        chex.assert_trees_all_close(out, self.expected(sync_ascent=True, stable=True), atol=1e-6)


def train(tx, steps=5, seed=0):
    params = mlp_params(jax.random.key(seed))
    batch = mlp_batch(jax.random.key(seed + 1))
    grad_fn = jax.grad(lambda q: mlp_loss(q, batch))

    @jax.jit
    def step(params, state):
        updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


BASE_OPTIMIZERS = dict(
    sgd=lambda: optax.sgd(0.1),
    momentum=lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    adam=lambda: optax.adam(1e-2),
    adamw=lambda: optax.adamw(1e-2, weight_decay=1e-2),
    lion=lambda: optax.lion(1e-3),
    clipped_sgd=lambda: optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.1)),
    decayed_sgd=lambda: optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1)),
    masked_decay=lambda: optax.chain(
        optax.masked(
            optax.add_decayed_weights(5e-4), lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
        ),
        optax.sgd(0.1, momentum=0.9),
    ),
    cosine_sgd=lambda: optax.sgd(optax.cosine_decay_schedule(0.1, 10), momentum=0.9),
)


class CompositionTest(chex.TestCase):
    @parameterized.named_parameters(*[(name, name) for name in BASE_OPTIMIZERS])
    def test_chain(self, name):
        """sam in front of any base optimizer = the base optimizer fed the SAM gradient."""
        make = BASE_OPTIMIZERS[name]
        params, _ = train(optax.chain(sam_optax.sam(0.05, stable=True), make()), steps=3)

        batch = mlp_batch(jax.random.key(1))
        grad_fn = jax.grad(lambda q: mlp_loss(q, batch))
        base = make()
        manual = mlp_params(jax.random.key(0))
        state = base.init(manual)
        for _ in range(3):
            g_sam = reference_tree(manual, grad_fn, stable=True, rho=0.05)
            updates, state = base.update(g_sam, state, manual)
            manual = optax.apply_updates(manual, updates)
        chex.assert_trees_all_close(params, manual, atol=1e-5)
        chex.assert_tree_all_finite(params)

    def test_rho_zero_is_the_base_optimizer(self):
        base = optax.sgd(0.1, momentum=0.9)
        sam_params, _ = train(optax.chain(sam_optax.sam(0.0), base))
        schedule_params, _ = train(optax.chain(sam_optax.sam(optax.constant_schedule(0.0)), base))
        stable_params, _ = train(optax.chain(sam_optax.sam(0.0, stable=True), base))
        base_params, _ = train(base)
        chex.assert_trees_all_equal(sam_params, base_params)
        chex.assert_trees_all_equal(schedule_params, base_params)
        chex.assert_trees_all_equal(stable_params, base_params)

    def test_inject_hyperparams(self):
        factory = optax.inject_hyperparams(
            sam_optax.sam, static_args=("ascent_norm", "ascent_steps")
        )
        tx = optax.chain(factory(rho=0.05, stable=True), optax.sgd(0.1))
        params, state = train(tx)
        expected, _ = train(optax.chain(sam_optax.sam(0.05, stable=True), optax.sgd(0.1)))
        chex.assert_trees_all_close(params, expected, atol=1e-6)
        self.assertAlmostEqual(float(state[0].hyperparams["rho"]), 0.05)
        # Changing rho in the state, as with any optax hyperparameter: 0 switches SAM off.
        state[0].hyperparams["rho"] = jnp.asarray(0.0)
        g = mlp_params(jax.random.key(3))
        batch = mlp_batch(jax.random.key(1))
        grad_fn = jax.grad(lambda q: mlp_loss(q, batch))
        out, _ = jax.jit(functools.partial(tx.update, grad_fn=grad_fn))(g, state, params)
        chex.assert_trees_all_close(out, optax.tree.scale(-0.1, g))
        # A schedule of rho, too.
        scheduled = factory(rho=optax.linear_schedule(0.0, 0.1, 4))
        train(scheduled, steps=2)

    def test_schedule_skips_second_pass(self):
        """rho = 0 for 3 steps then 0.1: grad_fn runs only on the SAM steps, at run time."""
        calls = []
        batch = mlp_batch(jax.random.key(1))

        def grad_fn(p):
            jax.debug.callback(lambda: calls.append(1))
            return jax.grad(lambda q: mlp_loss(q, batch))(p)

        schedule = optax.join_schedules(
            [optax.constant_schedule(0.0), optax.constant_schedule(0.1)], [3]
        )
        tx = optax.chain(sam_optax.sam(schedule), optax.sgd(0.1))
        params = mlp_params(jax.random.key(0))
        state = tx.init(params)
        step = jax.jit(
            lambda p, s: tx.update(jax.grad(lambda q: mlp_loss(q, batch))(p), s, p, grad_fn=grad_fn)
        )
        outs = []
        for _ in range(5):
            out, state = step(params, state)
            jax.block_until_ready(out)
            outs.append(out)
        self.assertEqual(len(calls), 2)
        g = jax.grad(lambda q: mlp_loss(q, batch))(params)
        chex.assert_trees_all_close(outs[0], optax.tree.scale(-0.1, g), rtol=1e-5)
        expected = reference_tree(params, lambda q: jax.grad(lambda r: mlp_loss(r, batch))(q))
        chex.assert_trees_all_close(outs[4], optax.tree.scale(-0.1, expected), atol=1e-6)


def reference_tree(params, grad_fn, *, rho=0.1, stable=False):
    g = grad_fn(params)
    eps = optax.tree.scale(rho / optax.tree.norm(g), g)
    g_sam = grad_fn(jax.tree.map(jnp.add, params, eps))
    if stable:
        g_sam = optax.tree.scale(optax.tree.norm(g) / optax.tree.norm(g_sam), g_sam)
    return g_sam


class NumericsTest(chex.TestCase):
    @parameterized.product(
        variant=(
            dict(),
            dict(stable=True),
            dict(adaptive=True, stable=True),
            dict(ascent_norm=np.inf),
            dict(ascent_norm=3.0, stable=True),
            dict(normalize=False, stable=True),
            dict(ascent_steps=3, stable=True),
        )
    )
    def test_zero_gradient_gives_no_nan(self, variant):
        params = {"w": jnp.ones((3,)), "b": jnp.zeros(())}
        zeros = jax.tree.map(jnp.zeros_like, params)
        out, _ = run_update(sam_optax.sam(0.1, **variant), zeros, params, lambda p: zeros)
        chex.assert_trees_all_equal(out, zeros)

    def test_low_precision_dtype(self):
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), mlp_params(jax.random.key(0)))
        batch = mlp_batch(jax.random.key(1))
        grad_fn = jax.grad(lambda q: mlp_loss(q, batch))
        grads = grad_fn(params)
        out, _ = run_update(sam_optax.sam(0.05, stable=True, adaptive=True), grads, params, grad_fn)
        chex.assert_trees_all_equal_dtypes(out, grads)
        chex.assert_tree_all_finite(out)
        # Renormalized in float32: the bf16 output's norm matches ||g|| to bf16 precision.
        np.testing.assert_allclose(optax.tree.norm(out), optax.tree.norm(grads), rtol=1e-2)

    @hypothesis.settings(max_examples=25, deadline=None)
    @hypothesis.given(
        g=hnp.arrays(np.float32, (5,), elements=dict(min_value=-10, max_value=10)),
        b=hnp.arrays(np.float32, (2, 3), elements=dict(min_value=-10, max_value=10)),
        rho=hypothesis.strategies.floats(0.0, 2.0),
        adaptive=hypothesis.strategies.booleans(),
        normalize=hypothesis.strategies.booleans(),
    )
    def test_stable_keeps_gradient_norm(self, g, b, rho, adaptive, normalize):
        """||StableSAM output|| = ||g|| for any pytree, whatever the perturbed gradient."""
        params = {"a": jnp.linspace(-1.0, 1.0, 5), "b": {"c": jnp.ones((2, 3))}}
        grads = {"a": jnp.asarray(g), "b": {"c": jnp.asarray(b)}}

        def grad_fn(p):  # a non-linear "gradient" so that g_sam is not parallel to g
            return jax.tree.map(lambda x, y: jnp.sin(3 * x) + y, p, grads)

        tx = sam_optax.sam(rho, stable=True, adaptive=adaptive, normalize=normalize)
        out, _ = run_update(tx, grads, params, grad_fn)
        g_norm = float(optax.tree.norm(grads))
        if float(optax.tree.norm(grad_fn(params))) > 1e-3:
            np.testing.assert_allclose(optax.tree.norm(out), g_norm, rtol=1e-5, atol=1e-5)


class ArgumentTest(chex.TestCase):
    @parameterized.named_parameters(
        ("negative_rho", dict(rho=-0.1), ValueError, "rho must be a non-negative"),
        ("nan_rho", dict(rho=float("nan")), ValueError, "rho must be a non-negative"),
        ("inf_rho", dict(rho=float("inf")), ValueError, r"finite.*sam_optax.sam\(rho=0.05\)"),
        ("minus_inf_rho", dict(rho=-float("inf")), ValueError, "rho must be a non-negative"),
        ("array_inf_rho", dict(rho=np.float32(np.inf)), ValueError, "rho must be"),
        ("inf_eta", dict(eta=float("inf")), ValueError, "eta must be >= 0 and finite"),
        ("bool_norm", dict(ascent_norm=True), ValueError, "ascent_norm"),
        ("negative_eta", dict(eta=-1.0), ValueError, "eta must be >= 0"),
        ("norm_one", dict(ascent_norm=1.0), ValueError, "ascent_norm"),
        ("norm_half", dict(ascent_norm=0.5), ValueError, "ascent_norm"),
        ("norm_string", dict(ascent_norm="2"), ValueError, "ascent_norm"),
        ("zero_steps", dict(ascent_steps=0), ValueError, "ascent_steps must be >= 1"),
        ("float_steps", dict(ascent_steps=2.0), TypeError, "ascent_steps must be an int"),
        ("bool_steps", dict(ascent_steps=True), TypeError, "ascent_steps must be an int"),
        ("sync_without_axis", dict(sync_ascent=True), ValueError, "axis_name"),
    )
    def test_bad_arguments(self, kwargs, error, message):
        with self.assertRaisesRegex(error, message):
            sam_optax.sam(**kwargs)

    def test_inject_hyperparams_needs_static_ascent_args(self):
        """Only when ascent_norm/ascent_steps are passed: the defaults need no static_args."""
        tx = optax.inject_hyperparams(sam_optax.sam)(rho=0.05, ascent_norm=float("inf"))
        with self.assertRaisesRegex(ValueError, r"static_args=\('ascent_norm'"):
            tx.init({"w": jnp.ones(3)})
        tx = optax.inject_hyperparams(sam_optax.stable_sam)(rho=0.05, ascent_steps=2)
        with self.assertRaisesRegex(TypeError, "static_args"):
            tx.init({"w": jnp.ones(3)})
        tx = optax.inject_hyperparams(sam_optax.sam, static_args=("ascent_norm", "ascent_steps"))(
            rho=0.05, ascent_norm=float("inf"), ascent_steps=2
        )
        tx.init({"w": jnp.ones(3)})

    def test_perturb_mask_under_inject_hyperparams(self):
        params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
        kernels = lambda p: jax.tree.map(lambda x: x.ndim == 2, p)  # noqa: E731
        tx = optax.inject_hyperparams(sam_optax.sam)(rho=0.1, perturb_mask=kernels)
        with self.assertRaisesRegex(ValueError, r"static_args=\('perturb_mask',\)"):
            run_update(tx, params, params, lambda p: p)
        tx = optax.inject_hyperparams(sam_optax.sam, static_args=("perturb_mask",))(
            rho=0.1, perturb_mask=kernels
        )
        out, _ = run_update(tx, params, params, lambda p: p)
        chex.assert_trees_all_close(out["b"], params["b"])  # b is not perturbed
        self.assertFalse(np.allclose(out["w"], params["w"]))

    def test_shortcuts_check_too(self):
        with self.assertRaisesRegex(ValueError, "rho"):
            sam_optax.asam(rho=-1.0)
        with self.assertRaisesRegex(ValueError, "eta"):
            sam_optax.asam(eta=-0.1)

    def test_missing_grad_fn(self):
        tx = optax.chain(sam_optax.sam(), optax.sgd(0.1))
        params = {"w": jnp.ones(3)}
        with self.assertRaisesRegex(TypeError, r"grad_fn=lambda p: jax.grad\(loss_fn\)"):
            tx.update(params, tx.init(params), params)

    def test_missing_params(self):
        tx = sam_optax.sam()
        with self.assertRaisesRegex(ValueError, "params"):
            tx.update({"w": jnp.ones(3)}, tx.init(None), grad_fn=lambda p: p)

    def test_traced_hyperparameters_are_not_checked_at_trace_time(self):
        @jax.jit
        def build_and_run(rho, eta):
            tx = sam_optax.sam(rho, eta=eta, adaptive=True)
            return run_update(tx, quadratic_grad(W0), jnp.asarray(W0), quadratic_grad)[0]

        expected = reference_sam(W0, numpy_quadratic_grad, 0.5, adaptive=True, eta=0.01)
        np.testing.assert_allclose(build_and_run(0.5, 0.01), expected, rtol=2e-5)


FACTORIES = dict(
    sam=(sam_optax.sam, {}),
    stable_sam=(sam_optax.stable_sam, dict(stable=True)),
    asam=(sam_optax.asam, dict(adaptive=True, eta=0.01)),
    usam=(sam_optax.usam, dict(normalize=False)),
)


class InjectHyperparamsTest(chex.TestCase):
    """optax.inject_hyperparams(f)(rho=...) with no static_args, for every factory."""

    @parameterized.named_parameters(*[(name, name) for name in FACTORIES])
    def test_rho_is_a_hyperparameter(self, name):
        factory, kw = FACTORIES[name]
        tx = optax.chain(optax.inject_hyperparams(factory)(rho=0.1), optax.sgd(0.1))
        params, state = train(tx, steps=2)
        expected, _ = train(optax.chain(factory(0.1), optax.sgd(0.1)), steps=2)
        chex.assert_trees_all_close(params, expected, atol=1e-6)
        np.testing.assert_allclose(state[0].hyperparams["rho"], 0.1, rtol=1e-6)
        # Setting rho in the state changes the next update to that of factory(new rho).
        state[0].hyperparams["rho"] = jnp.asarray(0.3)
        batch = mlp_batch(jax.random.key(1))
        grad_fn = jax.grad(lambda q: mlp_loss(q, batch))
        out, new_state = jax.jit(functools.partial(tx.update, grad_fn=grad_fn))(
            grad_fn(params), state, params
        )
        reference = sam_optax.sam(0.3, **kw)
        expected_out, _ = run_update(reference, grad_fn(params), params, grad_fn)
        chex.assert_trees_all_close(out, optax.tree.scale(-0.1, expected_out), atol=1e-6)
        np.testing.assert_allclose(new_state[0].hyperparams["rho"], 0.3, rtol=1e-6)

    def test_signatures_show_every_keyword(self):
        import inspect

        for name, (factory, kw) in FACTORIES.items():
            parameters = inspect.signature(factory).parameters
            self.assertTrue(set(inspect.signature(sam_optax.sam).parameters) <= set(parameters))
            for key, value in kw.items():
                self.assertEqual(parameters[key].default, value, (name, key))
        self.assertEqual(inspect.signature(sam_optax.asam).parameters["rho"].default, 0.5)
        chex.assert_trees_all_close(  # asam's eta may still be passed by position
            run_update(sam_optax.asam(0.5, 0.1), quadratic_grad(W0), W0, quadratic_grad)[0],
            reference_sam(W0, numpy_quadratic_grad, 0.5, adaptive=True, eta=0.1),
            rtol=2e-5,
        )


class GradFnGuardTest(chex.TestCase):
    """A wrong grad_fn fails when the step is traced, with a message that names grad_fn."""

    params = {"w": jnp.ones(3), "b": jnp.zeros(())}

    def check(self, grad_fn, error, message, **kwargs):
        tx = sam_optax.sam(0.1, **kwargs)
        grads = jax.tree.map(jnp.ones_like, self.params)
        with self.assertRaisesRegex(error, message):
            jax.jit(functools.partial(run_update, tx, grad_fn=grad_fn))(grads, self.params)

    def test_value_and_grad(self):
        grad_fn = jax.value_and_grad(lambda p: jnp.sum(p["w"] ** 2) + p["b"])
        self.check(grad_fn, TypeError, r"grad_fn.*not jax.value_and_grad\(...\)")

    def test_grads_and_aux(self):
        self.check(
            lambda p: (jax.tree.map(jnp.ones_like, p), {"acc": 1.0}),
            TypeError,
            r"has_aux=True\)\(p, batch\)\[0\]",
        )

    def test_loss_instead_of_gradient(self):
        self.check(lambda p: jnp.sum(p["w"]), TypeError, "grad_fn.*not the loss")

    def test_other_structure(self):
        self.check(lambda p: {"w": p["w"]}, TypeError, r"grad_fn must return.*it returned a dict")

    def test_other_shape(self):
        """A (3, 3) gradient for a (3,) parameter would broadcast into the params silently."""
        self.check(
            lambda p: {"w": jnp.ones((3, 3)), "b": p["b"]},
            ValueError,
            r"grad_fn.*\['w'\]: got float32\[3, 3\], expected float32\[3\]",
        )

    def test_other_dtype(self):
        self.check(
            lambda p: jax.tree.map(lambda x: x.astype(jnp.bfloat16), p),
            ValueError,
            r"grad_fn.*got bfloat16\[3\], expected float32\[3\]",
        )

    def test_multi_step_and_micro_batches_check_too(self):
        self.check(lambda p: {"w": p["w"]}, TypeError, "grad_fn must return", ascent_steps=3)
        tx = sam_optax.sam(0.1)
        with self.assertRaisesRegex(TypeError, "grad_fn must return"):
            tx.update(
                None,
                tx.init(self.params),
                self.params,
                grad_fn=lambda p, batch: p["w"],
                micro_batches=jnp.ones((2, 4)),
            )

    def test_micro_batches_arguments(self):
        tx = sam_optax.sam(0.1, axis_name="i", sync_ascent=True)
        grad_fn = lambda p, batch: p  # noqa: E731
        with self.assertRaisesRegex(ValueError, "accumulate_grad_fn"):
            jax.vmap(
                lambda b: tx.update(
                    None, tx.init(self.params), self.params, grad_fn=grad_fn, micro_batches=b
                ),
                axis_name="i",
            )(jnp.ones((2, 2, 3)))
        tx = sam_optax.sam(0.1)
        with self.assertRaisesRegex(ValueError, "leading axis of the same size"):
            tx.update(
                None,
                tx.init(self.params),
                self.params,
                grad_fn=grad_fn,
                micro_batches=(jnp.ones((2, 3)), jnp.ones((3, 3))),
            )


# The variants of the non-finite tests: every kind of ascent and output.
NON_FINITE_VARIANTS = [
    dict(testcase_name="sam"),
    dict(testcase_name="stable", stable=True),
    dict(testcase_name="asam", adaptive=True, rho=0.5),
    dict(testcase_name="usam", normalize=False),
    dict(testcase_name="stable_usam", normalize=False, stable=True),
    dict(testcase_name="sign", ascent_norm=np.inf),
    dict(testcase_name="stable_sign", ascent_norm=np.inf, stable=True),
    dict(testcase_name="l3", ascent_norm=3.0),
    dict(testcase_name="two_steps", ascent_steps=2),
    dict(testcase_name="three_steps_sign", ascent_steps=3, ascent_norm=np.inf),
    dict(testcase_name="schedule", rho=optax.constant_schedule(0.1)),
    dict(testcase_name="mask", perturb_mask={"w": True, "b": False}),
]


class NonFiniteTest(chex.TestCase):
    """A non-finite gradient element is never hidden: the output is then non-finite."""

    params = {"w": jnp.asarray(W0), "b": jnp.asarray([0.5, -1.0])}

    @staticmethod
    def grad_fn(p):
        return {"w": quadratic_grad(p["w"]), "b": 2.0 * p["b"]}

    @parameterized.named_parameters(*NON_FINITE_VARIANTS)
    def test_in_g(self, rho=0.1, **kw):
        tx = sam_optax.sam(rho, **kw)
        for bad in (np.nan, np.inf, -np.inf):
            for leaf in ("w", "b"):
                grads = self.grad_fn(self.params)
                grads[leaf] = grads[leaf].at[0].set(bad)
                out, _ = jax.jit(functools.partial(run_update, tx, grad_fn=self.grad_fn))(
                    grads, self.params
                )
                self.assertFalse(bool(sam_optax._tree.all_finite(out)), (bad, leaf))

    @parameterized.named_parameters(*NON_FINITE_VARIANTS)
    def test_in_the_perturbed_gradient(self, rho=0.1, **kw):
        def grad_fn(p):
            g = self.grad_fn(p)
            return {"w": g["w"].at[1].set(jnp.inf), "b": g["b"]}

        out, _ = run_update(
            sam_optax.sam(rho, **kw), self.grad_fn(self.params), self.params, grad_fn
        )
        self.assertFalse(bool(sam_optax._tree.all_finite(out)))

    def test_in_an_intermediate_ascent_gradient(self):
        """inf only on the way (|eps| = 0.11 after the first of two sign steps, 0.22 after both)."""

        def grad_fn(p):
            g = self.grad_fn(p)
            on_the_way = optax.tree.norm(jax.tree.map(jnp.subtract, p, self.params)) < 0.15
            return {"w": jnp.where(on_the_way, g["w"].at[0].set(jnp.inf), g["w"]), "b": g["b"]}

        tx = sam_optax.sam(0.1, ascent_norm=np.inf, ascent_steps=2)
        out, _ = run_update(tx, self.grad_fn(self.params), self.params, grad_fn)
        self.assertFalse(bool(sam_optax._tree.all_finite(out)))

    def test_apply_if_finite_skips_the_step(self):
        tx = optax.apply_if_finite(
            optax.chain(sam_optax.sam(0.1, ascent_norm=np.inf, stable=True), optax.sgd(0.1)), 3
        )
        grads = self.grad_fn(self.params)
        grads["w"] = grads["w"].at[0].set(np.inf)
        updates, state = run_update(tx, grads, self.params, self.grad_fn)
        chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, self.params))
        self.assertEqual(int(state.notfinite_count), 1)

    def test_perturbation_too(self):
        grads = self.grad_fn(self.params)
        grads["b"] = grads["b"].at[0].set(np.nan)
        eps = sam_optax.perturbation(grads, self.params, rho=0.1)
        self.assertFalse(bool(sam_optax._tree.all_finite(eps)))


class Float64Test(chex.TestCase):
    """float64 parameters (jax_enable_x64) give float64 math: agreement with NumPy to ~1e-12."""

    @parameterized.named_parameters(*VARIANTS)
    def test_against_numpy(self, rho=0.1, p=2.0, steps=1, **kw):
        with jax.enable_x64(True):
            w = jnp.asarray(W0, jnp.float64)
            tx = sam_optax.sam(rho, ascent_norm=p, ascent_steps=steps, **kw)
            out, _ = jax.jit(functools.partial(run_update, tx, grad_fn=quadratic_grad))(
                quadratic_grad(w), w
            )
            self.assertEqual(out.dtype, jnp.float64)
            expected = reference_sam(W0, numpy_quadratic_grad, rho, p=p, steps=steps, **kw)
            np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-12, atol=1e-14)

    def test_mixed_tree_and_x64_float32(self):
        with jax.enable_x64(True):
            # float32 params under x64 stay float32 (no silent promotion of the output) ...
            w32 = jnp.asarray(W0)
            out, _ = run_update(
                sam_optax.sam(0.1, stable=True), quadratic_grad(w32), w32, quadratic_grad
            )
            self.assertEqual(out.dtype, jnp.float32)
            # ... and one float64 leaf makes the ascent's norm float64.
            params = {"a": jnp.asarray(W0, jnp.float64), "b": jnp.ones(2, jnp.float32)}
            eps = sam_optax.perturbation(params, params, rho=0.1)
            self.assertEqual(eps["a"].dtype, jnp.float64)
            self.assertEqual(eps["b"].dtype, jnp.float64)
        self.assertEqual(jnp.ones(1).dtype, jnp.float32)  # x64 did not leak


class VmapMSharpnessTest(DataParallelSetup):
    """m-sharpness on one device: sam(axis_name=...) under jax.vmap over sub-batches equals
    jax.shard_map over 4 simulated devices (and the per-device reference)."""

    n_devices = 4

    def vmapped(self, tx):
        return jax.jit(
            jax.vmap(self.step(tx, "m"), in_axes=(None, 0), axis_name="m", out_axes=None)
        )(self.params, self.batches)

    def sharded(self, tx):
        mesh = jax.make_mesh((self.n_devices,), ("m",), devices=jax.devices()[: self.n_devices])
        P = jax.sharding.PartitionSpec

        def device_step(params, batch):
            return self.step(tx, "m")(params, jax.tree.map(lambda b: b[0], batch))

        batches = jax.device_put(self.batches, jax.sharding.NamedSharding(mesh, P("m")))
        return jax.jit(
            jax.shard_map(device_step, mesh=mesh, in_specs=(P(), P("m")), out_specs=P())
        )(self.params, batches)

    @parameterized.parameters(
        dict(sync_ascent=False, stable=False, steps=1, schedule=False),
        dict(sync_ascent=False, stable=True, steps=2, schedule=True),
        dict(sync_ascent=True, stable=True, steps=1, schedule=False),
        dict(sync_ascent=True, stable=False, steps=2, schedule=True),
    )
    def test_vmap_equals_shard_map(self, sync_ascent, stable, steps, schedule):
        rho = optax.constant_schedule(0.1) if schedule else 0.1
        tx = sam_optax.sam(
            rho, stable=stable, ascent_steps=steps, axis_name="m", sync_ascent=sync_ascent
        )
        out = self.vmapped(tx)
        chex.assert_trees_all_close(out, self.sharded(tx), atol=1e-6)
        expected = self.expected(sync_ascent=sync_ascent, stable=stable, steps=steps)
        chex.assert_trees_all_close(out, expected, atol=1e-6)

    def test_per_device_is_a_no_op_under_vmap(self):
        marked = jax.vmap(lambda x: sam_optax.per_device(x, "m"), axis_name="m")(jnp.ones((4, 2)))
        chex.assert_trees_all_equal(marked, jnp.ones((4, 2)))


class AccumulationTest(chex.TestCase):
    """Gradient accumulation over k micro-batches, both meanings, with one micro-batch's memory."""

    k = 4

    def setUp(self):
        super().setUp()
        self.params = mlp_params(jax.random.key(0))
        self.batch = mlp_batch(jax.random.key(1), n=8 * self.k)
        self.micro_batches = jax.tree.map(lambda x: x.reshape(self.k, -1, *x.shape[1:]), self.batch)
        self.batch_grad_fn = jax.grad(mlp_loss)

    def sam_step(self, tx, grad_fn, **extra):
        @jax.jit
        def step(params):
            g = None if "micro_batches" in extra else grad_fn(params)  # not used with them
            return tx.update(g, tx.init(params), params, grad_fn=grad_fn, **extra)[0]

        return step(self.params)

    @parameterized.named_parameters(
        dict(testcase_name="sam"),
        dict(testcase_name="stable_asam", adaptive=True, stable=True, rho=0.5),
        dict(testcase_name="three_steps", ascent_steps=3, stable=True),
        dict(testcase_name="schedule", rho=optax.linear_schedule(0.1, 0.0, 10)),
    )
    def test_global_ascent_is_whole_batch_sam(self, rho=0.1, **kw):
        tx = sam_optax.sam(rho, **kw)
        grad_fn = sam_optax.accumulate_grad_fn(self.batch_grad_fn, self.micro_batches)
        whole = lambda p: self.batch_grad_fn(p, self.batch)  # noqa: E731
        chex.assert_trees_all_close(self.sam_step(tx, grad_fn), self.sam_step(tx, whole), atol=1e-6)
        chex.assert_trees_all_close(grad_fn(self.params), whole(self.params), atol=1e-6)

    def vmap_m_sharpness(self, **kw):
        tx = sam_optax.sam(axis_name="m", **kw)

        def step(params, batch):
            grad_fn = lambda p: self.batch_grad_fn(p, batch)  # noqa: E731
            return tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)[0]

        return jax.jit(jax.vmap(step, in_axes=(None, 0), axis_name="m", out_axes=None))(
            self.params, self.micro_batches
        )

    @parameterized.named_parameters(
        dict(testcase_name="sam"),
        dict(testcase_name="stable", stable=True),
        dict(testcase_name="stable_two_steps", stable=True, ascent_steps=2),
        dict(testcase_name="schedule", rho=optax.constant_schedule(0.1), stable=True),
        dict(testcase_name="rho_zero", rho=0.0, stable=True),
    )
    def test_per_micro_batch_ascent_is_m_sharpness(self, rho=0.1, **kw):
        tx = sam_optax.sam(rho, **kw)
        out = self.sam_step(tx, self.batch_grad_fn, micro_batches=self.micro_batches)
        chex.assert_trees_all_close(out, self.vmap_m_sharpness(rho=rho, **kw), atol=1e-6)
        # Not the global ascent (or the comparison above would prove nothing).
        if rho != 0.0:
            grad_fn = sam_optax.accumulate_grad_fn(self.batch_grad_fn, self.micro_batches)
            diff = optax.tree.norm(jax.tree.map(jnp.subtract, out, self.sam_step(tx, grad_fn)))
            self.assertGreater(float(diff), 1e-4)

    def test_per_micro_batch_ascent_under_shard_map(self):
        """2 devices x 2 micro-batches each = vmap m-sharpness over the same 4 sub-batches."""
        mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
        P = jax.sharding.PartitionSpec
        tx = sam_optax.sam(0.1, stable=True, axis_name="data")

        def device_step(params, micro_batches):
            micro_batches = jax.tree.map(lambda b: b[0], micro_batches)
            return tx.update(
                None,
                tx.init(params),
                params,
                grad_fn=self.batch_grad_fn,
                micro_batches=micro_batches,
            )[0]

        per_device = jax.tree.map(lambda x: x.reshape(2, 2, *x.shape[1:]), self.micro_batches)
        per_device = jax.device_put(per_device, jax.sharding.NamedSharding(mesh, P("data")))
        out = jax.jit(
            jax.shard_map(device_step, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
        )(self.params, per_device)
        chex.assert_trees_all_close(out, self.vmap_m_sharpness(rho=0.1, stable=True), atol=1e-6)

    def test_bfloat16_accumulates_in_float32(self):
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), self.params)
        tx = sam_optax.sam(0.1, stable=True)
        out, _ = tx.update(
            None,
            tx.init(params),
            params,
            grad_fn=self.batch_grad_fn,
            micro_batches=self.micro_batches,
        )
        chex.assert_trees_all_equal_dtypes(out, params)
        grad_fn = sam_optax.accumulate_grad_fn(self.batch_grad_fn, self.micro_batches)
        chex.assert_trees_all_equal_dtypes(grad_fn(params), params)

    def test_multi_steps_is_neither_meaning(self):
        """What optax.MultiSteps around sam computes (documented in the README): the ascent from
        the mean gradient of the k micro-batches, the SAM gradient of the last micro-batch only."""
        rho, lr = 0.1, 0.1
        tx = optax.MultiSteps(optax.chain(sam_optax.sam(rho), optax.sgd(lr)), self.k)
        state = tx.init(self.params)
        grad_fns = [
            functools.partial(
                lambda p, b: self.batch_grad_fn(p, b), b=jax.tree.map(lambda x, i=i: x[i], mb)
            )
            for i, mb in enumerate([self.micro_batches] * self.k)
        ]
        for grad_fn in grad_fns:
            with self.assertWarnsRegex(UserWarning, "accumulate_grad_fn"):
                updates, state = tx.update(
                    grad_fn(self.params), state, self.params, grad_fn=grad_fn
                )
        mean_g = sam_optax.accumulate_grad_fn(self.batch_grad_fn, self.micro_batches)(self.params)
        eps = optax.tree.scale(rho / optax.tree.norm(mean_g), mean_g)
        last = grad_fns[-1](jax.tree.map(jnp.add, self.params, eps))
        chex.assert_trees_all_close(updates, optax.tree.scale(-lr, last), atol=1e-6)

    def test_memory_grows_with_the_micro_batch_not_with_k(self):
        """The compiled step's temporaries: constant in k (scan), growing with k under vmap."""
        tx = sam_optax.sam(0.1, stable=True)

        def temp_bytes(k, mode):
            x = jnp.zeros((k, 64, 4))
            y = jnp.zeros((k, 64), jnp.int32)

            def step(params, micro_batches):
                if mode == "per_micro_batch":
                    return tx.update(
                        None,
                        tx.init(params),
                        params,
                        grad_fn=self.batch_grad_fn,
                        micro_batches=micro_batches,
                    )[0]
                if mode == "global":
                    fn = sam_optax.accumulate_grad_fn(self.batch_grad_fn, micro_batches)
                    return tx.update(fn(params), tx.init(params), params, grad_fn=fn)[0]
                return jax.vmap(lambda p, b: jax.grad(mlp_loss)(p, b), in_axes=(None, 0))(
                    params, micro_batches
                )

            compiled = jax.jit(step).lower(self.params, (x, y)).compile()
            return compiled.memory_analysis().temp_size_in_bytes

        for mode in ("per_micro_batch", "global"):
            small, large = temp_bytes(2, mode), temp_bytes(16, mode)
            self.assertLessEqual(large, 1.1 * small + 1024, mode)
        self.assertGreater(temp_bytes(16, "vmap"), 4 * temp_bytes(2, "vmap"))


if __name__ == "__main__":
    import absl.testing.absltest

    absl.testing.absltest.main()
