"""SimCLR's settings, apart from `tunery.vision.simclr` (which imports torch and transformers), so
that reading `vision/params.yaml` costs no torch import (`tunery.vision.params`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class SimCLRSettings(BaseModel):
    """The pretraining run: schedule, budget and the objective's knobs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_size: int = 256
    learning_rate: float = 1.0e-3
    weight_decay: float = 0.05
    warmup_share: float = 0.05
    max_steps: int = 200
    max_minutes: float | None = None  # a wall-clock cap on top of max_steps (single process)
    temperature: float = 0.2
    projection_dim: int = 64
    pooling: Literal["cls", "mean"] = "mean"
    save_steps: int = 0  # 0: no intermediate checkpoints
    logging_steps: int = 10
    seed: int = 0
