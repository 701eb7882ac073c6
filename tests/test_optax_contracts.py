"""optax's contracts for every transformation of the package, in the style of optax's own tests
(`optax/contrib/_common_test.py`, `optax/_src/alias_test.py`).

Every contract runs over CONFIGS, one entry per public factory and per configuration that takes
another path through the code (a static keyword, a rho schedule): a new variant is checked by
adding it there. `test_every_factory_is_listed` fails when a factory of `sam_optax.__all__` has
no entry. Where a contract does not hold for an algorithmic reason, the entry says so with the
reason, and the test is a strict xfail.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

# --------------------------------------------------------------------------------------------
# The configurations.
# --------------------------------------------------------------------------------------------

RHO = 0.05  # the radius of the contracts; the convergence contract takes a smaller one
SMALL_RHO = 0.002


@dataclasses.dataclass(frozen=True)
class Config:
    """One configuration under test: `factory(**kwargs(rho))`, in front of a base optimizer.

    `static_args` are those `optax.inject_hyperparams` needs. `complex_refusal` starts the
    ValueError that refuses complex parameters (None: supported, a step on them is the step on
    the (Re, Im) pairs).
    """

    factory: Callable[..., optax.GradientTransformationExtraArgs]
    kwargs: Callable[[float], dict[str, Any]]
    static_args: tuple[str, ...] = ()
    complex_refusal: str | None = None

    def make(self, rho: float = RHO, **overrides: Any) -> optax.GradientTransformationExtraArgs:
        return self.factory(**{**self.kwargs(rho), **overrides})


LR_SCHEDULE = optax.cosine_decay_schedule(0.1, 400, alpha=0.1)


def gsam_schedule(rho):
    return sam_optax.gsam_rho_schedule(
        LR_SCHEDULE, rho_max=rho, rho_min=rho / 4, lr_max=0.1, lr_min=0.01
    )


CONFIGS = [
    pytest.param(Config(sam_optax.sam, lambda rho: dict(rho=rho)), id="sam"),
    pytest.param(Config(sam_optax.stable_sam, lambda rho: dict(rho=rho)), id="stable_sam"),
    pytest.param(
        Config(
            sam_optax.asam,
            lambda rho: dict(rho=rho, eta=0.01),
            complex_refusal="sam(adaptive=True)",
        ),
        id="asam",
    ),
    pytest.param(Config(sam_optax.usam, lambda rho: dict(rho=rho)), id="usam"),
    pytest.param(Config(sam_optax.gsam, lambda rho: dict(rho=rho, alpha=0.1)), id="gsam"),
    pytest.param(
        Config(sam_optax.looksam, lambda rho: dict(rho=rho, k=2, alpha=0.7)), id="looksam"
    ),
    pytest.param(
        Config(sam_optax.friendly_sam, lambda rho: dict(rho=rho, sigma=1.0, lmbda=0.9)),
        id="friendly_sam",
    ),
    pytest.param(Config(sam_optax.vasso, lambda rho: dict(rho=rho, theta=0.9)), id="vasso"),
    pytest.param(Config(sam_optax.ae_sam, lambda rho: dict(rho=rho, num_steps=100)), id="ae_sam"),
    pytest.param(Config(sam_optax.esam, lambda rho: dict(rho=rho, beta=0.6)), id="esam"),
    pytest.param(
        Config(sam_optax.momentum_sam, lambda rho: dict(rho=rho, momentum=0.9)),
        id="momentum_sam",
    ),
    pytest.param(
        Config(
            sam_optax.sparse_sam,
            lambda rho: dict(rho=rho, sparsity=0.5, update_every=2),
            static_args=("sparsity",),
            complex_refusal="sparse_sam",
        ),
        id="sparse_sam_fisher",
    ),
    pytest.param(
        Config(
            sam_optax.sparse_sam,
            lambda rho: dict(rho=rho, sparsity=0.5, mask="dynamic", update_every=2, num_steps=50),
            static_args=("sparsity",),
            complex_refusal="sparse_sam",
        ),
        id="sparse_sam_dynamic",
    ),
    pytest.param(
        Config(
            sam_optax.sam,
            lambda rho: dict(rho=rho, ascent_norm=float("inf")),
            static_args=("ascent_norm",),
            complex_refusal="sam(ascent_norm=inf)",
        ),
        id="sam_linf",
    ),
    pytest.param(
        Config(
            sam_optax.sam, lambda rho: dict(rho=rho, ascent_steps=2), static_args=("ascent_steps",)
        ),
        id="sam_two_ascent_steps",
    ),
    pytest.param(
        Config(sam_optax.sam, lambda rho: dict(rho=sam_optax.periodic_rho_schedule(rho, 2))),
        id="periodic_rho_schedule",
    ),
    pytest.param(
        Config(
            sam_optax.sam,
            lambda rho: dict(rho=sam_optax.randomized_rho_schedule(rho, 0.5, seed=1)),
        ),
        id="randomized_rho_schedule",
    ),
    pytest.param(
        Config(sam_optax.gsam, lambda rho: dict(rho=gsam_schedule(rho), alpha=0.1)),
        id="gsam_rho_schedule",
    ),
    pytest.param(
        Config(sam_optax.sam, lambda rho: dict(rho=optax.linear_schedule(0.0, rho, 10))),
        id="optax_schedule",
    ),
]
CONFIG_IDS = [param.id for param in CONFIGS]
every_config = pytest.mark.parametrize("config", CONFIGS)

# The factories that CONFIGS stands for (the rho schedules are not transformations).
SCHEDULES = {"periodic_rho_schedule", "randomized_rho_schedule", "gsam_rho_schedule"}
# Transformations whose `update` takes something else than `grad_fn`, and why they are not here.
OTHER_INTERFACES = {
    "per_example_sam": "its update takes sam_grad_fn from sam_optax.per_example.value_and_grad",
}


def test_every_factory_is_listed():
    listed = {param.values[0].factory for param in CONFIGS}
    for name in sam_optax.__all__:
        value = getattr(sam_optax, name)
        if name in SCHEDULES:
            assert name in CONFIG_IDS, f"add a CONFIGS entry whose rho is {name}(...)"
            continue
        if not inspect.isfunction(value) or name == "ascent_steps" or name in OTHER_INTERFACES:
            continue
        returns = inspect.signature(value).return_annotation
        if "GradientTransformation" in str(returns):
            assert value in listed, f"add a CONFIGS entry for sam_optax.{name}"


# --------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------


def quadratic_loss(params):
    """Weighted squares of a few leaves of several shapes, minimum 0 at params = 0."""
    return sum(jnp.sum((i + 1.0) * jnp.square(x)) for i, x in enumerate(jax.tree.leaves(params)))


def small_params(dtype=jnp.float32):
    return {
        "a": jnp.asarray([1.0, -2.0, 0.5], dtype),
        "b": jnp.asarray([[0.3, -0.1], [0.2, 0.7]], dtype),
    }


def step(tx, params, state, grad_fn, **extra_args):
    """One update of `tx` (a chain ending in a base optimizer) and its application."""
    updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn, **extra_args)
    return optax.apply_updates(params, updates), state


def run(tx, params, grad_fn, steps):
    """`steps` jitted updates of `tx` from params; returns (params, state)."""
    state = tx.init(params)
    one_step = jax.jit(functools.partial(step, tx, grad_fn=grad_fn))
    for _ in range(steps):
        params, state = one_step(params, state)
    return params, state


def dtypes(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def quiet(fn, *args, **kwargs):
    """fn(*args, **kwargs) without the warnings the package gives inside optax's wrappers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# Convergence (optax's parabola and Rosenbrock targets), at a small rho and few steps.
# --------------------------------------------------------------------------------------------


def parabola():
    start, target = jnp.array([-1.0, 10.0, 1.0]), jnp.array([1.0, -1.0, 1.0])
    return start, target, lambda w: jnp.sum(jnp.square(w - target))


def rosenbrock():
    start, target = jnp.array([0.0, 0.0]), jnp.array([1.0, 1.0])
    return start, target, lambda w: jnp.square(1.0 - w[0]) + 100.0 * jnp.square(w[1] - w[0] ** 2)


PROBLEMS = {
    "parabola": (parabola, lambda: optax.sgd(0.05, momentum=0.9), 300),
    "rosenbrock": (rosenbrock, lambda: optax.adam(0.02), 2000),
}


# Where a configuration does not reach the minimum for an algorithmic reason: (id, problem,
# rho) -> why. Each is a strict xfail, so that a change which makes it converge is noticed.
NOT_CONVERGING = {
    ("looksam", "rosenbrock", SMALL_RHO): (
        "LookSAM adds alpha ||g|| along the last stored direction orthogonal to g whatever rho "
        "is (alpha = 0.7): in Rosenbrock's curved valley that direction holds it off the minimum"
    ),
    ("sam", "rosenbrock", 0.05): (
        "SAM's biased fixed point: at the default rho, L(w + eps) is flattest away from "
        "Rosenbrock's minimum, in the valley's gentler part"
    ),
    ("momentum_sam", "rosenbrock", 0.3): (
        "Momentum-SAM at its default rho evaluates the gradient 0.3 ahead along the momentum: in "
        "Rosenbrock's narrow valley that gradient points back and the iterate stalls"
    ),
}
# Besides every configuration at SMALL_RHO: these at their factory's default rho.
AT_DEFAULT_RHO = {"sam": 0.05, "momentum_sam": 0.3}


def convergence_cases():
    for param in CONFIGS:
        config = param.values[0]
        rhos = [SMALL_RHO] + ([AT_DEFAULT_RHO[param.id]] if param.id in AT_DEFAULT_RHO else [])
        for rho in rhos:
            for problem in PROBLEMS:
                reason = NOT_CONVERGING.get((param.id, problem, rho))
                marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
                case_id = f"{param.id}-{problem}" + ("" if rho == SMALL_RHO else f"-rho{rho}")
                yield pytest.param(config, problem, rho, id=case_id, marks=marks)


@pytest.mark.slow
@pytest.mark.parametrize(("config", "problem", "rho"), convergence_cases())
def test_convergence(config, problem, rho):
    make_problem, base, steps = PROBLEMS[problem]
    start, target, loss = make_problem()
    tx = optax.chain(config.make(rho), base())
    grad_fn = jax.grad(loss)

    @jax.jit
    def train(params):
        state = tx.init(params)
        # A no-op optax.tree.map_params, as optax's own convergence tests do.
        state = optax.tree.map_params(tx, lambda v: v, state)

        def body(carry, _):
            return step(tx, *carry, grad_fn), None

        (params, _), _ = jax.lax.scan(body, (params, state), length=steps)
        return params

    chex.assert_trees_all_close(train(start), target, atol=3e-2, rtol=3e-2)


# --------------------------------------------------------------------------------------------
# optax's wrappers and tree utilities.
# --------------------------------------------------------------------------------------------


@every_config
def test_extra_args_without_recompilation(config):
    """Extra keyword arguments go through the chain, and new values do not recompile."""
    tx = optax.chain(config.make(), optax.sgd(0.1))

    @jax.jit
    def update(params, state, scale):
        grad_fn = jax.grad(lambda p: scale * quadratic_loss(p))
        return step(tx, params, state, grad_fn, value=scale, some_other_argument=(scale, 1))

    params = small_params()
    state = tx.init(params)
    for scale in (1.0, 0.5, 2.0):
        params, state = update(params, state, jnp.float32(scale))
    chex.assert_tree_all_finite(params)
    assert update._cache_size() == 1


@every_config
def test_inject_hyperparams(config):
    """optax.inject_hyperparams(factory) computes what factory does, state and all."""
    injected = optax.inject_hyperparams(config.factory, static_args=config.static_args)(
        **config.kwargs(RHO)
    )
    grad_fn = jax.grad(quadratic_loss)
    params, state = run(optax.chain(config.make(), optax.sgd(0.1)), small_params(), grad_fn, 2)
    params_i, state_i = run(optax.chain(injected, optax.sgd(0.1)), small_params(), grad_fn, 2)
    chex.assert_trees_all_close(params_i, params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(state_i[0].inner_state, state[0], rtol=1e-5, atol=1e-6)
    assert "rho" in state_i[0].hyperparams


@every_config
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_preserve_dtype(config, dtype):
    """The updates have the params' dtypes and an update keeps the state's shapes and dtypes."""
    params = small_params(dtype)
    grad_fn = jax.grad(quadratic_loss)
    tx = config.make()
    state = tx.init(params)
    updates, new_state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
    assert dtypes(updates) == dtypes(params)
    assert dtypes(new_state) == dtypes(state)
    chex.assert_tree_all_finite(updates)


@every_config
def test_multi_steps(config):
    """Inside optax.MultiSteps (which wants the state's types stable under its lax.cond)."""
    tx = optax.MultiSteps(optax.chain(config.make(), optax.sgd(0.1)), every_k_schedule=2)
    grad_fn = jax.grad(quadratic_loss)
    start = small_params()
    state = tx.init(start)
    one_step = jax.jit(functools.partial(step, tx, grad_fn=grad_fn))
    params, state = quiet(one_step, start, state)
    chex.assert_trees_all_equal(params, start)  # the first micro-step applies nothing
    params, new_state = quiet(one_step, params, state)
    assert quadratic_loss(params) < quadratic_loss(start)
    assert dtypes(new_state) == dtypes(state)


@every_config
def test_state_dtypes_under_cond(config):
    """The state after an update has the init's types: a lax.cond may skip the update."""
    tx = optax.chain(config.make(), optax.adam(0.1))
    grad_fn = jax.grad(quadratic_loss)

    @jax.jit
    def maybe_step(take, params, state):
        return jax.lax.cond(take, lambda: step(tx, params, state, grad_fn), lambda: (params, state))

    params = small_params()
    state = tx.init(params)
    for take in (True, False, True):
        params, new_state = maybe_step(take, params, state)
        assert dtypes(new_state) == dtypes(state)
        state = new_state
    assert quadratic_loss(params) < quadratic_loss(small_params())


@every_config
def test_none_and_empty_subtrees(config):
    params = {
        "w": jnp.array([1.0, -2.0]),
        "frozen": None,
        "empty": {},
        "nested": {"x": jnp.array([[0.5, 0.2]]), "nothing": ()},
    }

    def loss(p):
        return jnp.sum(p["w"] ** 2) + 3.0 * jnp.sum(p["nested"]["x"] ** 2)

    new_params, _ = run(optax.chain(config.make(), optax.sgd(0.1)), params, jax.grad(loss), 2)
    assert jax.tree.structure(new_params) == jax.tree.structure(params)
    assert loss(new_params) < loss(params)


@every_config
def test_scalar_params(config):
    params = jnp.asarray(1.5)
    loss = lambda w: 2.0 * (w - 0.5) ** 2  # noqa: E731
    new_params, _ = run(optax.chain(config.make(), optax.sgd(0.1)), params, jax.grad(loss), 3)
    assert new_params.shape == () and new_params.dtype == jnp.float32
    assert abs(new_params - 0.5) < abs(params - 0.5)


@pytest.mark.slow
@every_config
def test_vmap_over_seeds(config):
    """jax.vmap of a training over seeds (the initial params) gives each seed's run."""
    tx = optax.chain(config.make(), optax.sgd(0.1, momentum=0.9))

    def train(key):
        params = jax.tree.map(lambda x: x * jax.random.normal(key, x.shape), small_params())
        state = tx.init(params)
        for _ in range(2):
            params, state = step(tx, params, state, jax.grad(quadratic_loss))
        return params, state

    keys = jax.random.split(jax.random.key(0), 2)
    batched = jax.jit(jax.vmap(train))(keys)
    one_seed = jax.jit(train)
    for i, key in enumerate(keys):
        one = jax.tree.map(lambda x, i=i: x[i], batched)
        chex.assert_trees_all_close(one, one_seed(key), atol=1e-5, rtol=1e-5)


@every_config
def test_map_params(config):
    """optax.tree.map_params finds every params-shaped tree of the state (e.g. to map sharding
    specs over it); the rest is left to transform_non_params."""
    tx = optax.chain(config.make(), optax.sgd(0.1, momentum=0.9))
    grad_fn = jax.grad(quadratic_loss)
    params, state = run(tx, small_params(), grad_fn, 1)
    chex.assert_trees_all_equal(optax.tree.map_params(tx, lambda v: v, state), state)

    specs = jax.tree.map(lambda _: "spec", params)
    mapped = optax.tree.map_params(
        tx, lambda _, spec: spec, state, specs, transform_non_params=lambda _: None
    )
    leaves = jax.tree.leaves(mapped)
    assert set(leaves) == {"spec"}  # None is not a leaf
    assert len(leaves) % len(jax.tree.leaves(params)) == 0  # whole params trees only


@every_config
def test_empty_params(config):
    tx = optax.chain(config.make(), optax.sgd(0.1))
    state = tx.init({})
    updates, _ = tx.update({}, state, {}, grad_fn=lambda p: {})
    assert updates == {}


# --------------------------------------------------------------------------------------------
# Non-finite gradients and complex parameters.
# --------------------------------------------------------------------------------------------


@every_config
def test_non_finite_gradient_does_not_poison_later_steps(config):
    """chain(variant, apply_if_finite(base)) skips a NaN step and trains on after it: the
    step's output is NaN and the state's buffers keep their values."""
    tx = optax.chain(config.make(), optax.apply_if_finite(optax.sgd(0.1), 5))

    def loss(w, x):
        return jnp.sum(x * w**2)

    @jax.jit
    def update(w, state, x):
        grad_fn = functools.partial(jax.grad(loss), x=x)
        return tx.update(grad_fn(w), state, w, grad_fn=grad_fn)

    w = jnp.array([1.0, -2.0])
    state = tx.init(w)
    history = []
    for x in [1.0, np.nan, 1.0, 1.0]:
        updates, new_state = update(w, state, jnp.float32(x))
        if np.isnan(x):
            # Every buffer as it was (the step count and PRNG keys may advance).
            for before, after in zip(
                jax.tree.leaves(state[0]), jax.tree.leaves(new_state[0]), strict=True
            ):
                if not jnp.issubdtype(before.dtype, jnp.integer):
                    chex.assert_trees_all_equal(after, before)
        w, state = optax.apply_updates(w, updates), new_state
        history.append(w)
    chex.assert_tree_all_finite(state[0])
    assert int(state[1].total_notfinite) == 1 and int(state[1].notfinite_count) == 0
    chex.assert_trees_all_equal(history[1], history[0])  # the NaN step was skipped
    assert jnp.all(jnp.abs(history[3]) < jnp.abs(history[1]))  # and training went on


def to_pairs(tree):
    """Each complex leaf as the real array of its (Re, Im) pairs, on a last axis of 2."""
    return jax.tree.map(lambda z: jnp.stack([z.real, z.imag], -1), tree)


def from_pairs(tree):
    return jax.tree.map(lambda x: x[..., 0] + 1j * x[..., 1], tree)


def complex_loss(params):
    z, y = params["z"], params["y"]
    quadratic = jnp.real(jnp.vdot(z, jnp.asarray(QUADRATIC_FORM, z.dtype) @ z))
    coupling = jnp.sum(jnp.abs(y - 1j) ** 2 * jnp.abs(z[:2]))
    return quadratic + 0.1 * jnp.sum(jnp.abs(z) ** 4) + coupling


QUADRATIC_FORM = np.array([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.25]])
COMPLEX_PARAMS = {
    "z": jnp.array([1 + 0.5j, -2 + 1j, 0.5 - 0.3j], jnp.complex64),
    "y": jnp.array([0.3 + 0.2j, -0.1j], jnp.complex64),
}


def complex_grad_fn(params):
    """The gradient optax's optimizers expect for complex params, dL/dRe + i dL/dIm: the
    conjugate of jax.grad's."""
    return jax.tree.map(jnp.conj, jax.grad(complex_loss)(params))


def pairs_grad_fn(pairs):
    return jax.grad(lambda x: complex_loss(from_pairs(x)))(pairs)


@every_config
def test_complex_params(config):
    """A step on complex params is the step on their (Re, Im) pairs, or a clear refusal."""
    base = lambda: optax.sgd(0.05)  # noqa: E731
    if config.complex_refusal is not None:
        tx = optax.chain(config.make(), base())
        with pytest.raises(ValueError, match=r"complex parameters") as error:
            run(tx, COMPLEX_PARAMS, complex_grad_fn, 1)
        assert str(error.value).startswith(config.complex_refusal)
        assert "\n" not in str(error.value)
        run(tx, to_pairs(COMPLEX_PARAMS), pairs_grad_fn, 1)  # what the message proposes
        return
    params, _ = run(optax.chain(config.make(), base()), COMPLEX_PARAMS, complex_grad_fn, 3)
    pairs, _ = run(optax.chain(config.make(), base()), to_pairs(COMPLEX_PARAMS), pairs_grad_fn, 3)
    chex.assert_trees_all_close(params, from_pairs(pairs), atol=1e-5, rtol=1e-5)
    assert not np.allclose(params["z"], COMPLEX_PARAMS["z"])
