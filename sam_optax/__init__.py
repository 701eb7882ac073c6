"""sam-optax: sharpness-aware minimization as composable Optax gradient transformations.

`import sam_optax` needs only JAX and Optax. The Flax helpers, `sam_optax.nnx` and
`sam_optax.linen`, import Flax when first used.

>>> import jax, jax.numpy as jnp, optax, sam_optax
>>> loss_fn = lambda params, batch: jnp.sum((params["w"] - batch) ** 2)
>>> params, batch = {"w": jnp.zeros(2)}, jnp.ones(2)
>>> tx = optax.chain(sam_optax.sam(rho=0.05, stable=True), optax.sgd(0.1, momentum=0.9))
>>> state = tx.init(params)
>>> grad_fn = lambda p: jax.grad(loss_fn)(p, batch)
>>> updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
>>> params = optax.apply_updates(params, updates)
"""

import importlib as _importlib
from typing import Any as _Any

from sam_optax import losses, per_example, sharpness
from sam_optax._accumulation import accumulate_grad_fn
from sam_optax._ae_sam import AESAMState, ae_sam
from sam_optax._esam import ESAMState, esam, esam_selected_grad_fn
from sam_optax._friendly_sam import FriendlySAMState, friendly_sam
from sam_optax._gsam import GSAMState, gsam, gsam_rho_schedule
from sam_optax._looksam import LookSAMState, looksam
from sam_optax._momentum_sam import MomentumSAMState, momentum_sam
from sam_optax._parallel import per_device
from sam_optax._sam import SAMState, asam, perturbation, sam, stable_sam, usam
from sam_optax._sparse_sam import SparseSAMState, sparse_sam
from sam_optax._switching import ascent_steps, periodic_rho_schedule, randomized_rho_schedule
from sam_optax._vasso import VaSSOState, vasso
from sam_optax.per_example import PerExampleSAMState, per_example_sam

__version__ = "0.1.0"

__all__ = [
    "SAMState",
    "accumulate_grad_fn",
    "ascent_steps",
    "asam",
    "per_device",
    "perturbation",
    "periodic_rho_schedule",
    "randomized_rho_schedule",
    "sharpness",
    "sam",
    "stable_sam",
    "usam",
    "FriendlySAMState",
    "GSAMState",
    "LookSAMState",
    "VaSSOState",
    "friendly_sam",
    "gsam",
    "gsam_rho_schedule",
    "looksam",
    "vasso",
    "AESAMState",
    "ESAMState",
    "MomentumSAMState",
    "SparseSAMState",
    "ae_sam",
    "sparse_sam",
    "esam",
    "esam_selected_grad_fn",
    "momentum_sam",
    "PerExampleSAMState",
    "losses",
    "per_example",
    "per_example_sam",
]

# `sam_optax.nnx` and `sam_optax.linen` import Flax, on first access (not in __all__, so that
# `from sam_optax import *` needs no Flax either).
_LAZY_SUBMODULES = ("linen", "nnx")


def __getattr__(name: str) -> _Any:
    if name in _LAZY_SUBMODULES:
        return _importlib.import_module(f"sam_optax.{name}")
    raise AttributeError(f"module 'sam_optax' has no attribute {name!r}")
