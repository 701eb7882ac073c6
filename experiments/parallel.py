"""Data-parallel plumbing: multi-host start-up, the 1-D device mesh, global arrays, and the
``jax.shard_map`` + ``jax.jit`` wrappers that run the steps of :mod:`experiments.steps` on it.

The uint8 data set lives on the devices, and every device gathers its share of the global batch
from indices, so the host feeds no pixels.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import data
from experiments.config import ConfigError, TrainConfig
from experiments.steps import AXIS, Metrics, TrainState, step_key

_DISTRIBUTED_INITIALIZED = False


def wants_distributed(config: TrainConfig) -> bool:
    """Whether `config` (or the environment) asks for a multi-process run."""
    return bool(
        config.distributed
        or config.coordinator_address
        or config.num_processes
        or config.process_id >= 0
        or os.environ.get("JAX_COORDINATOR_ADDRESS")
    )


def maybe_initialize_distributed(config: TrainConfig) -> None:
    """Starts the multi-process runtime (``jax.distributed.initialize``) when `config` or the
    environment asks for it. Must come before any other JAX call; later calls do nothing.

    Unset coordinator address, process count and id are left to JAX, which reads
    ``JAX_COORDINATOR_ADDRESS`` and detects Slurm and Open MPI jobs.
    """
    global _DISTRIBUTED_INITIALIZED
    if _DISTRIBUTED_INITIALIZED or not wants_distributed(config):
        return
    # Cross-process collectives on CPU need an implementation (older JAX has none by default);
    # it must be chosen before the CPU backend starts. GPU and TPU runs ignore it.
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address = config.coordinator_address or None
    num_processes = config.num_processes or None
    process_id = config.process_id if config.process_id >= 0 else None
    env_address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    where = (
        f"coordinator address {address or env_address or 'not set'}, "
        f"process count {num_processes or 'not set'}, "
        f"process id {'not set' if process_id is None else process_id}"
    )
    timeouts = {}
    if config.distributed_timeout:
        # A peer that stops answering for the heartbeat timeout ends every other process (JAX's
        # coordination service terminates it), so a dead host cannot leave the job hanging.
        timeouts = dict(
            initialization_timeout=config.distributed_timeout,
            heartbeat_timeout_seconds=config.distributed_timeout,
            shutdown_timeout_seconds=config.distributed_timeout,
        )
    try:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=num_processes,
            process_id=process_id,
            **timeouts,
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"--distributed: {e} ({where}). Pass --coordinator-address HOST:PORT "
            "--num-processes N --process-id I (the same address and count on every process), "
            "or run under Slurm or Open MPI, where JAX detects them."
        ) from None
    except RuntimeError as e:
        # A coordinator that never answers, or a JAX backend already started.
        raise ConfigError(
            f"--distributed: the multi-process runtime did not start ({where}): {e}\n"
            "Check that every process runs the same command and that process 0 is up and "
            "reachable at the coordinator address."
        ) from None
    _DISTRIBUTED_INITIALIZED = True


# XLA:CPU deadlocks when a few dozen steps that all-reduce across 2 or more devices of one
# process are queued at once: one device's part of a step never starts while the others wait
# for it in the collective (in-process collectives abort after the rendezvous timeout of
# https://github.com/openxla/xla/pull/32115, gloo waits for ever). One device per process, and
# GPU and TPU backends, do not (experiments/benchmarks/cpu_collective_stall.py).
def needs_step_sync(backend: str, process_count: int, device_count: int) -> bool:
    """Whether the host must wait for each train step before dispatching the next: on the CPU
    backend with more than one device per process (`device_count` is the mesh's, every
    process's devices together). Never on GPU or TPU, in one process or many."""
    return backend == "cpu" and device_count > process_count


def is_main_process() -> bool:
    """Whether this process writes files and prints (process 0)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier across processes (nothing in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def create_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D mesh (axis ``'data'``) over the first `num_devices` devices (0: all of them)."""
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ConfigError(
                f"--num-devices {num_devices} asks for more devices than the {len(devices)} "
                "JAX sees. Pass a smaller number, or 0 for all of them."
            )
        if jax.process_count() > 1 and num_devices != len(devices):
            raise ConfigError("A multi-host run uses every device: pass --num-devices 0.")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """``[rows, batch]`` index arrays split along the batch axis."""
    return NamedSharding(mesh, P(None, AXIS))


def put_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global jax.Array from a host array that every process holds in full (multi-host safe)."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def shard_train_step(
    step_fn: Callable,
    mesh: Mesh,
    *,
    seed: int,
    steps_per_epoch: int,
    donate: bool = True,
) -> Callable[[TrainState, jax.Array, jax.Array, jax.Array], tuple[TrainState, Metrics]]:
    """The jitted data-parallel step ``(state, images, labels, epoch_indices) -> (state, metrics)``.

    `images`/`labels` are the whole uint8 training set, replicated on every device;
    `epoch_indices` is the epoch's ``[steps_per_epoch, global_batch]`` index matrix sharded
    along its batch axis. The step picks row ``state.step % steps_per_epoch``, so the host sends
    nothing per step. Each device gathers its share, draws its key from (seed, step, device) and
    runs `step_fn` (from :func:`experiments.steps.make_train_step` with ``axis_name='data'``).
    """

    def device_train_step(state, images, labels, epoch_indices):
        row = jax.lax.rem(state.step, steps_per_epoch)
        indices = jax.lax.dynamic_index_in_dim(epoch_indices, row, axis=0, keepdims=False)
        key = jax.random.fold_in(step_key(seed, state.step), jax.lax.axis_index(AXIS))
        return step_fn(state, jnp.take(images, indices, axis=0), labels[indices], key)

    sharded = jax.shard_map(
        device_train_step,
        mesh=mesh,
        in_specs=(P(), P(), P(), P(None, AXIS)),
        out_specs=(P(), P()),
    )
    return jax.jit(sharded, donate_argnums=(0,) if donate else ())


def shard_evaluate(eval_fn: Callable, mesh: Mesh) -> Callable[..., Metrics]:
    """The jitted data-parallel evaluation ``(state, images, labels, indices, masks) -> sums``.

    `indices`/`masks` are ``[num_batches, batch]`` (from ``data.eval_batches``),
    sharded along the batch axis; one call scans over all batches on the devices.
    """

    def device_evaluate(state, images, labels, indices, masks):
        def body(totals, batch):
            idx, mask = batch
            sums = eval_fn(state, jnp.take(images, idx, axis=0), labels[idx], mask)
            return jax.tree.map(jnp.add, totals, sums), None

        zeros = {k: jnp.zeros([], jnp.float32) for k in ("loss", "correct", "count")}
        totals, _ = jax.lax.scan(body, zeros, (indices, masks))
        return totals

    sharded = jax.shard_map(
        device_evaluate,
        mesh=mesh,
        in_specs=(P(), P(), P(), P(None, AXIS), P(None, AXIS)),
        out_specs=P(),
    )
    return jax.jit(sharded)


def eval_index_arrays(num_examples: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All evaluation batches stacked: ``[num_batches, batch]`` indices and masks."""
    batches = list(data.eval_batches(num_examples, batch_size))
    return np.stack([b[0] for b in batches]), np.stack([b[1] for b in batches])
