"""The default chain-order check: a descent transformation in front of sam (or any variant) is
refused outside jit and warned about under jit, from the perturbed gradient the ascent computes
anyway; legitimate use never trips it."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from mlp_problem import mlp_batch, mlp_loss, mlp_params

import sam_optax
from sam_optax import _composition

# Every factory, with its required arguments; keywords given to `make` override them.
FACTORIES = {
    "sam": (sam_optax.sam, dict(rho=0.05)),
    "stable_sam": (sam_optax.stable_sam, dict(rho=0.05)),
    "asam": (sam_optax.asam, dict(rho=0.5)),
    "usam": (sam_optax.usam, dict(rho=0.05)),
    "gsam": (sam_optax.gsam, dict(rho=0.05, alpha=0.3)),
    "looksam": (sam_optax.looksam, dict(rho=0.05, k=2)),
    "friendly_sam": (sam_optax.friendly_sam, dict(rho=0.05)),
    "vasso": (sam_optax.vasso, dict(rho=0.05)),
    "ae_sam": (sam_optax.ae_sam, dict(rho=0.05, num_steps=100)),
    "esam": (sam_optax.esam, dict(rho=0.05, beta=0.6)),
    "momentum_sam": (sam_optax.momentum_sam, dict(rho=0.3)),
    "sparse_sam": (sam_optax.sparse_sam, dict(rho=0.05, sparsity=0.5)),
}
# momentum_sam evaluates its one gradient at w - rho n(v), a step down: where that step overshoots
# a minimum, its gradient opposes the incoming one exactly as a descent step in front makes it,
# so it is not checked (its docstring says why).
CHECKED = [name for name in FACTORIES if name != "momentum_sam"]
DESCENT = {
    "adamw": lambda: optax.adamw(1e-3),
    "sgd": lambda: optax.sgd(0.1),
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
}
FIX = r"optax.chain\(sam_optax.{name}\(...\), optax.adamw\(...\)\)"
# The shortcuts of sam speak as sam.
CALLS = {"stable_sam": "sam", "asam": "sam", "usam": "sam"}

PARAMS = mlp_params(jax.random.key(0))
BATCH = mlp_batch(jax.random.key(1))


def make(name, **kwargs):
    factory, defaults = FACTORIES[name]
    return factory(**{**defaults, **kwargs})


def grad_fn(params, batch=BATCH):
    return jax.grad(mlp_loss)(params, batch)


def first_step(tx, params=PARAMS, fn=grad_fn):
    return tx.update(fn(params), tx.init(params), params, grad_fn=fn)


# --------------------------------------------------------------------------------------------
# A descent transformation in front: raised outside jit, warned under jit.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", DESCENT)
@pytest.mark.parametrize("name", CHECKED)
def test_descent_in_front_raises_with_the_fix(name, base):
    with pytest.raises(ValueError, match=FIX.format(name=CALLS.get(name, name))):
        first_step(optax.chain(DESCENT[base](), make(name)))


@pytest.mark.parametrize("name", CHECKED)
def test_descent_in_front_warns_under_jit(name):
    tx = optax.chain(optax.adamw(1e-3), make(name))
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))
    with pytest.warns(UserWarning, match=FIX.format(name=CALLS.get(name, name))):
        jax.block_until_ready(step(grad_fn(PARAMS), tx.init(PARAMS), PARAMS))
        jax.effects_barrier()


def test_only_the_first_step_is_checked_under_jit():
    tx = sam_optax.sam(0.05)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))
    descent = jax.tree.map(lambda g: -0.1 * g, grad_fn(PARAMS))
    later = sam_optax.SAMState(count=jnp.ones([], jnp.int32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.block_until_ready(step(descent, later, PARAMS))
        jax.effects_barrier()


def test_a_traced_rho_is_checked_outside_jit_too():
    # inject_hyperparams makes rho an array: the ascent runs in a lax.cond, the check with it.
    tx = optax.chain(optax.sgd(0.1), optax.inject_hyperparams(sam_optax.sam)(rho=0.05))
    with pytest.raises(ValueError, match=FIX.format(name="sam")):
        first_step(tx)


def test_a_rho_schedule_is_checked_where_it_turns_on():
    # "SGD first, SAM late": no perturbed gradient while rho is 0, the check at the first ascent.
    tx = optax.chain(optax.sgd(0.1), sam_optax.sam(lambda count: jnp.where(count < 2, 0.0, 0.05)))
    state = tx.init(PARAMS)
    for _ in range(2):
        _, state = tx.update(grad_fn(PARAMS), state, PARAMS, grad_fn=grad_fn)
    with pytest.raises(ValueError, match=FIX.format(name="sam")):
        tx.update(grad_fn(PARAMS), state, PARAMS, grad_fn=grad_fn)


def test_descent_in_front_under_shard_map_warns():
    mesh = jax.make_mesh((4,), ("data",))
    P = jax.sharding.PartitionSpec
    tx = optax.chain(optax.adamw(1e-3), sam_optax.sam(0.05, axis_name="data"))
    batches = jax.device_put(mlp_batch(jax.random.key(2), n=64), jax.NamedSharding(mesh, P("data")))

    def device_step(params, batch):
        fn = jax.grad(lambda q: mlp_loss(q, batch))
        grads = fn(sam_optax.per_device(params, "data"))
        out, _ = tx.update(grads, tx.init(params), params, grad_fn=fn)
        return out

    step = jax.jit(jax.shard_map(device_step, mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))
    with pytest.warns(UserWarning, match=FIX.format(name="sam")):
        jax.block_until_ready(step(PARAMS, batches))
        jax.effects_barrier()


# --------------------------------------------------------------------------------------------
# Legitimate use never trips it.
# --------------------------------------------------------------------------------------------


def kernel_mask(params):
    return {layer: {"kernel": True, "bias": False} for layer in params}


SETTINGS = {
    "default": {},
    "rho_0.5": dict(rho=0.5),
    "adaptive_masked": dict(adaptive=True, rho=0.5, perturb_mask=kernel_mask),
    "stable": dict(stable=True, rho=0.2),
}
SAM_ONLY = {
    "usam_rho_0.5": ("usam", dict(rho=0.5)),
    "ascent_steps_2": ("sam", dict(rho=0.5, ascent_steps=2)),
    "sign_ascent": ("sam", dict(rho=0.05, ascent_norm=float("inf"))),
}
CASES = [(name, setting, kwargs) for name in FACTORIES for setting, kwargs in SETTINGS.items()]
CASES += [(name, setting, kwargs) for setting, (name, kwargs) in SAM_ONLY.items()]


@pytest.fixture
def recorded(monkeypatch):
    """The statistics of every check that runs (under jit, from the host callback)."""
    seen = []
    report = _composition.ChainOrderStep.report

    def recording(self, statistics, checked=True):
        seen.append(np.asarray(statistics))
        report(self, statistics, checked)

    monkeypatch.setattr(_composition.ChainOrderStep, "report", recording)
    return seen


@pytest.mark.parametrize("name, setting, kwargs", CASES, ids=[f"{n}-{s}" for n, s, _ in CASES])
def test_legitimate_training_never_fires(name, setting, kwargs, recorded):
    """Real minibatch gradients of a small MLP over 12 steps of training (sam first, then SGD
    with momentum); every step is also checked as if it were the first (count reset to 0). The
    statistics of every step are recorded: the agreement stays positive, far from the threshold."""
    tx = make(name, **kwargs)
    chain = optax.chain(tx, optax.sgd(0.1, momentum=0.9))

    @jax.jit
    def train_step(params, state, batch):
        fn = lambda p: grad_fn(p, batch)  # noqa: E731
        grads = fn(params)
        first = state[0]._replace(count=jnp.zeros_like(state[0].count))
        probe, _ = tx.update(grads, first, params, grad_fn=fn)
        updates, state = chain.update(grads, state, params, grad_fn=fn)
        return optax.apply_updates(params, updates), state, probe

    params, state = PARAMS, chain.init(PARAMS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(12):
            params, state, _ = train_step(params, state, mlp_batch(jax.random.key(10 + i)))
        jax.block_until_ready(params)
        jax.effects_barrier()
    if name != "momentum_sam":
        assert recorded, "the check did not run"
    stats = np.stack(recorded).reshape(-1, 2) if recorded else np.zeros((0, 2))
    assert not _composition.descent_in_front(stats), stats
    assert (stats[:, 1] > 0).all(), stats  # far from the threshold, not just above it


@pytest.mark.parametrize("name", FACTORIES)
def test_the_first_step_at_a_minimum_passes(name):
    # g = 0: nothing to compare (<u, g_p> and the agreement are 0).
    target = {"w": jnp.array([1.0, -2.0])}
    fn = lambda p: {"w": p["w"] - target["w"]}  # noqa: E731
    first_step(optax.chain(make(name), optax.sgd(0.1)), params=target, fn=fn)


def test_usam_with_a_large_rho_on_a_quadratic_passes():
    # The unnormalized ascent moves the gradient's coordinates around (here the sign test alone
    # would fire: g_p = (I + rho H) g opposes g on most of its mass), but <g, g_p> >= ||g||^2.
    h = jnp.array([[0.02, -1.0], [-1.0, 100.0]])
    w = jnp.linalg.solve(h, jnp.array([1.0, 1e-4]))
    fn = lambda p: h @ p  # noqa: E731
    g_p = fn(w + 5.0 * fn(w))
    inner, agreement = np.asarray(_composition.chain_order_statistics(fn(w), g_p))
    assert agreement < _composition.CHAIN_ORDER_AGREEMENT and inner > 0
    first_step(sam_optax.usam(5.0), params=w, fn=fn)


def test_rho_0_and_micro_batches_have_nothing_to_compare():
    descent = optax.chain(optax.sgd(0.1), sam_optax.sam(0.0))
    first_step(descent)  # rho = 0: the output is the input, no perturbed gradient
    tx = sam_optax.sam(0.5)
    micro_batches = jax.tree.map(lambda x: x.reshape(4, 4, *x.shape[1:]), BATCH)
    tx.update(None, tx.init(PARAMS), PARAMS, grad_fn=grad_fn, micro_batches=micro_batches)


def test_per_device_gradients_under_shard_map_pass():
    mesh = jax.make_mesh((4,), ("data",))
    P = jax.sharding.PartitionSpec
    tx = optax.chain(sam_optax.sam(0.5, axis_name="data"), optax.adamw(1e-3))
    # 4 examples per device: noisy gradients.
    batches = jax.device_put(mlp_batch(jax.random.key(2), n=16), jax.NamedSharding(mesh, P("data")))

    def device_step(params, batch):
        fn = jax.grad(lambda q: mlp_loss(q, batch))
        grads = fn(sam_optax.per_device(params, "data"))
        out, _ = tx.update(grads, tx.init(params), params, grad_fn=fn)
        return out

    step = jax.jit(jax.shard_map(device_step, mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.block_until_ready(step(PARAMS, batches))
        jax.effects_barrier()
