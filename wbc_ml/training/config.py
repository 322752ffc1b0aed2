"""What a training run is asked to do."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ARCHITECTURES = ("enhanced_cnn_v2", "mobilenet_v2_head", "mobilenet_v2_finetuned")

Log = Callable[[str], None]


@dataclass
class TrainConfig:
    arch: str
    data_dir: Path
    out_dir: Path
    epochs: int = 40
    batch_size: int = 32
    imagenet_weights: str | None = None
    patience: int = 6
    seed: int = 1234
    input_size: tuple[int, int] | None = None
    augment_copies: int = 4
    augmentation: str = "mild"  # a key of augmentation.AUGMENTATIONS; "travel" was measured and not adopted (README)
    finetune_epochs: int = 10
    max_per_class: int | None = None
    cache_dir: Path | None = None
    command: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {ARCHITECTURES}")
        if self.input_size is None:
            self.input_size = (96, 96) if self.arch == "enhanced_cnn_v2" else (224, 224)
