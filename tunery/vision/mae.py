"""MAE (He et al., 2022) for the ViT: transformers' `ViTMAEForPreTraining`, the second image
pretraining objective (`pretrain.objective: mae`).

Each image's patches are shuffled by a noise vector; the encoder sees the first 1 - `mask_ratio`
of them (with the CLS token), a small decoder reconstructs the pixels of the rest, and the loss
is their mean squared error (each patch's target normalised by its own mean and variance with
`norm_pix_loss`). No augmentation: the masking is the task. The noise is made in the collator,
seeded by the batch's dataset indices, so a resumed run masks as the uninterrupted one would
have; training is the image objectives' one loop (`tunery.vision.pretrain_loop.fit`).

The encoder's weight names are `ViTModel`'s under `vit` (the same keys, checked in
`encoder_weights`), so MAE starts from the weights SimCLR would start from (the `init/` folder:
same architecture, same seed) and its trained encoder is written into the same encoder folder
format (`tunery/vision/encoder_dir.py`). One difference: MAE's position embedding is fixed 2-D
sin-cos (not trained), the ViT's is learned; the encoder folder carries MAE's sin-cos values,
which fine-tuning then trains like any other weight.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import torch

from tunery.vision.augment import generator
from tunery.vision.settings import MAESettings

POSITIONS = "vit.embeddings.position_embeddings"  # MAE's fixed sin-cos, not the start's


def mae_config(vit_config: Any, settings: MAESettings) -> Any:
    """A `ViTMAEConfig` whose encoder is `vit_config`'s ViT, with `settings`' decoder."""
    from transformers import ViTMAEConfig

    keep = (
        "image_size",
        "patch_size",
        "num_channels",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_act",
        "layer_norm_eps",
        "qkv_bias",
        "initializer_range",
    )
    config = ViTMAEConfig(
        **{k: getattr(vit_config, k) for k in keep},
        hidden_dropout_prob=vit_config.hidden_dropout_prob,
        attention_probs_dropout_prob=vit_config.attention_probs_dropout_prob,
        decoder_hidden_size=settings.decoder_hidden_size,
        decoder_num_hidden_layers=settings.decoder_layers,
        decoder_num_attention_heads=settings.decoder_heads,
        decoder_intermediate_size=2 * settings.decoder_hidden_size,
        mask_ratio=settings.mask_ratio,
        norm_pix_loss=settings.norm_pix_loss,
    )
    config._attn_implementation = "eager"
    return config


def build_mae(start: Any, settings: MAESettings) -> Any:
    """A `ViTMAEForPreTraining` whose encoder starts from `start`'s (a `ViTForSimCLR`: the
    `init/` weights) but for the position embedding; the decoder from `settings.seed`."""
    from transformers import ViTMAEForPreTraining

    torch.manual_seed(settings.seed)
    mae = ViTMAEForPreTraining(mae_config(start.config, settings))
    weights = {k: v for k, v in encoder_weights(start).items() if k != POSITIONS}
    missing, unexpected = mae.load_state_dict(weights, strict=False)
    if unexpected or any(k.startswith("vit.") and k != POSITIONS for k in missing):
        raise ValueError(f"the ViT's weights do not fit MAE's encoder: {unexpected or missing}")
    return mae


def encoder_weights(model: Any) -> dict[str, torch.Tensor]:
    """The `vit.*` weights of a `ViTForSimCLR` or a `ViTMAEForPreTraining` (the same names)."""
    return {k: v for k, v in model.state_dict().items() if k.startswith("vit.")}


def into_encoder(mae: Any, encoder: Any) -> Any:
    """`encoder` (a `ViTForSimCLR` of the same size) with MAE's trained encoder weights; its
    projection head, which no reader of the encoder folder uses, is left as it was."""
    weights = encoder_weights(mae)
    if set(weights) != set(encoder_weights(encoder)):
        raise ValueError("MAE's encoder and the ViT differ in their weight names")
    encoder.load_state_dict(weights, strict=False)
    return encoder


class MAECollator:
    """Stack a batch and draw its masking noise, seeded by (seed, the batch's indices)."""

    def __init__(self, patches: int, seed: int) -> None:
        self.patches, self.seed = patches, seed

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        x = torch.stack([it["pixel_values"] for it in items])
        idx = torch.tensor([it["index"] for it in items], dtype=torch.int64)
        gen = generator(zlib.crc32(idx.numpy().tobytes(), self.seed))
        return {"pixel_values": x, "noise": torch.rand(len(items), self.patches, generator=gen)}


def pretrain(
    mae: Any,
    pixel_values: torch.Tensor,
    settings: MAESettings,
    *,
    out_dir: Path,
    resume: str | None = None,
) -> dict[str, Any]:
    """Train `mae` on unlabelled `pixel_values` (`pretrain_loop.fit`); save it to `out_dir/model`."""
    from tunery.vision.pretrain_loop import fit
    from tunery.vision.simclr import ImageTensorDataset

    patches = (mae.config.image_size // mae.config.patch_size) ** 2
    collator = MAECollator(patches, settings.seed)
    return fit(
        mae,
        ImageTensorDataset(pixel_values),
        collator,
        settings,
        out_dir=out_dir,
        resume=resume,
        what="pretrain mae",
    )
