"""Type aliases of the public signatures.

optax ships no type information (no py.typed marker), so its aliases are `Any` to a type
checker; these are spelled with JAX's types, which are checked.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

# optax.Schedule: a function of the step count (an integer array), which sam-optax calls with the
# count of its state; a function typed for any array-like count fits too.
Schedule = Callable[[jax.Array], jax.typing.ArrayLike]
