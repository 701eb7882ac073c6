"""Tests of GSAM, LookSAM, Friendly SAM and VaSSO, and of StableSAM's official conventions
(`stable_max_scale`, `stable_norm="adaptive"`): closed forms on a quadratic, NumPy transcriptions
of the papers' algorithms, reductions to SAM, data parallelism, compositions and checkpoints."""

import functools
import inspect
import os
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized
from mlp_problem import mlp_batch, mlp_loss, mlp_params

import sam_optax

# --------------------------------------------------------------------------------------------
# Problems.
# --------------------------------------------------------------------------------------------

# L(w) = 1/2 w^T A w: g = A w and the gradient at w + eps is g + A eps.
A = np.array([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.25]])
W0 = np.array([1.0, -2.0, 0.5])
LR = 0.1


def quadratic_grad(w):
    return jnp.asarray(A, jnp.float32) @ w


# name -> (factory, hyperparameters, the state's buffer field or None).
VARIANTS = {
    "gsam": (sam_optax.gsam, dict(rho=0.1, alpha=0.3), None),
    "gsam_fp": (sam_optax.gsam, dict(rho=0.1, alpha=0.3, minimize_perturbed=False), None),
    "looksam": (sam_optax.looksam, dict(rho=0.1, k=2, alpha=0.7), "g_v"),
    "looksam_k3": (sam_optax.looksam, dict(rho=0.2, k=3, alpha=0.5), "g_v"),
    "friendly_sam": (sam_optax.friendly_sam, dict(rho=0.1, sigma=1.0, lmbda=0.9), "m"),
    "friendly_sam_half": (sam_optax.friendly_sam, dict(rho=0.2, sigma=0.5, lmbda=0.6), "m"),
    "vasso": (sam_optax.vasso, dict(rho=0.1, theta=0.4), "d"),
}
KIND = {
    "gsam": "gsam",
    "gsam_fp": "gsam",
    "looksam": "looksam",
    "looksam_k3": "looksam",
    "friendly_sam": "friendly_sam",
    "friendly_sam_half": "friendly_sam",
    "vasso": "vasso",
}
NAMES = [(name, name) for name in VARIANTS]
MAIN = [(name, name) for name in ("gsam", "looksam", "friendly_sam", "vasso")]


def make(name, **overrides):
    factory, hyper, _ = VARIANTS[name]
    return factory(**{**hyper, **overrides})


# --------------------------------------------------------------------------------------------
# References.
# --------------------------------------------------------------------------------------------


def unit(v):
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else 0 * v


class QuadraticClosedForm:
    """Each variant on L = 1/2 w^T A w written with A: g = A w, g_p = g + rho A n(d)."""

    def __init__(self, name, hyper):
        self.kind, self.h, self.t = KIND[name], hyper, 0
        self.buffer = np.zeros(3)

    def step(self, w):
        h, t, g = self.h, self.t, A @ w
        rho = h["rho"]
        if self.kind == "gsam":
            g_p = g + rho * A @ unit(g)
            if h.get("minimize_perturbed", True):
                u = unit(g_p)
                out = g_p - h["alpha"] * (g - (g @ u) * u)
            else:
                u = unit(g)
                out = g + h["alpha"] * (g_p - (g_p @ u) * u)
        elif self.kind == "looksam":
            if t % h["k"] == 0:
                out = g + rho * A @ unit(g)
                self.buffer = out - (out @ unit(g)) * unit(g)
            else:
                out = g + h["alpha"] * np.linalg.norm(g) / np.linalg.norm(self.buffer) * self.buffer
        elif self.kind == "friendly_sam":
            m = self.buffer
            d = g if t == 0 else g - h["sigma"] * m
            self.buffer = g if t == 0 else h["lmbda"] * m + (1 - h["lmbda"]) * g
            out = g + rho * A @ unit(d)
        else:  # vasso
            d = g if t == 0 else (1 - h["theta"]) * self.buffer + h["theta"] * g
            self.buffer = d
            out = g + rho * A @ unit(d)
        self.t += 1
        return out


def norm_list(xs):
    return np.sqrt(sum(np.sum(x * x) for x in xs))


def vdot_list(xs, ys):
    return sum(np.sum(x * y) for x, y in zip(xs, ys, strict=True))


class NumpyReference:
    """The papers' algorithms as the official optimizers write them: loops over a list of
    float64 parameter arrays, with global norms over the list. `grad_fns` holds one gradient
    function per device (one without data parallelism); each device's ascent starts from its own
    gradient unless `sync`, and the outputs and buffers use the averaged gradients."""

    def __init__(self, name, hyper, sync=False):
        self.kind, self.h, self.sync, self.t = KIND[name], hyper, sync, 0
        self.buffer = None

    def perturbed_mean(self, ws, grad_fns, directions):
        outs = []
        for grad_fn, d in zip(grad_fns, directions, strict=True):
            d_norm = norm_list(d)
            if self.kind == "vasso":
                scale = self.h["rho"] / (d_norm + 1e-7)  # the official code's epsilon
            else:
                scale = self.h["rho"] / d_norm if d_norm > 0 else 0.0
            outs.append(grad_fn([w + scale * di for w, di in zip(ws, d, strict=True)]))
        return [sum(xs) / len(xs) for xs in zip(*outs, strict=True)]

    def step(self, ws, grad_fns):
        h, t = self.h, self.t
        local = [grad_fn(ws) for grad_fn in grad_fns]
        g = [sum(xs) / len(xs) for xs in zip(*local, strict=True)]
        own = [g] * len(grad_fns) if self.sync else local
        if self.buffer is None:
            self.buffer = [np.zeros_like(w) for w in ws]
        if self.kind == "gsam":
            g_p = self.perturbed_mean(ws, grad_fns, own)
            if h.get("minimize_perturbed", True):
                n = norm_list(g_p)
                u = [x / n for x in g_p]
                c = vdot_list(u, g)
                out = [
                    gp - h["alpha"] * (gi - c * ui) for gp, gi, ui in zip(g_p, g, u, strict=True)
                ]
            else:
                n = norm_list(g)
                u = [x / n for x in g]
                c = vdot_list(u, g_p)
                out = [
                    gi + h["alpha"] * (gp - c * ui) for gp, gi, ui in zip(g_p, g, u, strict=True)
                ]
        elif self.kind == "looksam":
            if t % h["k"] == 0:
                g_s = self.perturbed_mean(ws, grad_fns, own)
                n = norm_list(g)
                c = vdot_list(g_s, [x / n for x in g])
                self.buffer = [gs - c * gi / n for gs, gi in zip(g_s, g, strict=True)]
                out = g_s
            else:
                scale = h["alpha"] * norm_list(g) / norm_list(self.buffer)
                out = [gi + scale * v for gi, v in zip(g, self.buffer, strict=True)]
        elif self.kind == "friendly_sam":
            m = self.buffer
            if t == 0:
                directions = own
                self.buffer = [x.copy() for x in g]
            else:
                directions = [
                    [x - h["sigma"] * mi for x, mi in zip(o, m, strict=True)] for o in own
                ]
                self.buffer = [
                    h["lmbda"] * mi + (1 - h["lmbda"]) * x for mi, x in zip(m, g, strict=True)
                ]
            out = self.perturbed_mean(ws, grad_fns, directions)
        else:  # vasso
            th = 1.0 if t == 0 else h["theta"]
            d = self.buffer
            directions = [[(1 - th) * di + th * x for di, x in zip(d, o, strict=True)] for o in own]
            self.buffer = [(1 - th) * di + th * x for di, x in zip(d, g, strict=True)]
            out = self.perturbed_mean(ws, grad_fns, directions)
        self.t += 1
        return out


def numpy_grad_fn(grad_fn, treedef, *args):
    """A float64 list-of-arrays gradient from a JAX gradient of a pytree (computed in float32),
    ``grad_fn(tree, *args)``: one `grad_fn` for several batches compiles once."""
    jitted = jax.jit(grad_fn)

    def fn(ws):
        tree = jax.tree.unflatten(treedef, [jnp.asarray(w, jnp.float32) for w in ws])
        return [np.asarray(x, np.float64) for x in jax.tree.leaves(jitted(tree, *args))]

    return fn


def buffer_of(state, name):
    field = VARIANTS[name][2]
    return None if field is None else getattr(state, field)


def run_steps(tx, params, grad_fn, steps, lr=LR):
    """The transformation alone for `steps` SGD steps; returns its outputs and states."""
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))
    state = tx.init(params)
    outs, states = [], []
    for _ in range(steps):
        out, state = update(grad_fn(params), state, params)
        outs.append(out)
        states.append(state)
        params = jax.tree.map(lambda w, u: w - lr * u, params, out)
    return outs, states


def train(tx, steps=4, seed=0):
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


# --------------------------------------------------------------------------------------------
# Against closed forms and NumPy transcriptions.
# --------------------------------------------------------------------------------------------


class ClosedFormTest(chex.TestCase):
    @parameterized.named_parameters(*NAMES)
    def test_quadratic_steps(self, name):
        """Five SGD steps on the quadratic, outputs and buffers against the closed forms."""
        tx = make(name)
        outs, states = run_steps(tx, jnp.asarray(W0, jnp.float32), quadratic_grad, 5)
        reference = QuadraticClosedForm(name, VARIANTS[name][1])
        w = W0.copy()
        for t, (out, state) in enumerate(zip(outs, states, strict=True)):
            expected = reference.step(w)
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6, err_msg=f"step {t}")
            self.assertEqual(int(state.count), t + 1)
            buffer = buffer_of(state, name)
            if buffer is not None:
                np.testing.assert_allclose(buffer, reference.buffer, rtol=1e-5, atol=1e-6)
            w = w - LR * expected

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    @parameterized.named_parameters(*MAIN)
    def test_transforms(self, name):
        """Two steps under jit, eagerly and under pmap."""
        tx = make(name)

        @self.variant
        def two_steps(params):
            state = tx.init(params)
            out0, state = tx.update(quadratic_grad(params), state, params, grad_fn=quadratic_grad)
            params = params - LR * out0
            out1, state = tx.update(quadratic_grad(params), state, params, grad_fn=quadratic_grad)
            return out0, out1

        outs = two_steps(jnp.asarray(W0, jnp.float32))
        reference = QuadraticClosedForm(name, VARIANTS[name][1])
        w = W0.copy()
        for out in outs:
            expected = reference.step(w)
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
            w = w - LR * expected


class NumpyReferenceTest(chex.TestCase):
    @parameterized.named_parameters(*NAMES)
    def test_mlp(self, name):
        """Four steps on a small MLP against the list-of-arrays NumPy transcription."""
        params = mlp_params(jax.random.key(0))
        batch = mlp_batch(jax.random.key(1))
        grad_fn = jax.grad(lambda q: mlp_loss(q, batch))
        outs, states = run_steps(make(name), params, grad_fn, 4, lr=0.5)

        leaves, treedef = jax.tree.flatten(params)
        ws = [np.asarray(w, np.float64) for w in leaves]
        reference = NumpyReference(name, VARIANTS[name][1])
        np_grad = numpy_grad_fn(grad_fn, treedef)
        for t, (out, state) in enumerate(zip(outs, states, strict=True)):
            expected = reference.step(ws, [np_grad])
            for got, want in zip(jax.tree.leaves(out), expected, strict=True):
                np.testing.assert_allclose(got, want, atol=2e-5, err_msg=f"step {t}")
            buffer = buffer_of(state, name)
            if buffer is not None:
                for got, want in zip(jax.tree.leaves(buffer), reference.buffer, strict=True):
                    np.testing.assert_allclose(got, want, atol=2e-5, err_msg=f"buffer {t}")
            # Follow the transformation's own trajectory (float32 rounding stays out of it).
            ws = [
                np.asarray(w, np.float64) - 0.5 * np.asarray(u, np.float64)
                for w, u in zip(ws, jax.tree.leaves(out), strict=True)
            ]


class ReductionTest(chex.TestCase):
    @parameterized.named_parameters(
        ("gsam_alpha0", sam_optax.gsam, dict(alpha=0.0)),
        ("friendly_sam_sigma0", sam_optax.friendly_sam, dict(sigma=0.0)),
        ("vasso_theta1", sam_optax.vasso, dict(theta=1.0)),
        ("looksam_k1", sam_optax.looksam, dict(k=1)),
        ("gsam_alpha0_stable", sam_optax.gsam, dict(alpha=0.0, stable=True)),
        (
            "looksam_k1_stable_capped",
            sam_optax.looksam,
            dict(k=1, stable=True, stable_max_scale=1.0),
        ),
    )
    def test_is_sam(self, factory, kwargs):
        stable = {k: v for k, v in kwargs.items() if k.startswith("stable")}
        params, _ = train(optax.chain(factory(0.1, **kwargs), optax.sgd(0.5)))
        expected, _ = train(optax.chain(sam_optax.sam(0.1, **stable), optax.sgd(0.5)))
        chex.assert_trees_all_close(params, expected, atol=1e-6)

    @parameterized.named_parameters(*MAIN)
    def test_rho_zero_is_the_base_optimizer(self, name):
        base = optax.sgd(0.1, momentum=0.9)
        expected, _ = train(base)
        static, _ = train(optax.chain(make(name, rho=0.0), base))
        scheduled, _ = train(optax.chain(make(name, rho=optax.constant_schedule(0.0)), base))
        chex.assert_trees_all_equal(static, expected)
        chex.assert_trees_all_equal(scheduled, expected)

    def test_gsam_forms_differ(self):
        """The two GSAM forms are different algorithms (or the tests above prove little)."""
        g = quadratic_grad(jnp.asarray(W0, jnp.float32))
        params = jnp.asarray(W0, jnp.float32)
        a, _ = run_steps(make("gsam"), params, quadratic_grad, 1)
        b, _ = run_steps(make("gsam_fp"), params, quadratic_grad, 1)
        self.assertGreater(float(jnp.linalg.norm(a[0] - b[0])), 1e-3)
        del g


class NumericsTest(chex.TestCase):
    @parameterized.product(
        name=["gsam", "gsam_fp", "looksam", "friendly_sam", "vasso"],
        stable=[dict(), dict(stable=True, stable_norm="adaptive")],
    )
    def test_zero_gradient_gives_no_nan(self, name, stable):
        params = {"w": jnp.ones((3,)), "b": jnp.zeros(())}
        zeros = jax.tree.map(jnp.zeros_like, params)
        tx = make(name, **stable)
        state = tx.init(params)
        for _ in range(3):  # LookSAM's k = 2: a SAM step, a reuse step, a SAM step
            out, state = tx.update(zeros, state, params, grad_fn=lambda p: zeros)
            chex.assert_trees_all_equal(out, zeros)
            chex.assert_tree_all_finite(state)

    @parameterized.named_parameters(*MAIN)
    def test_low_precision(self, name):
        """bfloat16 params and gradients: bfloat16 output, float32 buffers."""
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), mlp_params(jax.random.key(0)))
        batch = mlp_batch(jax.random.key(1))
        grad_fn = jax.grad(lambda q: mlp_loss(q, batch))
        outs, states = run_steps(make(name, stable=True), params, grad_fn, 2)
        chex.assert_trees_all_equal_dtypes(outs[-1], params)
        chex.assert_tree_all_finite(outs[-1])
        buffer = buffer_of(states[-1], name)
        if buffer is not None:
            for x in jax.tree.leaves(buffer):
                self.assertEqual(x.dtype, jnp.float32)


# --------------------------------------------------------------------------------------------
# LookSAM's skipped passes, and "SAM every k steps" as a rho schedule.
# --------------------------------------------------------------------------------------------


def counting_grad_fn(calls, batch):
    def grad_fn(p):
        jax.debug.callback(lambda: calls.append(1))
        return jax.grad(lambda q: mlp_loss(q, batch))(p)

    return grad_fn


class SkippedPassTest(chex.TestCase):
    def run_counted(self, tx, steps):
        calls = []
        batch = mlp_batch(jax.random.key(1))
        grad_fn = counting_grad_fn(calls, batch)
        params = mlp_params(jax.random.key(0))
        state = tx.init(params)
        step = jax.jit(
            lambda p, s: tx.update(jax.grad(lambda q: mlp_loss(q, batch))(p), s, p, grad_fn=grad_fn)
        )
        for _ in range(steps):
            out, state = step(params, state)
            jax.block_until_ready(out)
        return len(calls)

    @parameterized.parameters(1, 3, 5)
    def test_looksam_calls_grad_fn_every_k_steps(self, k):
        self.assertEqual(self.run_counted(sam_optax.looksam(0.1, k=k), 10), len(range(0, 10, k)))

    def test_looksam_with_a_schedule(self):
        """rho 0 for the first 4 steps: SAM steps there skip the pass too."""
        schedule = optax.join_schedules(
            [optax.constant_schedule(0.0), optax.constant_schedule(0.1)], [4]
        )
        self.assertEqual(self.run_counted(sam_optax.looksam(schedule, k=2), 10), 3)  # 4, 6, 8

    def test_injected_k(self):
        tx = optax.inject_hyperparams(sam_optax.looksam)(rho=0.1, k=4)
        self.assertEqual(self.run_counted(tx, 9), 3)  # steps 0, 4, 8

    def test_injected_k_can_change(self):
        """inject_hyperparams makes the int k an int32 array of the state, which can be set."""
        calls = []
        batch = mlp_batch(jax.random.key(1))
        tx = optax.inject_hyperparams(sam_optax.looksam)(rho=0.1, k=4)
        params = mlp_params(jax.random.key(0))
        state = tx.init(params)
        self.assertEqual(state.hyperparams["k"].dtype, jnp.int32)
        grad_fn = counting_grad_fn(calls, batch)
        step = jax.jit(functools.partial(tx.update, grad_fn=grad_fn))
        g = jax.grad(lambda q: mlp_loss(q, batch))(params)
        for t in range(9):
            if t == 4:
                state.hyperparams["k"] = jnp.asarray(2, jnp.int32)
            out, state = step(g, state, params)
            jax.block_until_ready(out)
        self.assertEqual(len(calls), 4)  # steps 0 (k = 4), then 4, 6, 8 (k = 2)

    def test_injected_bool_stays_static(self):
        state = optax.inject_hyperparams(sam_optax.gsam)(minimize_perturbed=False).init(
            {"w": jnp.ones(3)}
        )
        self.assertNotIn("minimize_perturbed", state.hyperparams)
        self.assertIn("alpha", state.hyperparams)

    def test_sam_every_k_steps_schedule(self):
        every_3 = lambda t: jnp.where(t % 3 == 0, 0.1, 0.0)  # noqa: E731
        self.assertEqual(self.run_counted(sam_optax.sam(every_3), 10), 4)  # 0, 3, 6, 9

    def test_looksam_schedule_zero_stores_no_direction(self):
        """A SAM step with rho = 0 stores g_v = 0, so the reuse steps output g exactly."""
        params = jnp.asarray(W0, jnp.float32)
        outs, states = run_steps(
            sam_optax.looksam(optax.constant_schedule(0.0), k=3), params, quadratic_grad, 2
        )
        chex.assert_trees_all_equal(states[0].g_v, jnp.zeros(3))
        np.testing.assert_array_equal(outs[1], quadratic_grad(params - LR * outs[0]))


# --------------------------------------------------------------------------------------------
# Data parallelism.
# --------------------------------------------------------------------------------------------


class DataParallelTest(chex.TestCase):
    """Per-device ascent (or synced) over 8 simulated devices, against the NumPy reference."""

    n_devices = 8
    steps = 3

    def setUp(self):
        super().setUp()
        self.params = mlp_params(jax.random.key(0))
        x, y = mlp_batch(jax.random.key(1), n=4 * self.n_devices)
        self.batches = (x.reshape(self.n_devices, 4, 4), y.reshape(self.n_devices, 4))

    def expected(self, name, sync):
        leaves, treedef = jax.tree.flatten(self.params)
        ws = [np.asarray(w, np.float64) for w in leaves]
        grad = jax.grad(mlp_loss)
        grad_fns = [
            numpy_grad_fn(grad, treedef, jax.tree.map(lambda b, d=d: b[d], self.batches))
            for d in range(self.n_devices)
        ]
        reference = NumpyReference(name, VARIANTS[name][1], sync=sync)
        outs = []
        for _ in range(self.steps):
            out = reference.step(ws, grad_fns)
            outs.append(out)
            ws = [w - LR * u for w, u in zip(ws, out, strict=True)]
        return outs, reference.buffer, treedef

    def device_step(self, tx, axis_name, shard_map):
        def step(params, state, batch):
            if shard_map:
                batch = jax.tree.map(lambda b: b[0], batch)

            def loss(q):
                return mlp_loss(q, batch)

            grads = jax.grad(loss)(sam_optax.per_device(params, axis_name))
            out, state = tx.update(grads, state, params, grad_fn=jax.grad(loss))
            return jax.tree.map(lambda w, u: w - LR * u, params, out), out, state

        return step

    def check(self, name, sync, run):
        tx = make(name, axis_name="data", sync_ascent=sync)
        outs, buffer, treedef = self.expected(name, sync)
        params, state = self.params, tx.init(self.params)
        for t in range(self.steps):
            params, out, state = run(tx, params, state)
            for got, want in zip(jax.tree.leaves(out), outs[t], strict=True):
                np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"step {t}")
        if buffer_of(state, name) is not None:
            for got, want in zip(jax.tree.leaves(buffer_of(state, name)), buffer, strict=True):
                np.testing.assert_allclose(got, want, atol=1e-5)

    @parameterized.product(name=["gsam", "looksam", "friendly_sam", "vasso"], sync=[False, True])
    def test_shard_map(self, name, sync):
        mesh = jax.make_mesh((self.n_devices,), ("data",))
        P = jax.sharding.PartitionSpec
        batches = jax.device_put(self.batches, jax.sharding.NamedSharding(mesh, P("data")))
        steps = {}

        def run(tx, params, state):
            if "f" not in steps:
                steps["f"] = jax.jit(
                    jax.shard_map(
                        self.device_step(tx, "data", shard_map=True),
                        mesh=mesh,
                        in_specs=(P(), P(), P("data")),
                        out_specs=P(),
                    )
                )
            return steps["f"](params, state, batches)

        self.check(name, sync, run)

    @parameterized.parameters("gsam", "looksam", "friendly_sam", "vasso")
    def test_pmap(self, name):
        steps = {}

        def run(tx, params, state):
            if "f" not in steps:
                steps["f"] = jax.pmap(
                    self.device_step(tx, "data", shard_map=False),
                    axis_name="data",
                    in_axes=(None, None, 0),
                )
            params, out, state = steps["f"](params, state, self.batches)
            for d in range(1, self.n_devices):  # every device holds the same result
                chex.assert_trees_all_close(
                    jax.tree.map(lambda x, d=d: x[d], out), jax.tree.map(lambda x: x[0], out)
                )
            return jax.tree.map(lambda x: x[0], (params, out, state))

        self.check(name, False, run)

    def test_stable_adaptive_under_shard_map(self):
        """stable_norm='adaptive' with a schedule and a per-device eps compiles and is finite."""
        mesh = jax.make_mesh((self.n_devices,), ("data",))
        P = jax.sharding.PartitionSpec
        batches = jax.device_put(self.batches, jax.sharding.NamedSharding(mesh, P("data")))
        for tx in (
            sam_optax.sam(
                optax.constant_schedule(0.1), stable=True, stable_norm="adaptive", axis_name="data"
            ),
            sam_optax.vasso(
                optax.constant_schedule(0.1), stable=True, stable_norm="adaptive", axis_name="data"
            ),
        ):
            step = jax.jit(
                jax.shard_map(
                    self.device_step(tx, "data", shard_map=True),
                    mesh=mesh,
                    in_specs=(P(), P(), P("data")),
                    out_specs=P(),
                )
            )
            _, out, _ = step(self.params, tx.init(self.params), batches)
            chex.assert_tree_all_finite(out)


# --------------------------------------------------------------------------------------------
# Compositions: base optimizers, inject_hyperparams, checkpoints.
# --------------------------------------------------------------------------------------------


class CompositionTest(chex.TestCase):
    @parameterized.product(
        name=["gsam", "looksam", "friendly_sam", "vasso"],
        base=["sgd", "adam"],
    )
    def test_chain(self, name, base):
        """chain(variant, base) = the base optimizer fed the variant's output, step by step."""
        make_base = {"sgd": lambda: optax.sgd(0.1, momentum=0.9), "adam": lambda: optax.adam(1e-2)}
        params, _ = train(optax.chain(make(name, stable=True), make_base[base]()), steps=4)

        batch = mlp_batch(jax.random.key(1))
        grad_fn = jax.grad(lambda q: mlp_loss(q, batch))
        variant, base_tx = make(name, stable=True), make_base[base]()
        manual = mlp_params(jax.random.key(0))
        v_state, b_state = variant.init(manual), base_tx.init(manual)
        for _ in range(4):
            g, v_state = variant.update(grad_fn(manual), v_state, manual, grad_fn=grad_fn)
            updates, b_state = base_tx.update(g, b_state, manual)
            manual = optax.apply_updates(manual, updates)
        chex.assert_trees_all_close(params, manual, atol=1e-5)

    @parameterized.named_parameters(*MAIN)
    def test_inject_hyperparams(self, name):
        """No static_args needed; every numeric argument is a hyperparameter of the state."""
        factory, hyper, _ = VARIANTS[name]
        injected = optax.inject_hyperparams(factory)(**hyper, stable=True, stable_max_scale=2.0)
        plain = factory(**hyper, stable=True, stable_max_scale=2.0)
        params, state = train(optax.chain(injected, optax.sgd(0.1)))
        expected, _ = train(optax.chain(plain, optax.sgd(0.1)))
        chex.assert_trees_all_close(params, expected, atol=1e-6)
        for key, value in hyper.items():
            if not isinstance(value, bool):
                self.assertIn(key, state[0].hyperparams)
        # Setting rho to 0 in the state switches the ascent off.
        state[0].hyperparams["rho"] = jnp.asarray(0.0)
        batch = mlp_batch(jax.random.key(1))
        grad_fn = jax.grad(lambda q: mlp_loss(q, batch))
        tx = optax.chain(injected, optax.sgd(0.1))
        g = grad_fn(params)
        out, _ = jax.jit(functools.partial(tx.update, grad_fn=grad_fn))(g, state, params)
        # (LookSAM: step 4 is one of its SAM steps, k = 2.)
        chex.assert_trees_all_close(out, optax.tree.scale(-0.1, g), atol=1e-7)
        # A schedule of rho, too.
        train(
            optax.inject_hyperparams(factory)(**{**hyper, "rho": optax.linear_schedule(0, 0.1, 3)})
        )

    def test_inject_hyperparams_gsam_schedule(self):
        lr = optax.linear_schedule(0.0, 0.1, 4)
        rho = sam_optax.gsam_rho_schedule(lr, rho_max=0.1, rho_min=0.02, lr_max=0.1, lr_min=0.05)
        params, _ = train(optax.chain(sam_optax.gsam(rho), optax.sgd(lr)))
        chex.assert_tree_all_finite(params)

    @parameterized.named_parameters(*MAIN)
    def test_checkpoint_round_trip(self, name):
        import orbax.checkpoint as ocp

        tx = optax.chain(make(name), optax.sgd(0.1, momentum=0.9))
        params, state = train(tx, steps=3)
        abstract = jax.tree.map(
            ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": state}
        )
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "state")
            checkpointer = ocp.StandardCheckpointer()
            checkpointer.save(path, {"params": params, "opt_state": state})
            checkpointer.wait_until_finished()
            restored = checkpointer.restore(path, abstract)
        chex.assert_trees_all_equal(restored, {"params": params, "opt_state": state})
        self.assertIsInstance(restored["opt_state"][0], type(state[0]))
        # optax.tree_utils finds the buffers by name.
        field = VARIANTS[name][2]
        if field is not None:
            found = optax.tree_utils.tree_get(restored["opt_state"], field)
            chex.assert_trees_all_equal(found, getattr(state[0], field))


# --------------------------------------------------------------------------------------------
# StableSAM's official conventions.
# --------------------------------------------------------------------------------------------


def official_stable_sam(ws, grad, rho, *, adaptive, truncate=False):
    """The official StableSAM PyTorch optimizer (first_step, second_step, _grad_norm),
    transcribed over a list of float64 arrays."""
    g = grad(ws)
    grad_norm = norm_list(
        [(np.abs(w) if adaptive else 1.0) * gi for w, gi in zip(ws, g, strict=True)]
    )
    scale = rho / (grad_norm + 1e-12)
    perturbed = [w + (w**2 if adaptive else 1.0) * gi * scale for w, gi in zip(ws, g, strict=True)]
    g_p = grad(perturbed)
    # _grad_norm at the perturbed weights (p still holds w + e(w) in second_step).
    surrogate = norm_list(
        [(np.abs(w) if adaptive else 1.0) * gi for w, gi in zip(perturbed, g_p, strict=True)]
    )
    factor = grad_norm / (surrogate + 1e-12)
    if truncate:
        factor = min(1.0, factor)
    return [factor * x for x in g_p]


class StableConventionsTest(chex.TestCase):
    def setUp(self):
        super().setUp()
        self.params = mlp_params(jax.random.key(0))
        batch = mlp_batch(jax.random.key(1))
        self.grad_fn = jax.grad(lambda q: mlp_loss(q, batch))
        leaves, treedef = jax.tree.flatten(self.params)
        self.ws = [np.asarray(w, np.float64) for w in leaves]
        self.np_grad = numpy_grad_fn(self.grad_fn, treedef)

    def compare(self, tx, expected, atol=2e-6):
        out, _ = run_steps(tx, self.params, self.grad_fn, 1)
        for got, want in zip(jax.tree.leaves(out[0]), expected, strict=True):
            np.testing.assert_allclose(got, want, atol=atol, rtol=1e-4)

    @parameterized.product(adaptive=[False, True], truncate=[False, True])
    def test_against_official_code(self, adaptive, truncate):
        kwargs = dict(stable=True, stable_max_scale=1.0 if truncate else None)
        if adaptive:
            kwargs.update(adaptive=True, eta=0.0, stable_norm="adaptive")
        expected = official_stable_sam(
            self.ws, self.np_grad, 0.5, adaptive=adaptive, truncate=truncate
        )
        self.compare(sam_optax.sam(0.5, **kwargs), expected)

    def test_plain_norms_differ_from_adaptive(self):
        """With adaptive=True the default (plain) factor is not the official one."""
        a, _ = run_steps(sam_optax.asam(0.5, eta=0.0, stable=True), self.params, self.grad_fn, 1)
        b, _ = run_steps(
            sam_optax.asam(0.5, eta=0.0, stable=True, stable_norm="adaptive"),
            self.params,
            self.grad_fn,
            1,
        )
        self.assertGreater(float(optax.tree.norm(jax.tree.map(jnp.subtract, a[0], b[0]))), 1e-4)

    @parameterized.parameters(0.5, 1.0, 3.0)
    def test_max_scale(self, cap):
        """g_SAM * min(cap, ||g|| / ||g_SAM||) on the quadratic."""
        g = A @ W0
        g_p = g + 0.3 * A @ unit(g)
        expected = g_p * min(cap, np.linalg.norm(g) / np.linalg.norm(g_p))
        out, _ = run_steps(
            sam_optax.sam(0.3, stable=True, stable_max_scale=cap),
            jnp.asarray(W0, jnp.float32),
            quadratic_grad,
            1,
        )
        np.testing.assert_allclose(out[0], expected, rtol=1e-5)

    def test_max_scale_caps_an_upscaling(self):
        """Where ||g_SAM|| < ||g|| (a non-convex loss), the cap of 1 keeps the SAM gradient as
        is, while the uncapped factor scales it up to ||g||."""
        params = {"w": jnp.asarray([0.4, 0.1])}

        def grad_fn(p):  # L = -cos(3 w) / 3: ||g_SAM|| = 0.84 < ||g|| = 0.98 here
            return {"w": jnp.sin(3.0 * p["w"])}

        g = grad_fn(params)
        capped, _ = run_steps(
            sam_optax.sam(0.5, stable=True, stable_max_scale=1.0), params, grad_fn, 1
        )
        raw, _ = run_steps(sam_optax.sam(0.5), params, grad_fn, 1)
        uncapped, _ = run_steps(sam_optax.sam(0.5, stable=True), params, grad_fn, 1)
        self.assertLess(float(optax.tree.norm(raw[0])), float(optax.tree.norm(g)))
        chex.assert_trees_all_close(capped[0], raw[0], rtol=1e-6)
        np.testing.assert_allclose(optax.tree.norm(uncapped[0]), optax.tree.norm(g), rtol=1e-5)

    def test_variants_take_the_conventions(self):
        """GSAM with the official adaptive norms: the factor uses |w| and |w + eps|."""
        params = jnp.asarray(W0, jnp.float32)
        out, _ = run_steps(
            sam_optax.gsam(0.1, 0.3, stable=True, stable_norm="adaptive", stable_max_scale=5.0),
            params,
            quadratic_grad,
            1,
        )
        g = A @ W0
        eps = 0.1 * unit(g)
        raw = QuadraticClosedForm("gsam", dict(rho=0.1, alpha=0.3)).step(W0)
        factor = np.linalg.norm(np.abs(W0) * g) / np.linalg.norm(np.abs(W0 + eps) * raw)
        np.testing.assert_allclose(out[0], raw * min(5.0, factor), rtol=1e-5)


# --------------------------------------------------------------------------------------------
# The GSAM rho schedule and the argument checks.
# --------------------------------------------------------------------------------------------


class GSAMScheduleTest(chex.TestCase):
    def test_values(self):
        lr = optax.warmup_cosine_decay_schedule(0.0, 0.1, 10, 100, end_value=0.01)
        rho = sam_optax.gsam_rho_schedule(lr, rho_max=0.2, rho_min=0.05, lr_max=0.1, lr_min=0.01)
        for t in range(0, 101, 5):
            expected = 0.05 + 0.15 * (float(lr(t)) - 0.01) / 0.09
            self.assertAlmostEqual(float(rho(t)), max(0.05, expected), places=5)
        self.assertAlmostEqual(float(rho(0)), 0.05)  # the paper's formula gives -0.0167 here
        self.assertAlmostEqual(float(rho(10)), 0.2, places=5)  # the peak

    def test_constant(self):
        self.assertAlmostEqual(
            float(sam_optax.gsam_rho_schedule(0.1, 0.3, lr_max=0.1, lr_min=0.1)(7)), 0.3
        )

    @parameterized.named_parameters(
        ("rho_min_above_max", dict(rho_max=0.1, rho_min=0.2, lr_max=0.1), "rho_min <= rho_max"),
        ("negative_rho_min", dict(rho_max=0.1, rho_min=-0.1, lr_max=0.1), "0 <= rho_min"),
        ("lr_min_above_max", dict(rho_max=0.1, lr_max=0.1, lr_min=0.2), "lr_max >= lr_min"),
    )
    def test_bad_arguments(self, kwargs, message):
        with self.assertRaisesRegex(ValueError, message):
            sam_optax.gsam_rho_schedule(0.1, **kwargs)


class ArgumentTest(chex.TestCase):
    @parameterized.named_parameters(
        ("gsam_negative_alpha", sam_optax.gsam, dict(alpha=-0.1), ValueError, "alpha must be"),
        ("gsam_negative_rho", sam_optax.gsam, dict(rho=-0.1), ValueError, "rho must be"),
        ("looksam_k0", sam_optax.looksam, dict(k=0), ValueError, r"looksam\(rho=0.05, k=5\)"),
        ("looksam_float_k", sam_optax.looksam, dict(k=2.0), TypeError, "k must be an int"),
        ("looksam_bool_k", sam_optax.looksam, dict(k=True), TypeError, "k must be an int"),
        ("fsam_lmbda", sam_optax.friendly_sam, dict(lmbda=1.5), ValueError, r"lmbda must be in"),
        ("fsam_sigma", sam_optax.friendly_sam, dict(sigma=-1.0), ValueError, "sigma must be"),
        ("vasso_theta0", sam_optax.vasso, dict(theta=0.0), ValueError, "theta must be > 0"),
        ("vasso_theta2", sam_optax.vasso, dict(theta=2.0), ValueError, "theta must be in"),
        ("vasso_string", sam_optax.vasso, dict(theta="0.9"), TypeError, "theta must be a float"),
        ("sync_no_axis", sam_optax.vasso, dict(sync_ascent=True), ValueError, "axis_name"),
        ("cap_no_stable", sam_optax.gsam, dict(stable_max_scale=1.0), ValueError, "stable=True"),
        (
            "norm_no_stable",
            sam_optax.looksam,
            dict(stable_norm="adaptive"),
            ValueError,
            "stable=True",
        ),
        (
            "bad_norm",
            sam_optax.friendly_sam,
            dict(stable=True, stable_norm="l1"),
            ValueError,
            r"friendly_sam\(rho, stable=True, stable_norm='adaptive'\)",
        ),
        (
            "sam_bad_cap",
            sam_optax.sam,
            dict(stable=True, stable_max_scale=0.0),
            ValueError,
            "stable_max_scale",
        ),
        (
            "sam_norm_no_stable",
            sam_optax.sam,
            dict(stable_norm="adaptive"),
            ValueError,
            "stable=True",
        ),
    )
    def test_bad_arguments(self, factory, kwargs, error, message):
        with self.assertRaisesRegex(error, message):
            factory(**kwargs)

    def test_one_default_per_keyword_across_the_package(self):
        # rho and alpha (GSAM's and LookSAM's, two meanings) default to each paper's value, and
        # an alias's keyword is what the alias sets; every other keyword has one default.
        own = {"rho", "alpha"}
        alias = {("asam", "adaptive"), ("usam", "normalize"), ("stable_sam", "stable")}
        defaults = {}
        for name in sam_optax.__all__:
            factory = getattr(sam_optax, name)
            if not callable(factory) or isinstance(factory, type):
                continue
            for parameter in inspect.signature(factory).parameters.values():
                if parameter.default is inspect.Parameter.empty or parameter.name in own:
                    continue
                if (name, parameter.name) in alias:
                    continue
                seen = defaults.setdefault(parameter.name, (parameter.default, name))
                self.assertEqual(seen[0], parameter.default, (parameter.name, seen[1], name))

    @parameterized.parameters(
        "gsam", "looksam", "friendly_sam", "vasso", "ae_sam", "esam", "momentum_sam", "sparse_sam"
    )
    def test_signature_shows_the_shared_keywords(self, name):
        factory = getattr(sam_optax, name)
        parameters = inspect.signature(factory).parameters
        self.assertNotIn("shared", parameters)
        self.assertEqual(parameters["eta"].default, 0.01)
        self.assertEqual(parameters["eta"].kind, inspect.Parameter.KEYWORD_ONLY)
        self.assertIn("eta: the offset of ASAM's T", factory.__doc__)
        with self.assertRaisesRegex(TypeError, rf"^{name}\(\) got an unexpected .*'adaptve'"):
            factory(adaptve=True)

    @parameterized.named_parameters(*MAIN)
    def test_missing_grad_fn_and_params(self, name):
        tx = make(name)
        params = {"w": jnp.ones(3)}
        with self.assertRaisesRegex(TypeError, "grad_fn"):
            tx.update(params, tx.init(params), params)
        with self.assertRaisesRegex(ValueError, "params"):
            tx.update(params, tx.init(params), grad_fn=lambda p: p)

    def test_summed_gradient_is_refused(self):
        mesh = jax.make_mesh((8,), ("data",))
        P = jax.sharding.PartitionSpec
        tx = sam_optax.vasso(0.1, axis_name="data")
        params = {"w": jnp.ones(3)}

        def step(params, x):
            loss = lambda p: jnp.sum(p["w"] * x[0])  # noqa: E731
            return tx.update(
                jax.grad(loss)(params), tx.init(params), params, grad_fn=jax.grad(loss)
            )[0]

        x = jax.device_put(jnp.ones((8, 3)), jax.sharding.NamedSharding(mesh, P("data")))
        with self.assertRaisesRegex(ValueError, "per_device"):
            jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))(
                params, x
            )


if __name__ == "__main__":
    import absl.testing.absltest

    absl.testing.absltest.main()
