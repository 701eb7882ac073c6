"""sam-optax: sharpness-aware minimization as composable Optax gradient transformations.

>>> tx = optax.chain(sam_optax.sam(rho=0.05, stable=True), optax.sgd(0.1, momentum=0.9))
>>> updates, state = tx.update(grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, batch))
"""

from sam_optax import sharpness
from sam_optax._sam import (
    SAMState,
    asam,
    per_device,
    perturbation,
    sam,
    stable_sam,
    usam,
)
from sam_optax._variants import (
    FriendlySAMState,
    GSAMState,
    LookSAMState,
    VaSSOState,
    friendly_sam,
    gsam,
    gsam_rho_schedule,
    looksam,
    vasso,
)

__version__ = "0.1.0"

__all__ = [
    "SAMState",
    "asam",
    "per_device",
    "perturbation",
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
]
