"""Bad input on the command line of ``experiments.train``: exit status 2 and one ``error:``
message that says what to do (flag errors list every bad flag, one per line, as do the fields a
resume would change), never a traceback, and nothing written.

Each case runs ``experiments.train.main`` in this process on scikit-learn's digits (offline) or
on a data folder made here; the resume cases start from one short run made once.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct

import numpy as np
import pytest
from tiny_run import TINY_MODEL, flags

from experiments import run_dir
from experiments import train as train_cli

TINY = flags(None)[:-1]  # without --output-dir


def fails(argv: list[str], capsys) -> str:
    """Runs the command line, expects exit status 2; returns the message."""
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch-size=0"], "--batch-size"),
        (["--batch-size=-32"], "--batch-size"),
        (["--batch-size=30", "--num-devices=4"], "does not divide by the 4 devices"),
        (["--batch-size=128"], "--batch-size"),  # 64 training images
        (["--epochs=0"], "--epochs"),
        (["--label-noise=1.0"], "--label-noise"),
        (["--label-noise=-0.1"], "--label-noise"),
        (['--model-kwargs={"features": [4], "widht": 2}'], "widht"),
        (["--model-kwargs=[4]"], "--model-kwargs"),
        (["--distributed-timeout=-1"], "--distributed-timeout"),
    ],
    ids=[
        "batch-0",
        "batch-negative",
        "batch-not-divisible",
        "batch-larger-than-data",
        "epochs-0",
        "label-noise-1",
        "label-noise-negative",
        "model-kwargs-unknown-key",
        "model-kwargs-not-a-dict",
        "distributed-timeout-negative",
    ],
)
def test_bad_flag(tmp_path, capsys, extra, message):
    output_dir = tmp_path / "run"
    err = fails([*TINY, f"--output-dir={output_dir}", *extra], capsys)
    assert message in err, err
    assert not output_dir.exists()


def _idx(shape: tuple[int, ...], payload: bytes | None = None) -> bytes:
    """An IDX file of unsigned bytes (the MNIST format): magic, dimensions, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, len(shape)) + struct.pack(f">{len(shape)}I", *shape)
    size = int(np.prod(shape))
    return header + (bytes(size) if payload is None else payload)


def _fashion_mnist_folder(folder, damage: str):
    folder.mkdir()
    files = {
        "train-images-idx3-ubyte": _idx((10, 28, 28)),
        "train-labels-idx1-ubyte": _idx((10,)),
        "t10k-images-idx3-ubyte": _idx((10, 28, 28)),
        "t10k-labels-idx1-ubyte": _idx((10,)),
    }
    if damage == "truncated":
        files["train-images-idx3-ubyte"] = files["train-images-idx3-ubyte"][:500]
    elif damage == "garbage-gz":
        files = {name + ".gz": b"not gzip at all" for name in files}
    elif damage == "truncated-gz":
        files = {name + ".gz": gzip.compress(content)[:40] for name, content in files.items()}
    elif damage == "wrong-shape":
        files["train-images-idx3-ubyte"] = _idx((10, 8, 8))
    elif damage == "label-count":
        files["train-labels-idx1-ubyte"] = _idx((9,))
    elif damage == "missing-file":
        del files["t10k-labels-idx1-ubyte"]
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder


@pytest.mark.parametrize(
    "damage",
    ["truncated", "garbage-gz", "truncated-gz", "wrong-shape", "label-count", "missing-file"],
)
def test_damaged_data_folder(tmp_path, capsys, damage):
    data_dir = _fashion_mnist_folder(tmp_path / "data", damage)
    output_dir = tmp_path / "run"
    argv = [
        "--dataset=fashion_mnist",
        f"--data-dir={data_dir}",
        "--batch-size=2",
        "--validation-size=2",
        f"--output-dir={output_dir}",
    ]
    err = fails(argv, capsys)
    assert str(data_dir) in err and err.count("\n") == 1, err
    assert not output_dir.exists()


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped after epoch 1 of 2, to resume."""
    output_dir = tmp_path_factory.mktemp("stopped") / "run"
    assert not train_cli.main([*TINY, f"--output-dir={output_dir}", "--stop-after-epoch=1"])[
        "completed"
    ]
    return output_dir


@pytest.fixture
def run_copy(stopped_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(stopped_run, copy)
    return copy


@pytest.mark.parametrize(
    "extra, fields",
    [
        (["--learning-rate=0.2"], ["learning_rate"]),
        (["--seed=1", "--optimizer=sam"], ["seed", "optimizer"]),
    ],
    ids=["learning-rate", "seed-and-optimizer"],
)
def test_resume_with_flags_that_change_the_run(run_copy, capsys, extra, fields):
    before = sorted(os.listdir(run_copy))
    err = fails([*TINY, f"--output-dir={run_copy}", "--resume", *extra], capsys)
    # One line per differing field after the first.
    assert all(field in err for field in fields) and "--overwrite" in err, err
    assert sorted(os.listdir(run_copy)) == before


def _edit_config(path, edit):
    with open(path) as f:
        saved = json.load(f)
    edit(saved)
    with open(path, "w") as f:
        json.dump(saved, f)


@pytest.mark.parametrize("damage", ["truncated", "not-an-object", "wrong-type"])
def test_hand_edited_config_json(run_copy, capsys, damage):
    path = run_copy / run_dir.CONFIG_FILE
    if damage == "truncated":
        path.write_text(path.read_text()[:40])
    elif damage == "not-an-object":
        path.write_text("[1, 2, 3]")
    else:
        _edit_config(path, lambda c: c.update(epochs="two"))
    err = fails([*TINY, f"--output-dir={run_copy}", "--resume"], capsys)
    assert ("config.json" in err or "epochs: saved 'two'" in err) and "--overwrite" in err, err


def test_config_json_keys_that_are_no_flags_do_not_block_a_resume(run_copy):
    # config.json also records what is no flag (the device count); such keys are not compared.
    _edit_config(run_copy / run_dir.CONFIG_FILE, lambda c: c.update(no_such_flag=1))
    assert train_cli.main([*TINY, f"--output-dir={run_copy}", "--resume"])["completed"]


@pytest.mark.parametrize("damage", ["truncated-row", "garbage", "not-objects"])
def test_hand_edited_metrics_jsonl_resumes_or_refuses(run_copy, capsys, damage):
    path = run_copy / run_dir.METRICS_JSONL
    if damage == "truncated-row":
        path.write_text(path.read_text()[:-20])
    elif damage == "garbage":
        path.write_text("\x00\x01 binary garbage\n")
    else:
        path.write_text("[1, 2]\n3\n")
    # A run's metrics are rebuilt from what is readable; the checkpoint holds the state.
    summary = train_cli.main([*TINY, f"--output-dir={run_copy}", "--resume"])
    assert summary["completed"]
    with open(path) as f:
        epochs = [json.loads(line)["epoch"] for line in f]
    assert epochs[-1] == 2 and "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dataset=fashion_mnist", "--data-dir=/nonexistent"], "--data-dir /nonexistent does"),
        (['--model-kwargs={"features": "x"}'], "'features' of small_cnn takes a list of integers"),
        (["--cutout=8"], "--cutout 8 blanks every 8x8 image of digits"),
        (["--lr-schedule=multistep"], "--lr-schedule multistep needs --lr-milestones"),
        (["--warmup-epochs=2"], "--warmup-epochs 2 must be below --epochs 2"),
        (["--stop-after-epoch=3"], "--stop-after-epoch 3 lies after the last epoch"),
        (["--optimizer=sgd", "--rho=0.1"], "--rho 0.1 needs a SAM optimizer"),
        (["--epochs=-1"], "--epochs must be >= 1, got -1."),
        (["--learning-rate=nan"], "--learning-rate must be a finite number, got nan."),
    ],
    ids=lambda value: value[-1].split("=")[0].lstrip("-") if isinstance(value, list) else None,
)
def test_a_setting_that_cannot_be_meant_is_one_line(tmp_path, capsys, monkeypatch, extra, message):
    from experiments import trainer

    def no_data(config):
        raise AssertionError("the data was read")

    monkeypatch.setattr(trainer, "load_dataset", no_data)
    output_dir = tmp_path / "run"
    err = fails([*TINY, f"--output-dir={output_dir}", *extra], capsys)
    assert message in err and err.count("\n") == 1, err
    assert not output_dir.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--optimizer=adam"], "argument --optimizer: invalid choice: 'adam'"),
        (["--epocs=3"], "unrecognized arguments: --epocs=3 (did you mean --epochs?)"),
        (["--preset=nosuch"], "argument --preset: invalid choice: 'nosuch'"),
        (["--epochs=abc"], "argument --epochs: invalid int value: 'abc'"),
    ],
)
def test_argparse_errors_are_the_usage_line_and_the_error(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main([*TINY, f"--output-dir={tmp_path / 'run'}", *extra])
    usage, error, rest = capsys.readouterr().err.split("\n", 2)
    assert exit_info.value.code == 2
    assert usage.startswith("usage: python -m experiments.train ") and "--help" in usage
    assert error.startswith("error: ") and message in error and rest == ""
    assert not (tmp_path / "run").exists()


def test_the_run_header_says_which_copy_was_read(tmp_path, capsys, fashion_dir):
    argv = [
        "--dataset=fashion_mnist",
        f"--data-dir={fashion_dir}",
        f"--model-kwargs={TINY_MODEL}",
        "--validation-size=16",
        "--batch-size=16",
        "--epochs=1",
        "--num-devices=1",
        "--no-progress",
        f"--output-dir={tmp_path / 'run'}",
    ]
    assert train_cli.main(argv)["completed"]
    header = next(line for line in capsys.readouterr().out.splitlines() if "parameters |" in line)
    assert f"fashion_mnist from {fashion_dir}: 80 training, 16 validation and 40 test" in header
    assert "Dataset(" not in header
