"""sam_optax in Flax training code (NNX, linen) and its import footprint."""

import os
import subprocess
import sys
import textwrap

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.training import train_state

import sam_optax

RHO, LR, MOMENTUM, STEPS = 0.05, 0.1, 0.9, 3


def data(seed=0, n=8):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (n, 6, 6, 1)), jax.random.randint(ky, (n,), 0, 3)


def cross_entropy(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def reference_step(loss_and_aux, params, momentum, *args):
    """One StableSAM + SGD-momentum step written out: eps = rho g / ||g||, both passes from the
    same state (args), the first pass's aux (new statistics) kept."""
    (loss, aux), g = jax.value_and_grad(loss_and_aux, has_aux=True)(params, *args)
    norm = optax.tree.norm(g)
    perturbed = jax.tree.map(lambda w, d: w + RHO * d / norm, params, g)
    g_sam = jax.grad(loss_and_aux, has_aux=True)(perturbed, *args)[0]
    g_sam = jax.tree.map(lambda x: x * norm / optax.tree.norm(g_sam), g_sam)
    momentum = jax.tree.map(lambda m, x: MOMENTUM * m + x, momentum, g_sam)
    params = jax.tree.map(lambda w, m: w - LR * m, params, momentum)
    return params, momentum, loss, aux


def make_tx():
    return optax.chain(sam_optax.sam(RHO, stable=True), optax.sgd(LR, momentum=MOMENTUM))


class CNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.dropout = nnx.Dropout(0.3, rngs=rngs)
        self.linear = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        return self.linear(self.dropout(x.mean(axis=(1, 2))))


def comparable(tree):
    """PRNG key arrays as their raw data, for chex comparisons."""
    return jax.tree.map(
        lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
        tree,
    )


def nnx_loss(model, x, y):
    return cross_entropy(model(x), y)


class NNXTest(chex.TestCase):
    def test_cnn_with_batchnorm_and_dropout_matches_the_hand_written_steps(self):
        model = CNN(nnx.Rngs(params=0, dropout=1))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        params, rest = nnx.as_pure(params), nnx.as_pure(rest)

        optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)

        @nnx.jit
        def train_step(model, optimizer, x, y):
            grad_fn = sam_optax.nnx.grad_fn(nnx_loss, model, x, y)
            loss, grads = nnx.value_and_grad(nnx_loss)(model, x, y)
            optimizer.update(model, grads, grad_fn=grad_fn)
            return loss

        def loss_and_state(p, rest, x, y):
            copy = nnx.merge(graphdef, p, rest)
            loss = nnx_loss(copy, x, y)
            return loss, nnx.as_pure(nnx.split(copy, nnx.Param, ...)[2])

        @jax.jit
        def hand_step(params, rest, momentum, x, y):
            params, momentum, loss, rest = reference_step(
                loss_and_state, params, momentum, rest, x, y
            )
            return params, rest, momentum, loss

        momentum = jax.tree.map(jnp.zeros_like, params)
        losses = []
        for step in range(STEPS):
            x, y = data(step)
            losses.append(float(train_step(model, optimizer, x, y)))
            params, rest, momentum, hand_loss = hand_step(params, rest, momentum, x, y)
            np.testing.assert_allclose(losses[-1], hand_loss, rtol=1e-6)

        chex.assert_trees_all_close(
            nnx.as_pure(nnx.state(model, nnx.Param)), params, atol=1e-6, rtol=1e-5
        )
        # BatchNorm statistics from the first passes only; RNG streams advanced once per step.
        chex.assert_trees_all_close(
            comparable(nnx.as_pure(nnx.split(model, nnx.Param, ...)[2])),
            comparable(rest),
            atol=1e-6,
            rtol=1e-5,
        )
        self.assertEqual(int(model.dropout.rngs.count[...]), STEPS)
        self.assertFalse(np.allclose(model.bn.mean[...], 0.0))

    def test_grad_fn_is_pure(self):
        model = CNN(nnx.Rngs(params=0, dropout=1))
        x, y = data()
        params = nnx.as_pure(nnx.state(model, nnx.Param))
        grads = sam_optax.nnx.grad_fn(nnx_loss, model, x, y)(params)
        chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)
        self.assertEqual(jax.tree.structure(grads), jax.tree.structure(params))
        # The model itself is untouched by grad_fn.
        self.assertEqual(int(model.dropout.rngs.count[...]), 0)
        np.testing.assert_array_equal(model.bn.mean[...], 0.0)

    def test_accumulation_with_nnx(self):
        """accumulate_grad_fn over sam_optax.nnx.grad_fn = the whole batch's gradient (no
        Dropout/BatchNorm difference: the model is in eval mode)."""
        model = CNN(nnx.Rngs(params=0, dropout=1))
        model.eval()
        x, y = data(n=8)
        params = nnx.as_pure(nnx.state(model, nnx.Param))
        micro_batches = (x.reshape(4, 2, *x.shape[1:]), y.reshape(4, 2))
        per_batch = sam_optax.nnx.grad_fn(lambda m, batch: nnx_loss(m, *batch), model)
        grad_fn = sam_optax.accumulate_grad_fn(per_batch, micro_batches)
        whole = sam_optax.nnx.grad_fn(nnx_loss, model, x, y)
        chex.assert_trees_all_close(grad_fn(params), whole(params), atol=1e-6)

    def test_a_grad_fn_returning_variables_is_explained(self):
        model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(
            model, optax.chain(sam_optax.sam(), optax.sgd(0.1)), wrt=nnx.Param
        )
        x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))

        def loss(model):
            return jnp.mean((model(x) - y) ** 2)

        grads = nnx.grad(loss)(model)
        with self.assertRaisesRegex(TypeError, r"grad_fn.*sam_optax.nnx.grad_fn"):
            optimizer.update(model, grads, grad_fn=lambda p: nnx.grad(loss)(model))

    def test_a_loss_with_aux_needs_has_aux(self):
        model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
        x, y = jnp.ones((4, 2)), jnp.zeros(4, jnp.int32)

        def loss_and_logits(model, x, y):
            logits = model(x)
            return cross_entropy(logits, y), logits

        params = nnx.as_pure(nnx.state(model, nnx.Param))
        fix = r"^sam_optax.nnx.grad_fn: loss_fn returned a tuple of 2 .* pass has_aux=True[^\n]*$"
        with self.assertRaisesRegex(TypeError, fix):
            sam_optax.nnx.grad_fn(loss_and_logits, model, x, y)(params)
        grads = sam_optax.nnx.grad_fn(loss_and_logits, model, x, y, has_aux=True)(params)
        chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.Dropout(0.3, deterministic=not train)(x.mean(axis=(1, 2)))
        return nn.Dense(3)(x)


class BatchStatsState(sam_optax.linen.TrainState):
    batch_stats: dict


class LinenTest(chex.TestCase):
    def test_train_state_with_batchnorm_and_dropout(self):
        model = Net()
        variables = model.init(jax.random.key(0), data()[0], train=False)
        state = BatchStatsState.create(
            apply_fn=model.apply,
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            tx=make_tx(),
        )

        def loss_fn(params, batch_stats, x, y, key):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": key},
            )
            return cross_entropy(logits, y), updates["batch_stats"]

        @jax.jit
        def train_step(state, x, y, key):
            (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params, state.batch_stats, x, y, key
            )
            grad_fn = sam_optax.linen.grad_fn(loss_fn, state.batch_stats, x, y, key, has_aux=True)
            return state.apply_gradients(grads=grads, grad_fn=grad_fn, batch_stats=new_stats), loss

        params, stats = variables["params"], variables["batch_stats"]
        momentum = jax.tree.map(jnp.zeros_like, params)
        for step in range(STEPS):
            x, y = data(step)
            key = jax.random.key(100 + step)
            state, loss = train_step(state, x, y, key)
            params, momentum, hand_loss, stats = jax.jit(reference_step, static_argnums=0)(
                loss_fn, params, momentum, stats, x, y, key
            )
            np.testing.assert_allclose(loss, hand_loss, rtol=1e-6)
        self.assertEqual(int(state.step), STEPS)
        chex.assert_trees_all_close(state.params, params, atol=1e-6, rtol=1e-5)
        chex.assert_trees_all_close(state.batch_stats, stats, atol=1e-6, rtol=1e-5)

    def test_extra_keywords_reach_tx_update_and_fields_are_replaced(self):
        seen = {}

        def update_fn(updates, state, params=None, **extra_args):
            seen.update(extra_args)
            return updates, state

        tx = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update_fn)
        state = BatchStatsState.create(
            apply_fn=None, params={"w": jnp.ones(2)}, batch_stats={"m": 0}, tx=tx
        )
        state = state.apply_gradients(
            grads={"w": jnp.ones(2)}, grad_fn="f", micro_batches="b", batch_stats={"m": 1}
        )
        self.assertEqual(seen, {"grad_fn": "f", "micro_batches": "b"})
        self.assertEqual(state.batch_stats, {"m": 1})
        np.testing.assert_array_equal(state.params["w"], 2.0)  # w + the passed-through g

    def test_a_loss_with_aux_needs_has_aux(self):
        params = {"w": jnp.ones((2, 3))}
        x = jnp.ones((4, 2))

        def loss_and_logits(params, x):
            logits = x @ params["w"]
            return jnp.mean(logits**2), logits

        fix = r"^sam_optax.linen.grad_fn: loss_fn returned a tuple of 2 .* has_aux=True[^\n]*$"
        with self.assertRaisesRegex(TypeError, fix):
            sam_optax.linen.grad_fn(loss_and_logits, x)(params)
        grads = sam_optax.linen.grad_fn(loss_and_logits, x, has_aux=True)(params)
        chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)

    def test_flax_train_state_does_not_forward(self):
        """Why the subclass exists: Flax's own TrainState takes grad_fn for a field."""
        state = train_state.TrainState.create(
            apply_fn=None, params={"w": jnp.ones(2)}, tx=sam_optax.sam()
        )
        with self.assertRaises((TypeError, ValueError)):
            state.apply_gradients(grads={"w": jnp.ones(2)}, grad_fn=lambda p: p)
        state = sam_optax.linen.TrainState.create(
            apply_fn=None, params={"w": jnp.ones(2)}, tx=sam_optax.sam()
        )
        state.apply_gradients(grads={"w": jnp.ones(2)}, grad_fn=lambda p: p)


def test_import_needs_only_jax_and_optax():
    """`import sam_optax` imports neither chex nor flax beyond what optax needs; the Flax helpers
    load lazily."""
    code = textwrap.dedent(
        """
        import sys
        import jax, jax.numpy as jnp, optax
        # Any further `import chex` (unless optax itself needs it) or `import flax` now fails.
        for name in ("chex", "flax"):
            sys.modules.setdefault(name, None)
        import sam_optax
        tx = sam_optax.sam(0.1, stable=True)
        params = {"w": jnp.ones(3)}
        out, _ = tx.update(params, tx.init(params), params, grad_fn=lambda p: p)
        try:
            sam_optax.nnx
        except ImportError:
            pass
        else:
            raise AssertionError("sam_optax.nnx imported without flax")
        print("ok")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
    assert sam_optax.nnx.grad_fn and sam_optax.linen.TrainState  # loaded on first access


def test_the_flax_helpers_without_flax_name_the_install():
    """`import sam_optax.nnx` (or linen) without Flax: an ImportError (a ModuleNotFoundError, as
    Python's own) whose message is the install command."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["flax"] = None  # Flax is not installed.
        import sam_optax
        for module in ("nnx", "linen"):
            try:
                __import__(f"sam_optax.{module}")
            except ModuleNotFoundError as error:
                assert isinstance(error, ImportError) and error.name.startswith("flax"), error
                print(f"{type(error).__name__}: {error}")
            else:
                raise AssertionError(f"sam_optax.{module} imported without flax")
        try:
            sam_optax.nnx
        except ImportError as error:
            print(f"attribute: {error}")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout
    for line, module in zip(lines, ("nnx", "linen", "nnx"), strict=True):
        assert f"sam_optax.{module} needs Flax" in line, line
        assert 'pip install flax (or pip install "sam-optax[experiments]")' in line, line
