"""Tests of sam_optax.sharpness against dense Hessians of small problems."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from sam_optax import sharpness


def _quadratic(eigenvalues, seed=0, linear=None):
    """0.5 x^T A x (+ b^T x) with A = Q diag(eigenvalues) Q^T, over a two-leaf pytree."""
    n = len(eigenvalues)
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    a = jnp.asarray(q @ np.diag(eigenvalues) @ q.T, jnp.float32)
    b = jnp.zeros(n) if linear is None else jnp.asarray(linear, jnp.float32)
    params = {"w": jnp.ones((2, 3)), "v": jnp.linspace(-1.0, 1.0, n - 6)}

    def loss_fn(p):
        x, _ = ravel_pytree(p)
        return 0.5 * x @ a @ x + b @ x

    return loss_fn, params, a


class _MLP:
    """A tiny tanh MLP regression (32 parameters) and its dense Hessian, built once per module so
    that the tests share compiled functions (the measures cache their jit on loss_fn)."""

    def __init__(self):
        k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(0), 5)
        self.params = {
            "hidden": {"kernel": jax.random.normal(k1, (3, 5)), "bias": 0.1 * jnp.ones(5)},
            "out": {"kernel": jax.random.normal(k2, (5, 2)), "bias": jnp.zeros(2)},
        }
        self.data = (
            jax.random.normal(k3, (16, 3)),
            jax.random.normal(k4, (16, 2)) + jax.random.normal(k5, (1, 2)),
        )
        self.loss_fn = lambda p: self.batch_loss(p, self.data)
        flat, unravel = ravel_pytree(self.params)
        hessian = jax.jit(jax.hessian(lambda x: self.loss_fn(unravel(x))))(flat)
        self.hessian = np.asarray(hessian, np.float64)
        self.eigenvalues = np.linalg.eigvalsh(self.hessian)[::-1]

    @staticmethod
    def batch_loss(p, batch):
        inputs, targets = batch
        h = jnp.tanh(inputs @ p["hidden"]["kernel"] + p["hidden"]["bias"])
        return jnp.mean((h @ p["out"]["kernel"] + p["out"]["bias"] - targets) ** 2)


@pytest.fixture(scope="module")
def mlp():
    return _MLP()


def test_lanczos_recovers_a_known_spectrum_exactly():
    spectrum = np.array([9.0, 4.0, 3.5, 2.0, 1.0, 0.5, 0.1, -0.3, -1.0, -2.0, 0.0, 0.2])
    loss_fn, params, _ = _quadratic(spectrum)
    top = sharpness.top_hessian_eigenvalues(loss_fn, params, k=4, key=jax.random.key(1))
    assert top.shape == (4,) and top.dtype == jnp.float32
    np.testing.assert_allclose(top, [9.0, 4.0, 3.5, 2.0], rtol=1e-5, atol=1e-5)


def test_lanczos_survives_repeated_eigenvalues():
    # Only two distinct eigenvalues: Lanczos breaks down after two steps and must restart.
    spectrum = np.array([5.0, 5.0, 5.0] + [1.0] * 9)
    loss_fn, params, _ = _quadratic(spectrum, seed=3)
    top = sharpness.top_hessian_eigenvalues(loss_fn, params, k=4, key=jax.random.key(0))
    assert np.all(np.isfinite(top))
    np.testing.assert_allclose(top, [5.0, 5.0, 5.0, 1.0], rtol=1e-5)


def test_power_iteration_matches_dense():
    spectrum = np.concatenate([[30.0, 12.0], np.linspace(-1.0, 1.0, 10)])
    loss_fn, params, _ = _quadratic(spectrum)
    top = sharpness.top_hessian_eigenvalues(
        loss_fn, params, k=2, key=jax.random.key(0), num_iters=60, method="power"
    )
    np.testing.assert_allclose(top, [30.0, 12.0], rtol=1e-4)


@pytest.mark.parametrize("num_iters", [32, 16])
def test_mlp_top_eigenvalues_match_dense_hessian(mlp, num_iters):
    top = sharpness.top_hessian_eigenvalues(
        mlp.loss_fn, mlp.params, k=2, key=jax.random.key(0), num_iters=num_iters
    )
    np.testing.assert_allclose(top, mlp.eigenvalues[:2], rtol=1e-3, atol=1e-4)


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    diagonal = jnp.array([3.0, -1.0, 0.5, 2.0, 7.0])
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    loss_fn = lambda p: 0.5 * jnp.sum(diagonal * ravel_pytree(p)[0] ** 2)
    trace = sharpness.hessian_trace(loss_fn, params, key=jax.random.key(0), num_samples=3)
    np.testing.assert_allclose(trace, 11.5, rtol=1e-6)


def test_hutchinson_matches_dense_trace_within_its_standard_error(mlp):
    num_samples = 400
    # Rademacher probes: Var[v^T H v] = 2 (||H||_F^2 - sum_i H_ii^2).
    off_diagonal = np.sum(mlp.hessian**2) - np.sum(np.diag(mlp.hessian) ** 2)
    std_error = np.sqrt(2 * off_diagonal / num_samples)
    trace = sharpness.hessian_trace(
        mlp.loss_fn, mlp.params, key=jax.random.key(0), num_samples=num_samples
    )
    assert abs(float(trace) - np.trace(mlp.hessian)) < 4 * std_error


def _sam_gap_by_hand(a, b, w, eps):
    loss = lambda x: 0.5 * x @ a @ x + b @ x
    return loss(w + eps) - loss(w)


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(normalize=False), dict(adaptive=True, eta=0.01, rho=0.5)],
    ids=["sam", "usam", "asam"],
)
def test_sam_sharpness_matches_the_hand_formula_on_a_quadratic(kwargs):
    spectrum = np.linspace(0.5, 4.0, 12)
    linear = np.random.default_rng(1).normal(size=12)
    loss_fn, params, a = _quadratic(spectrum, linear=linear)
    a, b = np.asarray(a, np.float64), np.asarray(linear, np.float64)
    w = np.asarray(ravel_pytree(params)[0], np.float64)
    g = a @ w + b
    rho = kwargs.pop("rho", 0.05)
    if kwargs.get("adaptive"):
        t = np.abs(w) + kwargs["eta"]
        eps = rho * t**2 * g / np.linalg.norm(t * g)
    elif kwargs.get("normalize") is False:
        eps = rho * g
    else:
        eps = rho * g / np.linalg.norm(g)
    # With eps = rho g / ||g||: L(w + eps) - L(w) = rho ||g|| + rho^2 g^T A g / (2 ||g||^2).
    expected = _sam_gap_by_hand(a, b, w, eps)
    got = sharpness.sam_sharpness(loss_fn, params, rho=rho, **kwargs)
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_sam_sharpness_rejects_a_schedule():
    loss_fn, params, _ = _quadratic(np.linspace(1.0, 2.0, 8))
    with pytest.raises(TypeError, match="number for rho"):
        sharpness.sam_sharpness(loss_fn, params, rho=optax.constant_schedule(0.05))


def test_dataset_loss_fn_is_the_example_mean_and_feeds_the_measures(mlp):
    chunks, rest = sharpness.chunk_dataset(mlp.data, chunk_size=5)  # 3 chunks + 1 leftover
    assert chunks[0].shape == (3, 5, 3) and rest[0].shape == (1, 3)
    chunked = sharpness.dataset_loss_fn(mlp.batch_loss, chunks, remainder=rest)
    value_and_grad = jax.jit(jax.value_and_grad(chunked))
    loss, grads = value_and_grad(mlp.params)
    np.testing.assert_allclose(loss, mlp.loss_fn(mlp.params), rtol=1e-6)
    expected_grads = jax.grad(mlp.loss_fn)(mlp.params)
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), grads, expected_grads
    )
    top = sharpness.top_hessian_eigenvalues(
        chunked, mlp.params, k=2, key=jax.random.key(0), num_iters=32
    )
    np.testing.assert_allclose(top, mlp.eigenvalues[:2], rtol=1e-3, atol=1e-4)


def test_measures_trace_under_jit_and_accept_bfloat16_params(mlp):
    @jax.jit
    def measure(p, key):
        return (
            sharpness.top_hessian_eigenvalues(mlp.loss_fn, p, k=1, key=key, num_iters=32),
            sharpness.hessian_trace(mlp.loss_fn, p, key=key, num_samples=4),
            sharpness.sam_sharpness(mlp.loss_fn, p, rho=0.05),
        )

    top, trace, gap = measure(mlp.params, jax.random.key(0))
    np.testing.assert_allclose(top, mlp.eigenvalues[:1], rtol=1e-3)
    assert trace.dtype == gap.dtype == jnp.float32 and np.isfinite(trace) and gap > 0
    low = jax.tree.map(lambda p: p.astype(jnp.bfloat16), mlp.params)
    low_top = sharpness.top_hessian_eigenvalues(mlp.loss_fn, low, key=jax.random.key(0))
    assert low_top.dtype == jnp.float32
    np.testing.assert_allclose(low_top, mlp.eigenvalues[:1], rtol=0.1)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda f, p: sharpness.top_hessian_eigenvalues(f, p, k=0, key=jax.random.key(0)),
            ValueError,
            "k must be",
        ),
        (
            lambda f, p: sharpness.top_hessian_eigenvalues(
                f, p, k=3, key=jax.random.key(0), num_iters=2
            ),
            ValueError,
            "num_iters >= k",
        ),
        (lambda f, p: sharpness.top_hessian_eigenvalues(f, p, key=None), ValueError, "PRNG key"),
        (
            lambda f, p: sharpness.top_hessian_eigenvalues(
                f, p, k=99, key=jax.random.key(0), num_iters=99
            ),
            ValueError,
            "larger than",
        ),
        (
            lambda f, p: sharpness.top_hessian_eigenvalues(
                f, p, key=jax.random.key(0), method="arnoldi"
            ),
            ValueError,
            "method",
        ),
        (
            lambda f, p: sharpness.hessian_trace(f, p, key=jax.random.key(0), num_samples=0),
            ValueError,
            "num_samples",
        ),
        (lambda f, p: sharpness.hessian_trace(f, p, key=None), ValueError, "PRNG key"),
        (
            lambda f, p: sharpness.top_hessian_eigenvalues(f, {}, key=jax.random.key(0)),
            ValueError,
            "empty",
        ),
        (lambda f, p: sharpness.chunk_dataset(jnp.ones(4), chunk_size=5), ValueError, "larger"),
        (lambda f, p: sharpness.chunk_dataset((jnp.ones(4), jnp.ones(3)), 2), ValueError, "same"),
        (lambda f, p: sharpness.dataset_loss_fn(f, jnp.ones(4)), ValueError, "chunk_dataset"),
        (
            lambda f, p: sharpness.dataset_loss_fn(f, jnp.ones((2, 3)), remainder=jnp.ones(3)),
            ValueError,
            "remainder",
        ),
    ],
)
def test_bad_arguments_raise_clear_errors(call, error, match):
    loss_fn, params, _ = _quadratic(np.linspace(1.0, 2.0, 8))
    with pytest.raises(error, match=match):
        call(loss_fn, params)


def test_unhashable_loss_callables_work():
    import dataclasses

    @dataclasses.dataclass  # eq=True makes instances unhashable
    class Loss:
        scale: float

        def __call__(self, p):
            return self.scale * jnp.sum(ravel_pytree(p)[0] ** 2)

    params = {"a": jnp.ones(3)}
    top = sharpness.top_hessian_eigenvalues(Loss(1.5), params, k=1, key=jax.random.key(0))
    np.testing.assert_allclose(top, [3.0], rtol=1e-5)
