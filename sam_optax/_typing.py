"""Type aliases of the public signatures.

optax ships no type information (no py.typed marker), so its aliases are `Any` to a type
checker; these are spelled with JAX's types, which are checked.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import jax

# optax.Schedule: a function of the step count, which sam-optax calls with the count of its state
# (an integer array). `...`: a schedule typed for jax.Array counts fits as well as one typed for
# any array-like count (optax's own).
Schedule = Callable[..., jax.typing.ArrayLike]

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # typing.Unpack is new in Python 3.11.
    from typing_extensions import Unpack

__all__ = ["Schedule", "Unpack"]
