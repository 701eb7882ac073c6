"""Sharpness measures: top Hessian eigenvalues, Hessian trace and SAM sharpness.

Every measure takes ``loss_fn(params) -> scalar`` (the user's loss with the data closed over) and
a parameter pytree of any structure. Curvature is probed only through Hessian-vector products

.. math:: H v = \\partial_t \\nabla L(w + t v) |_{t=0},

computed forward-over-reverse (``jax.jvp`` of ``jax.grad``), so the Hessian is never formed: the
cost of one product is a small multiple of one gradient. The parameters are flattened internally
(``jax.flatten_util.ravel_pytree``) and every vector, dot product and sum is kept in float32, even
for bfloat16 parameters (the loss itself is evaluated at the parameters' own dtypes).

To measure over a whole data set with bounded memory, build the loss with :func:`dataset_loss_fn`
(a scan over stacked chunks, rematerialized so the backward pass keeps only one chunk alive)::

  batches, rest = sharpness.chunk_dataset((images, labels), chunk_size=500)
  loss_fn = sharpness.dataset_loss_fn(batch_loss, batches, remainder=rest)
  top = sharpness.top_hessian_eigenvalues(loss_fn, params, k=3, key=jax.random.key(0))
  trace = sharpness.hessian_trace(loss_fn, params, key=jax.random.key(1))
  gap = sharpness.sam_sharpness(loss_fn, params, rho=0.05)

All functions are pure and trace under ``jax.jit`` (make ``loss_fn`` and the integer options
static, e.g. by closing over them). Called outside ``jit``, :func:`top_hessian_eigenvalues` and
:func:`hessian_trace` compile themselves once per ``loss_fn`` object (and shapes/options): pass the
same function object on repeated calls, e.g. at every evaluation during training, to reuse it.

References:
  C. Lanczos, "An iteration method for the solution of the eigenvalue problem of linear
  differential and integral operators", J. Res. Nat. Bur. Standards 45 (1950).
  M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
  smoothing splines", Commun. Statist. Simula. 18 (1989).
  P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur, "Sharpness-Aware Minimization for Efficiently
  Improving Generalization", ICLR 2021.
  Z. Yao, A. Gholami, K. Keutzer, M. W. Mahoney, "PyHessian: Neural Networks Through the Lens of
  the Hessian", IEEE BigData 2020.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

__all__ = [
    "chunk_dataset",
    "dataset_loss_fn",
    "hessian_trace",
    "hessian_vector_product",
    "sam_sharpness",
    "top_hessian_eigenvalues",
]

Params = Any
LossFn = Callable[[Params], jax.Array]

# Below this fraction of the largest Lanczos coefficient seen so far, a residual is treated as an
# exact breakdown (an invariant subspace was found) and the iteration restarts from a fresh random
# direction; float32 rounding after full reorthogonalization sits around 1e-7 of that scale.
_BREAKDOWN_RTOL = 1e-6


def _static(loss_fn: LossFn) -> LossFn:
    """loss_fn itself if hashable (a jit cache key), else a wrapper (compiles on every call)."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a function params -> scalar, got {type(loss_fn)}.")
    try:
        hash(loss_fn)
    except TypeError:
        return lambda params: loss_fn(params)
    return loss_fn


def _check_key(key: Any, name: str) -> None:
    if key is None:
        raise ValueError(
            f"{name} needs a PRNG key for its random start vectors: pass key=jax.random.key(0) "
            "(or any key you split from your own)."
        )


def _check_params(params: Params) -> None:
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError("params is an empty pytree: there is no Hessian to measure.")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(
                "every params leaf must be a floating-point array, got dtype "
                f"{jnp.result_type(leaf)}; close over integer or boolean leaves inside loss_fn "
                "instead."
            )


def _flat_loss(
    loss_fn: LossFn, params: Params
) -> tuple[Callable[[jax.Array], jax.Array], jax.Array]:
    """Returns (f, x): f maps a float32 flat vector to the float32 loss; x is the flat params."""
    flat, unravel = ravel_pytree(params)

    def f(x: jax.Array) -> jax.Array:
        # Cast back so the loss sees the parameters in their own dtypes.
        return jnp.asarray(loss_fn(unravel(x.astype(flat.dtype))), jnp.float32)

    return f, flat.astype(jnp.float32)


def _flat_hvp(
    f: Callable[[jax.Array], jax.Array], x: jax.Array
) -> Callable[[jax.Array], jax.Array]:
    grad_f = jax.grad(f)

    def hvp(v: jax.Array) -> jax.Array:
        return jax.jvp(grad_f, (x,), (v,))[1].astype(jnp.float32)

    return hvp


def hessian_vector_product(loss_fn: LossFn, params: Params, vector: Params) -> Params:
    """Returns the Hessian-vector product ``H(params) @ vector`` as a pytree like ``params``.

    Computed forward-over-reverse: ``jax.jvp(jax.grad(loss_fn), (params,), (vector,))``.

    Args:
      loss_fn: ``loss_fn(params) -> scalar``.
      params: the point at which the Hessian is taken.
      vector: a pytree with the structure, shapes and dtypes of ``params``.
    """
    return jax.jvp(jax.grad(loss_fn), (params,), (vector,))[1]


def _orthogonalize(w: jax.Array, basis: jax.Array) -> jax.Array:
    # Classical Gram-Schmidt applied twice ("twice is enough"); unused rows of basis are zero.
    w = w - basis.T @ (basis @ w)
    return w - basis.T @ (basis @ w)


def _lanczos_eigenvalues(
    hvp: Callable[[jax.Array], jax.Array], v0: jax.Array, num_iters: int, key: jax.Array
) -> jax.Array:
    """Ritz values (ascending) of ``num_iters`` Lanczos steps with full reorthogonalization."""
    n = v0.shape[0]
    basis = jnp.zeros((num_iters, n), jnp.float32)
    alphas = jnp.zeros((num_iters,), jnp.float32)
    betas = jnp.zeros((num_iters,), jnp.float32)  # betas[j] couples steps j and j + 1
    v0 = v0 / jnp.linalg.norm(v0)

    def step(j, carry):
        basis, alphas, betas, v, v_prev, beta_prev, scale = carry
        basis = basis.at[j].set(v)
        w = hvp(v)
        alpha = jnp.vdot(v, w)
        w = w - alpha * v - beta_prev * v_prev
        w = _orthogonalize(w, basis)
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.maximum(jnp.abs(alpha), beta))
        # On breakdown the Krylov space is invariant: its Ritz values are exact, and the search
        # goes on in a random direction orthogonal to it (a zero off-diagonal entry in T).
        broke_down = beta <= _BREAKDOWN_RTOL * scale
        restart = _orthogonalize(jax.random.normal(jax.random.fold_in(key, j), (n,)), basis)
        restart = restart / jnp.maximum(jnp.linalg.norm(restart), jnp.finfo(jnp.float32).tiny)
        v_next = jnp.where(broke_down, restart, w / jnp.where(broke_down, 1.0, beta))
        beta = jnp.where(broke_down, 0.0, beta)
        return basis, alphas.at[j].set(alpha), betas.at[j].set(beta), v_next, v, beta, scale

    init = (basis, alphas, betas, v0, jnp.zeros_like(v0), jnp.float32(0), jnp.float32(0))
    _, alphas, betas, *_ = jax.lax.fori_loop(0, num_iters, step, init)
    tridiagonal = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    return jnp.linalg.eigvalsh(tridiagonal)


def _subspace_eigenvalues(
    hvp: Callable[[jax.Array], jax.Array], v0: jax.Array, num_iters: int
) -> jax.Array:
    """Ritz values (ascending) of block power (subspace) iteration with Rayleigh-Ritz."""
    q, _ = jnp.linalg.qr(v0)  # v0: [n, k]
    block_hvp = jax.vmap(hvp, in_axes=1, out_axes=1)

    def step(_, q):
        q, _ = jnp.linalg.qr(block_hvp(q))
        return q

    q = jax.lax.fori_loop(0, num_iters, step, q)
    projected = q.T @ block_hvp(q)
    return jnp.linalg.eigvalsh(0.5 * (projected + projected.T))


def top_hessian_eigenvalues(
    loss_fn: LossFn,
    params: Params,
    k: int = 1,
    *,
    key: jax.Array,
    num_iters: int = 30,
    method: str = "lanczos",
) -> jax.Array:
    """Returns the ``k`` largest eigenvalues of the Hessian of ``loss_fn`` at ``params``.

    ``method="lanczos"`` (default) runs ``m = min(num_iters, n)`` Lanczos steps on the
    Hessian-vector product from a random unit vector ``q_1``, ``n`` being the number of
    parameters:

    .. math::
       w = H q_j - \\beta_{j-1} q_{j-1}, \\quad \\alpha_j = q_j^\\top H q_j, \\quad
       w \\leftarrow (I - Q_j Q_j^\\top)(w - \\alpha_j q_j), \\quad
       \\beta_j = \\|w\\|, \\quad q_{j+1} = w / \\beta_j,

    with full reorthogonalization against all previous ``q`` (twice, so the basis stays
    orthonormal in float32), and returns the largest eigenvalues of the tridiagonal
    ``T = tridiag(beta, alpha, beta)``: the Ritz values, which converge fastest at the ends of the
    spectrum. It stores the ``m x n`` basis (``m`` parameter-sized float32 vectors) and costs
    ``m`` Hessian-vector products. When ``m = n`` the result is exact up to rounding.

    ``method="power"`` runs block power (subspace) iteration ``Q <- qr(H Q)`` on ``k`` vectors
    for ``num_iters`` steps and returns the eigenvalues of ``Q^T H Q``. It stores only ``k``
    vectors but costs ``k * (num_iters + 1)`` products and converges to the eigenvalues of
    largest *magnitude* at rate ``|lambda_{k+1} / lambda_k|``; prefer Lanczos unless memory
    is tight.

    Args:
      loss_fn: ``loss_fn(params) -> scalar``, e.g. from :func:`dataset_loss_fn`.
      params: any pytree of floating-point arrays.
      k: how many eigenvalues, ``1 <= k <= n``.
      key: PRNG key for the random start vector(s).
      num_iters: Lanczos steps (``k <= num_iters``; capped at ``n``) or power iterations.
      method: ``"lanczos"`` or ``"power"``.

    Returns:
      float32 array of shape ``[k]``, largest (most positive) first.
    """
    _check_key(key, "top_hessian_eigenvalues")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    if not isinstance(num_iters, (int, np.integer)) or num_iters < 1:
        raise ValueError(f"num_iters must be a positive integer, got {num_iters!r}.")
    if method not in ("lanczos", "power"):
        raise ValueError(f'method must be "lanczos" or "power", got {method!r}.')
    if method == "lanczos" and num_iters < k:
        raise ValueError(
            f"Lanczos with num_iters={num_iters} yields at most {num_iters} Ritz values; "
            f"use num_iters >= k={k} (a few times k gives accurate values)."
        )
    _check_params(params)
    n = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(params))
    if k > n:
        raise ValueError(f"k={k} is larger than the number of parameters ({n}).")
    return _top_eigenvalues(_static(loss_fn), params, key, int(k), min(int(num_iters), n), method)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _top_eigenvalues(
    loss_fn: LossFn, params: Params, key: jax.Array, k: int, num_iters: int, method: str
) -> jax.Array:
    # Jitted with loss_fn static: repeated calls with the same loss_fn compile once.
    f, x = _flat_loss(loss_fn, params)
    hvp = _flat_hvp(f, x)
    start_key, restart_key = jax.random.split(key)
    if method == "lanczos":
        v0 = jax.random.normal(start_key, x.shape, jnp.float32)
        ritz = _lanczos_eigenvalues(hvp, v0, num_iters, restart_key)
    else:
        v0 = jax.random.normal(start_key, (x.shape[0], k), jnp.float32)
        ritz = _subspace_eigenvalues(hvp, v0, num_iters)
    return ritz[::-1][:k]


def hessian_trace(
    loss_fn: LossFn,
    params: Params,
    *,
    key: jax.Array,
    num_samples: int = 100,
) -> jax.Array:
    """Estimates the trace of the Hessian of ``loss_fn`` at ``params`` (Hutchinson's estimator).

    .. math:: \\operatorname{tr} H \\approx \\frac{1}{S} \\sum_{s=1}^S v_s^\\top H v_s,
       \\qquad v_s \\in \\{-1, +1\\}^n \\text{ Rademacher},

    which is unbiased with variance ``2 (||H||_F^2 - sum_i H_ii^2) / S`` per the Rademacher
    probes (exact for a diagonal Hessian). The ``S`` products run one after another
    (``lax.map``), so memory stays at one Hessian-vector product.

    Args:
      loss_fn: ``loss_fn(params) -> scalar``.
      params: any pytree of floating-point arrays.
      key: PRNG key for the probes.
      num_samples: number of probes ``S >= 1``.

    Returns:
      float32 scalar estimate of ``tr H``.
    """
    _check_key(key, "hessian_trace")
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
    _check_params(params)
    return _hutchinson(_static(loss_fn), params, key, int(num_samples))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _hutchinson(loss_fn: LossFn, params: Params, key: jax.Array, num_samples: int) -> jax.Array:
    f, x = _flat_loss(loss_fn, params)
    hvp = _flat_hvp(f, x)

    def quadratic_form(probe_key: jax.Array) -> jax.Array:
        v = jax.random.rademacher(probe_key, x.shape, jnp.float32)
        return jnp.vdot(v, hvp(v))

    return jnp.mean(jax.lax.map(quadratic_form, jax.random.split(key, num_samples)))


def sam_sharpness(
    loss_fn: LossFn,
    params: Params,
    rho: float | jax.Array = 0.05,
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    normalize: bool = True,
    ascent_norm: float | None = None,
    ascent_steps: int | None = None,
    perturb_mask: Any = None,
) -> jax.Array:
    """Returns SAM's sharpness ``L(w + eps) - L(w)`` for the ascent of ``sam_optax.sam``.

    ``eps`` is exactly the perturbation that ``sam_optax.sam(rho, **same_keywords)`` builds
    from the gradient at ``w`` (see ``sam_optax.perturbation``); for the default SAM,

    .. math:: \\epsilon = \\rho \\, \\nabla L(w) / \\|\\nabla L(w)\\|_2,

    so the value is Foret et al.'s first-order estimate of
    ``max_{||e|| <= rho} L(w + e) - L(w)``; ``normalize=False`` gives USAM's
    ``eps = rho * grad``, ``adaptive=True`` ASAM's ``rho T^2 g / ||T g||`` with
    ``T = |w| + eta``.

    Args:
      loss_fn: ``loss_fn(params) -> scalar``.
      params: the point ``w``.
      rho: the perturbation radius (a number, not a schedule).
      adaptive, eta, normalize, ascent_norm, ascent_steps, perturb_mask: as in
        ``sam_optax.sam``.

    Returns:
      float32 scalar ``L(w + eps) - L(w)``.
    """
    from sam_optax import perturbation  # The core imports this module; resolve at call time.

    if callable(rho):
        raise TypeError(
            "sam_sharpness takes a number for rho, not a schedule: evaluate the schedule first, "
            "e.g. rho=schedule(step)."
        )

    def loss32(p: Params) -> jax.Array:
        return jnp.asarray(loss_fn(p), jnp.float32)

    loss, grads = jax.value_and_grad(loss32)(params)
    eps = perturbation(
        grads,
        params,
        rho=rho,
        grad_fn=jax.grad(loss32),
        adaptive=adaptive,
        eta=eta,
        normalize=normalize,
        ascent_norm=ascent_norm,
        ascent_steps=ascent_steps,
        perturb_mask=perturb_mask,
    )
    perturbed = jax.tree_util.tree_map(lambda w, e: w + e.astype(w.dtype), params, eps)
    return loss32(perturbed) - loss


def chunk_dataset(data: Any, chunk_size: int) -> tuple[Any, Any | None]:
    """Splits a data set into equal chunks for :func:`dataset_loss_fn`.

    Args:
      data: a pytree of arrays sharing the leading (example) axis, e.g. ``(images, labels)``.
      chunk_size: examples per chunk.

    Returns:
      ``(chunks, remainder)``: ``chunks`` has leaves of shape ``[N // chunk_size, chunk_size,
      ...]``; ``remainder`` holds the last ``N % chunk_size`` examples, or ``None`` if none.
    """
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves:
        raise ValueError("data is an empty pytree.")
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"every data leaf needs the same leading (example) axis; got leading sizes {sizes}."
        )
    (num_examples,) = sizes
    num_chunks = num_examples // chunk_size
    if num_chunks == 0:
        raise ValueError(
            f"chunk_size={chunk_size} is larger than the data set ({num_examples} examples)."
        )
    cut = num_chunks * chunk_size
    chunks = jax.tree_util.tree_map(
        lambda a: jnp.reshape(a[:cut], (num_chunks, chunk_size, *np.shape(a)[1:])), data
    )
    remainder = jax.tree_util.tree_map(lambda a: a[cut:], data) if cut < num_examples else None
    return chunks, remainder


def dataset_loss_fn(
    batch_loss_fn: Callable[[Params, Any], jax.Array],
    batches: Any,
    *,
    remainder: Any | None = None,
) -> LossFn:
    """Builds ``loss_fn(params)``: the mean of ``batch_loss_fn`` over a whole data set.

    .. math:: L(w) = \\frac{B \\sum_{c=1}^{C} L_c(w) + r \\, L_{rest}(w)}{C B + r},

    for ``C`` stacked chunks of ``B`` examples and an optional remainder of ``r < B`` examples;
    this is the per-example mean whenever ``batch_loss_fn`` averages over its batch. The chunks
    are visited by ``lax.scan`` with a rematerialized body, so gradients and Hessian-vector
    products keep only one chunk's activations alive: memory is bounded by the chunk size, not
    the data set. The result plugs into every measure of this module.

    Args:
      batch_loss_fn: ``batch_loss_fn(params, batch) -> scalar`` mean loss of one batch.
      batches: pytree whose leaves have shape ``[C, B, ...]`` (see :func:`chunk_dataset`).
      remainder: optional pytree of leaves ``[r, ...]`` with ``r < B`` leftover examples.

    Returns:
      ``loss_fn(params) -> float32 scalar``.
    """
    leaves = jax.tree_util.tree_leaves(batches)
    if not leaves or any(np.ndim(leaf) < 2 for leaf in leaves):
        raise ValueError(
            "batches must be a pytree of arrays shaped [num_chunks, chunk_size, ...]; "
            "build it with chunk_dataset(data, chunk_size)."
        )
    num_chunks, chunk_size = np.shape(leaves[0])[:2]
    if any(np.shape(leaf)[:2] != (num_chunks, chunk_size) for leaf in leaves):
        raise ValueError("every leaf of batches must share the [num_chunks, chunk_size] axes.")
    rest = 0
    if remainder is not None:
        rest_leaves = jax.tree_util.tree_leaves(remainder)
        rest = int(np.shape(rest_leaves[0])[0]) if rest_leaves else 0
        if rest >= chunk_size:
            raise ValueError(
                f"remainder has {rest} examples, not fewer than chunk_size={chunk_size}; "
                "put full chunks into batches."
            )
    total = num_chunks * chunk_size + rest

    def loss_fn(params: Params) -> jax.Array:
        @jax.checkpoint
        def chunk_loss(batch: Any) -> jax.Array:
            return jnp.asarray(batch_loss_fn(params, batch), jnp.float32)

        def body(acc: jax.Array, batch: Any) -> tuple[jax.Array, None]:
            return acc + chunk_loss(batch), None

        summed, _ = jax.lax.scan(body, jnp.float32(0), batches)
        loss = summed * (chunk_size / total)
        if rest:
            loss = loss + chunk_loss(remainder) * (rest / total)
        return loss

    return loss_fn
