"""The package ships type hints (sam_optax/py.typed): a type checker accepts a correct user script
and flags a wrong argument type. Skipped without mypy."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GOOD = """
import jax
import jax.numpy as jnp
import optax

import sam_optax


def loss_fn(params: dict[str, jax.Array], batch: jax.Array) -> jax.Array:
    return jnp.sum((params["w"] - batch) ** 2)


def rho_fn(count: jax.Array) -> jax.Array:
    return 0.05 * jnp.minimum(count / 100, 1.0)


params = {"w": jnp.zeros(2)}
batch = jnp.ones(2)
tx = optax.chain(sam_optax.sam(rho=0.05, stable=True), optax.sgd(0.1))
state = tx.init(params)
grad_fn = lambda p: jax.grad(loss_fn)(p, batch)
updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
params = optax.apply_updates(params, updates)
others = [
    sam_optax.sam(rho_fn, check_input_gradient=True),
    sam_optax.asam(0.5, eta=0.01),
    sam_optax.gsam(sam_optax.gsam_rho_schedule(0.1, 0.05, lr_max=0.1), alpha=0.1),
    sam_optax.looksam(0.05, k=5),
    sam_optax.vasso(optax.linear_schedule(0.0, 0.05, 100)),
    sam_optax.ae_sam(0.05, num_steps=100),
    sam_optax.esam(0.05, beta=0.6, seed=0),
    sam_optax.momentum_sam(0.3, momentum=0.9),
    sam_optax.sparse_sam(0.05, 0.5, mask="dynamic", update_every=10, num_steps=100),
]
eps = sam_optax.perturbation(updates, params, rho=0.05)
"""

BAD = """
import sam_optax

sam_optax.sam(rho="0.05")
"""


def test_mypy_accepts_a_correct_script_and_flags_a_string_rho(tmp_path):
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("needs mypy (pip install mypy)")
    scripts = {"good.py": GOOD, "bad.py": BAD}
    for name, source in scripts.items():
        (tmp_path / name).write_text(textwrap.dedent(source))
    # From the checkout's root, mypy reads sam_optax from the source tree (an editable install's
    # import hook is invisible to it); optax ships no type hints, hence --ignore-missing-imports.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--ignore-missing-imports",
            "--follow-imports=silent",
            "--cache-dir",
            str(tmp_path / "cache"),
            *(str(tmp_path / name) for name in scripts),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert [line for line in errors if "good.py" in line] == [], result.stdout
    bad = [line for line in errors if "bad.py" in line]
    assert len(bad) == 1 and 'Argument "rho" to "sam"' in bad[0], result.stdout


def test_the_package_ships_its_py_typed_marker():
    import importlib.resources

    assert importlib.resources.files("sam_optax").joinpath("py.typed").is_file()
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert 'sam_optax = ["py.typed"]' in f.read()
