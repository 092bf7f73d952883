"""ViT models from a small config (from scratch, CPU-sized) or from a local base folder.

From scratch: 28x28 grey images in 4x4 patches are a 49-token sequence (+ CLS); a 4-layer,
64-wide encoder trains at hundreds of images/s on two CPU cores, which is what the demo needs.
From a base folder: `from_pretrained(..., local_files_only=True)` so a missing folder fails
here instead of reaching for the hub. Either way the encoder sits under the attribute `vit`
(transformers' `base_model_prefix`), so a SimCLR checkpoint loads into a classifier directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from tunery.vision.processor import ProcessorConfig


class VitSpec(BaseModel):
    """A from-scratch ViT's size; the image side (size, channels) comes from the processor."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    patch_size: int = 4
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    mlp_ratio: int = 2
    dropout: float = 0.0

    @model_validator(mode="after")
    def _divisible(self) -> VitSpec:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        return self


def vit_config(spec: VitSpec, processor: ProcessorConfig, **extra: Any) -> Any:
    """A `ViTConfig` for `spec` at the processor's image size and channels.

    Eager attention: at 50 tokens SDPA buys nothing on CPU, and the eager graph exports to ONNX
    opset 17 as plain MatMul/Softmax that onnxruntime's optimizer recognises.
    """
    from transformers import ViTConfig

    if processor.size % spec.patch_size:
        raise ValueError(
            f"image size {processor.size} is not a multiple of patch_size {spec.patch_size}"
        )
    config = ViTConfig(
        image_size=processor.size,
        patch_size=spec.patch_size,
        num_channels=processor.channels,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        intermediate_size=spec.hidden_size * spec.mlp_ratio,
        hidden_dropout_prob=spec.dropout,
        attention_probs_dropout_prob=spec.dropout,
        **extra,
    )
    config._attn_implementation = "eager"
    return config


def label_maps(labels: Sequence[str]) -> dict[str, Any]:
    """The `id2label`/`label2id` a classifier config carries (so exports name their classes)."""
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def check_base(base_dir: Path, processor: ProcessorConfig) -> Any:
    """The base folder's `ViTConfig`, refused when it does not take the processor's images."""
    from transformers import ViTConfig

    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"{base_dir}: no config.json (a ViT base folder is expected)")
    config = ViTConfig.from_pretrained(base_dir, local_files_only=True)
    if config.num_channels != processor.channels or config.image_size != processor.size:
        raise ValueError(
            f"{base_dir}: the base takes {config.num_channels}x{config.image_size}px images, "
            f"the processor makes {processor.channels}x{processor.size}px"
        )
    return config


def build_model(
    model_class: Any,
    processor: ProcessorConfig,
    *,
    spec: VitSpec | None = None,
    base_dir: Path | None = None,
    seed: int = 0,
    **config_extra: Any,
) -> Any:
    """`model_class` (ViTModel, ViTForImageClassification, ViTForSimCLR) from scratch or a base.

    With `base_dir` the encoder's weights come from there and any head absent from it (a new
    classifier, a SimCLR projection) is initialised from `seed`; without, all weights are.
    """
    import torch

    torch.manual_seed(seed)
    if base_dir is None:
        return model_class(vit_config(spec or VitSpec(), processor, **config_extra))
    check_base(base_dir, processor)
    return model_class.from_pretrained(
        base_dir,
        local_files_only=True,
        attn_implementation="eager",
        ignore_mismatched_sizes=True,
        **config_extra,
    )


def build_classifier(
    processor: ProcessorConfig,
    labels: Sequence[str],
    *,
    spec: VitSpec | None = None,
    base_dir: Path | None = None,
    seed: int = 0,
) -> Any:
    """A `ViTForImageClassification` (CLS token -> linear head) for `labels`."""
    from transformers import ViTForImageClassification

    return build_model(
        ViTForImageClassification,
        processor,
        spec=spec,
        base_dir=base_dir,
        seed=seed,
        **label_maps(labels),
    )


def encoder_of(model: Any) -> Any:
    """The `ViTModel` inside a classifier, SimCLR model or peft wrapper (or the model itself)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "vit", base)


def pool(hidden: Any, how: str) -> Any:
    """One vector per image: the CLS token ("cls") or the mean over the patch tokens ("mean")."""
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        return hidden[:, 1:].mean(dim=1)
    raise ValueError(f"pooling must be 'cls' or 'mean', not {how!r}")
