"""The image pretraining objectives' settings, apart from `tunery.vision.simclr` and
`tunery.vision.mae` (which import torch and transformers), so that reading `vision/params.yaml`
costs no torch import (`tunery.vision.params`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class PretrainSchedule(BaseModel):
    """A pretraining run's schedule and budget, whichever the objective
    (`tunery.vision.pretrain_loop.fit`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_size: int = 256  # the global batch (under torchrun each process takes its share)
    learning_rate: float = 1.0e-3
    weight_decay: float = 0.05
    warmup_share: float = 0.05
    max_steps: int = 200
    max_minutes: float | None = None  # a wall-clock cap on top of max_steps
    save_steps: int = 0  # 0: no intermediate checkpoints
    logging_steps: int = 10
    seed: int = 0


class SimCLRSettings(PretrainSchedule):
    """SimCLR: two augmented views a batch, NT-Xent over the global batch."""

    temperature: float = 0.2
    projection_dim: int = 64
    pooling: Literal["cls", "mean"] = "mean"


class MAESettings(PretrainSchedule):
    """MAE: mask `mask_ratio` of the patches, reconstruct their pixels with a small decoder.
    The encoder is the ViT of `pretrain.vit` (or the base's); the decoder is thrown away."""

    mask_ratio: float = 0.75
    decoder_hidden_size: int = 64
    decoder_layers: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True  # each masked patch's target normalised by its own mean and std
