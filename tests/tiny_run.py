"""The command line of a tiny ``experiments.train`` run, shared by the fault tests: a 4-feature
CNN on 64 training images of scikit-learn's digits (offline), 2 steps per epoch on one device."""

from __future__ import annotations

TINY_MODEL = '{"features": [4]}'


def flags(output_dir, *extra: str, epochs: int = 2) -> list[str]:
    """The flags of a tiny run in `output_dir`; later flags in `extra` win."""
    return [
        "--dataset=digits",
        f"--model-kwargs={TINY_MODEL}",
        "--train-size=64",
        "--validation-size=32",
        "--batch-size=32",
        f"--epochs={epochs}",
        "--num-devices=1",
        "--no-progress",
        f"--output-dir={output_dir}",
        *extra,
    ]
