"""SimCLR's view augmentations as batched torch ops (no torchvision), seeded by a generator.

Why not torchvision: its wheels are pinned to one torch release and the mirror's does not match
torch 2.13. Why batched: one `grid_sample` crops, resizes and flips a whole batch, so the views
cost little next to the encoder, on CPU in the collator or on a GPU alike.

Each op draws its randomness from the `torch.Generator` passed in, so a batch's views depend
only on (images, generator state): the collator seeds it from the batch's indices, which makes
the views of a step the same after a resume.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict

from tunery.vision.processor import ProcessorConfig


class AugmentConfig(BaseModel):
    """SimCLR's recipe (Chen et al., 2020) scaled to small grey images; colour drop omitted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    crop_scale: tuple[float, float] = (0.3, 1.0)  # share of the area kept by the crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    brightness: float = 0.4  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.4
    jitter: float = 0.8  # probability that a view is jittered at all
    blur: float = 0.0  # probability of a gaussian blur (SimCLR uses 0.5 on ImageNet)
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    blur_kernel: int = 3


def _uniform(n: int, low: float, high: float, gen: Any, device: Any) -> Any:
    import torch

    return low + (high - low) * torch.rand(n, generator=gen, device=device)


def resized_crop_flip(x: Any, cfg: AugmentConfig, gen: Any) -> Any:
    """A random crop of each image (area share and aspect drawn per image), resized back to the
    input size, mirrored with probability `flip`: one affine grid per image, one grid_sample."""
    import torch
    import torch.nn.functional as F

    n, dev = x.shape[0], x.device
    area = _uniform(n, *cfg.crop_scale, gen, dev)
    log_ratio = _uniform(n, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), gen, dev)
    ratio = log_ratio.exp()
    w = (area * ratio).sqrt().clamp(max=1.0)  # width and height as shares of the image
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=gen, device=dev) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=gen, device=dev) * 2 - 1) * (1 - h)
    sign = torch.where(torch.rand(n, generator=gen, device=dev) < cfg.flip, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def jitter(x01: Any, cfg: AugmentConfig, gen: Any) -> Any:
    """Brightness then contrast factors per image on [0, 1] pixels, with probability `jitter`."""
    import torch

    n, dev = x01.shape[0], x01.device
    on = (torch.rand(n, generator=gen, device=dev) < cfg.jitter).to(x01.dtype)
    b = 1 + on * _uniform(n, -cfg.brightness, cfg.brightness, gen, dev)
    c = 1 + on * _uniform(n, -cfg.contrast, cfg.contrast, gen, dev)
    x01 = x01 * b.view(-1, 1, 1, 1)
    mean = x01.mean(dim=(1, 2, 3), keepdim=True)
    return ((x01 - mean) * c.view(-1, 1, 1, 1) + mean).clamp(0.0, 1.0)


def blur(x: Any, cfg: AugmentConfig, gen: Any) -> Any:
    """A separable gaussian blur, sigma per image, applied with probability `blur`: one grouped
    convolution over the batch (each image's channels get its own kernel)."""
    import torch
    import torch.nn.functional as F

    n, c, height, width = x.shape
    dev, k = x.device, cfg.blur_kernel
    sigma = _uniform(n, *cfg.blur_sigma, gen, dev)
    on = torch.rand(n, generator=gen, device=dev) < cfg.blur
    offsets = torch.arange(k, device=dev, dtype=x.dtype) - (k - 1) / 2
    kernel = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    identity = (offsets == 0).to(x.dtype).expand(n, k)
    kernel = torch.where(on.view(-1, 1), kernel, identity).repeat_interleave(c, dim=0)
    flat = F.pad(x.reshape(1, n * c, height, width), [k // 2] * 4, mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, k), groups=n * c)
    flat = F.conv2d(flat, kernel.view(n * c, 1, k, 1), groups=n * c)
    return flat.view(n, c, height, width)


def augment(pixel_values: Any, cfg: AugmentConfig, processor: ProcessorConfig, gen: Any) -> Any:
    """One random view of each normalised image: crop+flip, jitter on [0, 1], blur, re-normalise.

    The shape (and the normalisation of the processor) is kept, so a view is a valid model input.
    """
    from tunery.vision.processor import denormalise, scale_normalise

    x01 = denormalise(resized_crop_flip(pixel_values, cfg, gen), processor).clamp(0.0, 1.0)
    x01 = jitter(x01, cfg, gen)
    if cfg.blur > 0:
        x01 = blur(x01, cfg, gen)
    return scale_normalise(x01, processor)


def generator(seed: int, device: Any = "cpu") -> Any:
    """A `torch.Generator` seeded with `seed` on `device`."""
    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen
