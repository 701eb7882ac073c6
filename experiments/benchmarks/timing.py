"""Timing and compiled-step analysis of the benchmark scripts.

Timing protocol: every configuration is compiled first (compile time reported apart), then all
configurations run round-robin, one step each per round, in a random order every round, so slow
drifts of the machine (other jobs, thermal state) and the step before hit them alike. Each step
is timed to ``jax.block_until_ready`` of its outputs, in wall-clock time and in process CPU time
(all threads); the ratios are those of the medians after warm-up. On a shared machine the
CPU-time ratio is the steadier one: it does not count the time other processes hold the cores.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

# --------------------------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sample:
    """One timed step: wall-clock seconds, process CPU seconds (all threads), and the seconds
    until the call returned (host-side dispatch, before the device finished)."""

    wall_s: float
    cpu_s: float
    dispatch_s: float


@dataclasses.dataclass
class Bench:
    """One configuration under test: `step()` launches one step and returns what to wait for;
    `block(out)` waits for it (``jax.block_until_ready`` by default)."""

    name: str
    step: Callable[[], Any]
    block: Callable[[Any], Any] = jax.block_until_ready

    def timed_step(self) -> Sample:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        out = self.step()
        dispatched = time.perf_counter()
        self.block(out)
        wall1, cpu1 = time.perf_counter(), time.process_time()
        return Sample(wall1 - wall0, cpu1 - cpu0, dispatched - wall0)


def interleave_with_args(
    benches: Sequence[Bench], args: Any, log: Callable[[str], None] = print, seed: int = 0
) -> dict[str, list[Sample]]:
    """:func:`interleave` with the rounds and time limit of the common command-line flags."""
    return interleave(
        benches,
        warmup=args.warmup,
        rounds=args.rounds,
        max_seconds=None if args.max_minutes is None else 60 * args.max_minutes,
        log=log,
        seed=seed,
    )


def interleave(
    benches: Sequence[Bench],
    *,
    warmup: int,
    rounds: int,
    max_seconds: float | None = None,
    min_rounds: int = 3,
    log: Callable[[str], None] = print,
    seed: int = 0,
) -> dict[str, list[Sample]]:
    """Runs the configurations round-robin and returns each one's timed samples.

    `warmup` rounds are run and dropped. Then up to `rounds` rounds are timed, fewer when
    `max_seconds` (counted from the first timed round) runs out, but never fewer than
    `min_rounds`. Each round runs the configurations in a fresh random order (seeded): a fixed
    or rotating order would always put the same configuration after the same one, and a step
    can be slowed by the one before it (memory freed and faulted in again, caches).
    """
    order_rng = random.Random(seed)
    samples: dict[str, list[Sample]] = {b.name: [] for b in benches}
    for r in range(warmup):
        for bench in benches:
            sample = bench.timed_step()
            log(f"  warm-up {r + 1}/{warmup} {bench.name:<28} {sample.wall_s * 1e3:10.1f} ms")
    start = time.perf_counter()
    for r in range(rounds):
        if (
            max_seconds is not None
            and r >= min_rounds
            and time.perf_counter() - start > max_seconds
        ):
            log(f"  time budget of {max_seconds:.0f} s spent after {r} rounds")
            break
        for bench in order_rng.sample(list(benches), len(benches)):
            samples[bench.name].append(bench.timed_step())
        log(
            f"  round {r + 1}/{rounds}: "
            + ", ".join(f"{n} {s[-1].wall_s * 1e3:.0f} ms" for n, s in samples.items())
        )
    return samples


def summarize(samples: Sequence[Sample]) -> dict[str, float]:
    """Medians (and min, quartiles) of a configuration's samples, in milliseconds."""
    walls = [s.wall_s * 1e3 for s in samples]
    quartiles = statistics.quantiles(walls, n=4) if len(walls) > 1 else [walls[0]] * 3
    return {
        "n": len(samples),
        "median_ms": statistics.median(walls),
        "min_ms": min(walls),
        "p25_ms": quartiles[0],
        "p75_ms": quartiles[2],
        "cpu_median_ms": statistics.median(s.cpu_s * 1e3 for s in samples),
        "dispatch_median_ms": statistics.median(s.dispatch_s * 1e3 for s in samples),
    }


def samples_rows(samples: Mapping[str, Sequence[Sample]], **labels: Any) -> list[dict[str, Any]]:
    """The raw samples as rows (for the results JSON)."""
    return [
        {**labels, "config": name, "index": i, **dataclasses.asdict(s)}
        for name, values in samples.items()
        for i, s in enumerate(values)
    ]


# --------------------------------------------------------------------------------------------
# Compiled-step analysis.
# --------------------------------------------------------------------------------------------


def compile_timed(jitted: Callable, *args: Any) -> tuple[Any, float]:
    """``jitted.lower(*args).compile()`` and the seconds it took (tracing included)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def cost(compiled: Any) -> dict[str, float]:
    """XLA's cost analysis of a compiled executable: FLOPs and bytes accessed per call."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per computation
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    return {
        "xla_gflops": float(analysis.get("flops", float("nan"))) / 1e9,
        "xla_gbytes_accessed": float(analysis.get("bytes accessed", float("nan"))) / 1e9,
    }


def memory(compiled: Any) -> dict[str, float]:
    """The compiled executable's memory analysis in MiB: arguments, outputs, temporaries,
    aliased (donated) bytes and their total argument + output + temp - alias."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    mib = 2**20
    argument = stats.argument_size_in_bytes
    output = stats.output_size_in_bytes
    temp = stats.temp_size_in_bytes
    alias = stats.alias_size_in_bytes
    return {
        "argument_mib": argument / mib,
        "output_mib": output / mib,
        "temp_mib": temp / mib,
        "alias_mib": alias / mib,
        "total_mib": (argument + output + temp - alias) / mib,
    }


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\s([a-z][a-z0-9\-]*)\(")


def hlo_op_counts(compiled: Any) -> collections.Counter:
    """How often each HLO opcode occurs in the optimized module (fused computations included)."""
    counts: collections.Counter = collections.Counter()
    for line in compiled.as_text().splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            counts[match.group(1)] += 1
    return counts


HLO_OPS_OF_INTEREST = (
    "convolution",
    "custom-call",
    "dot",
    "fusion",
    "conditional",
    "while",
    "all-reduce",
    "reduce",
    "copy",
)
