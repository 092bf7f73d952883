"""PIL images -> `pixel_values`: the one preprocessing the model, its ONNX graph and `predict` share.

Why a small module of our own and not `ViTImageProcessor`: the contract must be written into the
model manifest and re-implemented by whoever feeds the ONNX graph, so every step is named here
(mode conversion, resize, scale, normalise) with no hidden defaults (transformers' processor
rescales, may crop and picks ImageNet statistics unless told otherwise).

Contract (`contract(cfg)`): input `pixel_values`, float32, NCHW `[batch, channels, size, size]`;
each image converted to "L" (channels 1, ITU-R 601-2 luma) or "RGB" (channels 3), resized to
size x size with bilinear resampling (aspect ratio not kept: squashed, never cropped), scaled to
[0, 1] (uint8 / 255), then `(x - mean[c]) / std[c]` per channel.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

# Fashion-MNIST's training-set statistics (the demo's default: grey, 28x28).
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
INPUT_NAME = "pixel_values"


class ProcessorConfig(BaseModel):
    """How images become `pixel_values`: written once, read by training, export and predict."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int = 28
    channels: Literal[1, 3] = 1
    mean: tuple[float, ...] = FASHION_MNIST_MEAN
    std: tuple[float, ...] = FASHION_MNIST_STD

    @model_validator(mode="after")
    def _per_channel(self) -> ProcessorConfig:
        if self.size < 1:
            raise ValueError(f"size must be positive, not {self.size}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean and std need one value per channel ({self.channels}), "
                f"not {len(self.mean)} and {len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, not {self.std}")
        return self

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"


def contract(cfg: ProcessorConfig) -> dict[str, Any]:
    """The ONNX input contract as the model manifest will carry it (JSON-ready)."""
    return {
        "name": INPUT_NAME,
        "dtype": "float32",
        "layout": "NCHW",
        "shape": ["batch", cfg.channels, cfg.size, cfg.size],
        "preprocessing": {
            "mode": cfg.mode,
            "resize": {"size": [cfg.size, cfg.size], "resample": "bilinear", "keep_aspect": False},
            "scale": 1.0 / 255.0,
            "mean": list(cfg.mean),
            "std": list(cfg.std),
        },
    }


def from_contract(contract_: dict[str, Any]) -> ProcessorConfig:
    """The ProcessorConfig a manifest's "processor" was written from (the inverse of `contract`):
    how a predictor rebuilds the preprocessing a graph was trained with."""
    try:
        pre = contract_["preprocessing"]
        size = pre["resize"]["size"]
        cfg = ProcessorConfig(
            size=int(size[0]),
            channels=int(contract_["shape"][1]),
            mean=tuple(pre["mean"]),
            std=tuple(pre["std"]),
        )
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ValueError(f"not a pixel_values contract: {exc}") from None
    if contract(cfg) != contract_:
        raise ValueError("the contract names preprocessing this version does not implement")
    return cfg


def _array(image: Any, cfg: ProcessorConfig) -> Any:
    import numpy as np
    from PIL import Image

    img = image if image.mode == cfg.mode else image.convert(cfg.mode)
    if img.size != (cfg.size, cfg.size):
        img = img.resize((cfg.size, cfg.size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def process(images: Iterable[Any], cfg: ProcessorConfig) -> Any:
    """`pixel_values` float32 `[N, C, size, size]` of PIL images (any mode PIL converts)."""
    import numpy as np
    import torch

    arrays = [_array(img, cfg) for img in images]
    if not arrays:
        return torch.zeros((0, cfg.channels, cfg.size, cfg.size), dtype=torch.float32)
    return normalise(torch.from_numpy(np.stack(arrays)), cfg)


def _stats(cfg: ProcessorConfig, like: Any) -> tuple[Any, Any]:
    import torch

    kw = {"dtype": like.dtype, "device": like.device}
    mean = torch.tensor(cfg.mean, **kw).view(1, -1, 1, 1)
    return mean, torch.tensor(cfg.std, **kw).view(1, -1, 1, 1)


def normalise(pixels: Any, cfg: ProcessorConfig) -> Any:
    """uint8 `[N, C, H, W]` (already at size and mode) -> normalised float32: the last step."""
    import torch

    return scale_normalise(pixels.to(torch.float32) / 255.0, cfg)


def scale_normalise(x01: Any, cfg: ProcessorConfig) -> Any:
    """[0, 1] float pixels -> `(x - mean) / std` per channel."""
    mean, std = _stats(cfg, x01)
    return (x01 - mean) / std


def denormalise(pixel_values: Any, cfg: ProcessorConfig) -> Any:
    """Normalised `pixel_values` back to [0, 1]: augmentations jitter brightness there."""
    mean, std = _stats(cfg, pixel_values)
    return pixel_values * std + mean


def process_paths(paths: Sequence[Any], cfg: ProcessorConfig, *, batch_size: int = 512) -> Any:
    """`pixel_values` of image files, opened through the data layer's `open_image` in batches
    (so only `batch_size` decoded images are held at a time)."""
    import torch

    from tunery.data.images import open_image

    chunks = []
    for start in range(0, len(paths), batch_size):
        chunks.append(process([open_image(p) for p in paths[start : start + batch_size]], cfg))
    return torch.cat(chunks) if chunks else process([], cfg)
