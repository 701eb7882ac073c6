"""SAM on some steps only: periodic and randomized (RST) rho schedules, and their exact count of
second passes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from mlp_problem import mlp_batch, mlp_loss, mlp_params

import sam_optax


def run(tx, steps, *, calls=None):
    """`steps` jitted updates on the MLP problem: the list of outputs; grad_fn calls counted."""
    batch = mlp_batch(jax.random.key(1))
    loss_grad = jax.grad(lambda q: mlp_loss(q, batch))

    def grad_fn(p):
        if calls is not None:
            jax.debug.callback(lambda: calls.append(1))
        return loss_grad(p)

    params = mlp_params(jax.random.key(0))
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(loss_grad(p), s, p, grad_fn=grad_fn))
    outputs = []
    for _ in range(steps):
        out, state = step(params, state)
        jax.block_until_ready(out)
        params = optax.apply_updates(params, jax.tree.map(lambda u: -0.1 * u, out))
        outputs.append(out)
    return outputs


class PeriodicTest(chex.TestCase):
    @parameterized.parameters((1, 0), (3, 0), (4, 2))
    def test_values_are_the_closed_form(self, every, offset):
        rho = sam_optax.periodic_rho_schedule(0.05, every=every, offset=offset)
        expected = [0.05 if t >= offset and (t - offset) % every == 0 else 0.0 for t in range(12)]
        np.testing.assert_allclose([float(rho(jnp.int32(t))) for t in range(12)], expected)

    def test_every_one_is_sam(self):
        ours = run(sam_optax.sam(sam_optax.periodic_rho_schedule(0.05, every=1), stable=True), 4)
        reference = run(sam_optax.sam(0.05, stable=True), 4)
        chex.assert_trees_all_close(ours, reference, rtol=1e-6)

    def test_skipped_steps_are_the_plain_gradient_and_skip_the_pass(self):
        """Steps 0, 3, 6 ascend and equal SAM's step from the same weights; the others return
        the incoming gradient and never call grad_fn."""
        calls = []
        rho = sam_optax.periodic_rho_schedule(0.05, every=3)
        outputs = run(sam_optax.sam(rho), 7, calls=calls)
        self.assertEqual(len(calls), sam_optax.ascent_steps(rho, 7))
        self.assertEqual(len(calls), 3)
        batch = mlp_batch(jax.random.key(1))
        params = mlp_params(jax.random.key(0))
        for t, out in enumerate(outputs):
            g = jax.grad(lambda q: mlp_loss(q, batch))(params)
            if t % 3 == 0:
                expected, _ = sam_optax.sam(0.05).update(
                    g, sam_optax.sam(0.05).init(params), params,
                    grad_fn=jax.grad(lambda q: mlp_loss(q, batch)),
                )  # fmt: skip
            else:
                expected = g
            chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-7)
            params = optax.apply_updates(params, jax.tree.map(lambda u: -0.1 * u, out))

    @parameterized.parameters(0, -1, 1.5, True)
    def test_bad_every(self, every):
        with pytest.raises(ValueError, match="every must be an integer >= 1"):
            sam_optax.periodic_rho_schedule(0.05, every=every)

    def test_bad_offset(self):
        with pytest.raises(ValueError, match="offset must be an integer >= 0"):
            sam_optax.periodic_rho_schedule(0.05, every=2, offset=-1)


class RandomizedTest(chex.TestCase):
    def test_draws_are_numpy_transcription(self):
        """rho_t = rho [u_t < p], u_t the uniform of fold_in(key(seed), t): the same on any
        backend and after a resume (a function of the step alone)."""
        rho = sam_optax.randomized_rho_schedule(0.1, probability=0.3, seed=7)
        key = jax.random.key(7)
        draws = np.array([float(jax.random.uniform(jax.random.fold_in(key, t))) for t in range(50)])
        values = np.array([float(rho(jnp.int32(t))) for t in range(50)])
        np.testing.assert_allclose(values, np.where(draws < 0.3, 0.1, 0.0), rtol=1e-6)

    def test_frequency_is_the_probability(self):
        rho = sam_optax.randomized_rho_schedule(0.05, probability=0.2, seed=0)
        share = sam_optax.ascent_steps(rho, 20_000) / 20_000
        self.assertAlmostEqual(share, 0.2, delta=0.01)

    def test_probability_one_is_sam_and_zero_the_plain_gradient(self):
        always = sam_optax.randomized_rho_schedule(0.05, probability=1.0)
        chex.assert_trees_all_close(
            run(sam_optax.sam(always, stable=True), 3), run(sam_optax.sam(0.05, stable=True), 3),
            rtol=1e-6,
        )  # fmt: skip
        calls = []
        never = sam_optax.sam(sam_optax.randomized_rho_schedule(0.05, probability=0.0))
        outputs = run(never, 3, calls=calls)
        self.assertEqual(calls, [])
        sgd_like = run(optax.with_extra_args_support(optax.identity()), 3)
        chex.assert_trees_all_close(outputs, sgd_like)

    def test_grad_fn_calls_equal_the_count(self):
        calls = []
        rho = sam_optax.randomized_rho_schedule(0.05, probability=0.5, seed=3)
        run(sam_optax.sam(rho), 12, calls=calls)
        self.assertEqual(len(calls), sam_optax.ascent_steps(rho, 12))

    def test_scheduled_probability(self):
        """A rising probability (the paper's scheduling functions): no ascent while p is 0."""
        p = optax.join_schedules([optax.constant_schedule(0.0), optax.constant_schedule(1.0)], [5])
        rho = sam_optax.randomized_rho_schedule(0.05, probability=p)
        self.assertEqual(sam_optax.ascent_steps(rho, 8), 3)

    def test_composes_with_variants_and_inject_hyperparams(self):
        rho = sam_optax.randomized_rho_schedule(0.05, probability=0.5, seed=1)
        for tx in (
            sam_optax.gsam(rho, alpha=0.1),
            sam_optax.friendly_sam(rho),
            optax.inject_hyperparams(sam_optax.sam)(rho=rho, stable=True),
        ):
            outputs = run(tx, 3)
            chex.assert_tree_all_finite(outputs)

    @parameterized.parameters(-0.1, 1.5)
    def test_bad_probability(self, probability):
        with pytest.raises(ValueError, match=r"probability must lie in \[0, 1\]"):
            sam_optax.randomized_rho_schedule(0.05, probability=probability)


class AscentStepsTest(chex.TestCase):
    def test_constant_rho(self):
        self.assertEqual(sam_optax.ascent_steps(0.05, 10), 10)
        self.assertEqual(sam_optax.ascent_steps(0.0, 10), 0)

    def test_late_phase(self):
        """SAM for the last 25 of 100 steps (Zhou et al.): 25 second passes."""
        rho = optax.join_schedules(
            [optax.constant_schedule(0.0), optax.constant_schedule(0.05)], [75]
        )
        self.assertEqual(sam_optax.ascent_steps(rho, 100), 25)

    @parameterized.parameters(-1, 2.0)
    def test_bad_num_steps(self, num_steps):
        with pytest.raises(ValueError, match="num_steps must be an integer >= 0"):
            sam_optax.ascent_steps(0.05, num_steps)
