"""Smoke tests of the benchmark scripts: each runs at a tiny size (--quick) and writes its files.

No timing is asserted: benchmarks are scripts, their numbers are read by people.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from experiments.benchmarks import common, per_example, run_all, timing, vs_optax_contrib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name: str, out_dir, *extra: str) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            f"experiments.benchmarks.{name}",
            "--quick",
            "--out-dir",
            str(out_dir),
        ]
        + list(extra),
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return process.stdout


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, expected_rows",
    [
        ("overhead", 4),  # four ratios
        ("vs_optax_contrib", 2),  # ours and the peer
        ("gpu_throughput", 6),  # 3 optimizers x 2 batch sizes
        ("scaling", 2),  # 1 and 2 devices
        ("conv_probe", None),  # XLA, and PyTorch where installed
        ("harness_overhead", 3),  # bare, harness, harness_no_bar
        ("switching_cost", 9),  # 9 methods on the MLP
    ],
)
def test_script_runs_and_writes_results(name, expected_rows, tmp_path):
    stdout = run_script(name, tmp_path)
    rows = read_csv(tmp_path / f"{name}_quick.csv")
    assert len(rows) == expected_rows if expected_rows is not None else len(rows) >= 1
    markdown = (tmp_path / f"{name}_quick.md").read_text()
    assert "Machine:" in markdown and "Load average" in markdown and "|---|" in markdown
    payload = json.loads((tmp_path / f"{name}_quick.json").read_text())
    assert payload["machine"]["cpu_cores"] >= 1 and payload["machine"]["jax"]
    assert "Wrote" in stdout
    if name == "overhead":
        # The compiled programs themselves: SAM costs twice SGD's FLOPs, a static rho 0 as SGD.
        ratios = {r["ratio"]: float(r["xla_flops"]) for r in rows}
        assert ratios["sam / (2 x sgd)"] == pytest.approx(1.0, abs=0.02)
        assert ratios["ssam / sam"] == pytest.approx(1.0, abs=0.02)
        assert ratios["rho0 / sgd"] == pytest.approx(1.0, abs=0.02)
    if name == "switching_cost":
        passes = {r["method"]: float(r["gradients_vs_sgd"]) for r in rows}
        assert passes["sgd"] == passes["momentum_sam"] == 1.0 and passes["sam"] == 2.0
        assert passes["every5"] == passes["every5_in_step"] < 1.5
    if name == "harness_overhead":
        assert [r["config"] for r in rows] == ["bare", "harness", "harness_no_bar"]
        assert float(rows[0]["ratio_to_bare"]) == 1.0
        assert all(float(r["images_per_s"]) > 0 for r in rows)


@pytest.mark.slow
def test_vs_torch_runs(tmp_path):
    pytest.importorskip("torch")
    run_script("vs_torch", tmp_path)
    rows = read_csv(tmp_path / "vs_torch_quick.csv")
    assert [r["implementation"] for r in rows] == ["sam_optax (jax.jit)", "torch eager"]
    assert all(float(r["images_per_s"]) > 0 for r in rows)


def test_optax_contrib_adapter_matches_sam_optax():
    """The peer, adapted to a one-argument grad_fn, computes the same SAM update as ours."""
    target = jnp.array([1.0, -2.0, 3.0])

    def loss(p):
        return jnp.sum((p["w"] - target) ** 2 * jnp.array([1.0, 3.0, 0.5]))

    params = {"w": jnp.zeros(3)}
    grad_fn = jax.grad(loss)
    base = optax.sgd(0.1, momentum=0.9)
    ours = optax.chain(sam_optax.sam(0.05), optax.sgd(0.1, momentum=0.9))
    peer = vs_optax_contrib.optax_contrib_sam(0.05, base)
    states = [ours.init(params), peer.init(params)]
    for _ in range(3):
        updates = []
        for i, tx in enumerate((ours, peer)):
            u, states[i] = tx.update(grad_fn(params), states[i], params, grad_fn=grad_fn)
            updates.append(u)
        np.testing.assert_allclose(updates[0]["w"], updates[1]["w"], rtol=1e-6, atol=1e-7)
        params = optax.apply_updates(params, updates[0])


def test_torch_resnet18_matches_flax_parameter_count():
    torch_sam = pytest.importorskip("experiments.benchmarks.torch_sam")
    assert torch_sam.count_parameters(torch_sam.ResNet()) == 11_173_962


def test_torch_sam_restores_weights_and_freezes_bn_in_second_pass():
    torch = pytest.importorskip("torch")
    from experiments.benchmarks import torch_sam

    torch.manual_seed(0)
    model = torch_sam.ResNet(num_blocks=(1,), num_filters=4)
    optimizer = torch_sam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.0)
    images = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3])
    mean, std = torch.tensor(common.CIFAR10_MEAN), torch.tensor(common.CIFAR10_STD)
    before = [p.detach().clone() for p in model.parameters()]
    torch_sam.sam_train_step(model, optimizer, images, labels, mean, std)
    # lr 0: the weights come back exactly from w + e_w; BN stats moved once (momentum 0.1).
    for old, new in zip(before, model.parameters(), strict=True):
        torch.testing.assert_close(old, new, rtol=0, atol=1e-6)
    assert int(model.bn1.num_batches_tracked) == 2  # counted in both passes
    assert model.bn1.momentum == 0.1


def test_interleave_runs_every_config_once_per_round_and_summarizes():
    calls = []
    benches = [timing.Bench(n, lambda n=n: calls.append(n), block=lambda _: None) for n in "abc"]
    samples = timing.interleave(benches, warmup=1, rounds=4, log=lambda _: None)
    rounds = [calls[i : i + 3] for i in range(0, len(calls), 3)]
    assert rounds[0] == list("abc")  # warm-up in the given order
    assert len(rounds) == 5 and all(sorted(r) == list("abc") for r in rounds)
    assert len({tuple(r) for r in rounds[1:]}) > 1  # the order changes between rounds
    assert all(len(v) == 4 for v in samples.values())
    stats = timing.summarize(samples["a"])
    assert stats["n"] == 4 and stats["min_ms"] <= stats["median_ms"] <= stats["p75_ms"] + 1e-9


def test_hlo_op_counts_and_memory_of_a_compiled_function():
    compiled = jax.jit(lambda x: jnp.sin(x) @ x).lower(jnp.ones((4, 4))).compile()
    counts = timing.hlo_op_counts(compiled)
    assert counts["dot"] + counts["custom-call"] + counts["fusion"] >= 1
    memory = timing.memory(compiled)
    assert memory["argument_mib"] > 0 and memory["total_mib"] > 0
    assert timing.cost(compiled)["xla_gflops"] > 0


def test_run_all_lists_every_script():
    cpu = run_all.commands(quick=False, gpu=False, only=None, out_dir=None)
    gpu = run_all.commands(quick=False, gpu=True, only=None, out_dir=None)
    quick = run_all.commands(quick=True, gpu=False, only=None, out_dir="x")
    assert len(quick) == len(run_all.SCRIPTS)
    assert not any("gpu_throughput" in c[2] for c in cpu)
    assert any("gpu_throughput" in c[2] for c in gpu) and all("--quick" in c for c in quick)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: common.positive_ints("1,x", "--ks"), "--ks takes comma-separated positive"),
        (lambda: common.positive_ints("0,2", "--devices"), "--devices takes comma-separated"),
        (lambda: common.model_kwargs("[1"), "--model-kwargs must be a JSON object"),
    ],
)
def test_bad_benchmark_flags_end_with_one_line_and_status_2(call, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_per_example_benchmark_costs_what_its_pass_count_says(tmp_path):
    """In-process, tiny MLP: the one-pass head ascent costs a plain step's FLOPs, the exact
    per-example ascent fewer than two SGD steps' plus the shifts."""
    rows = {r["config"]: r for r in per_example.main(["--quick", "--out-dir", str(tmp_path)])}
    assert set(rows) == set(per_example.CONFIGS)
    assert rows["head1"]["flops_vs_sgd"] <= 1.05
    assert 1.0 < rows["m1_exact"]["flops_vs_sgd"] <= rows["sam"]["flops_vs_sgd"]
    assert (tmp_path / "per_example_quick.md").read_text().count("| m1_exact |") == 1
