"""Distillation recovery of a pruned image ViT towards the unpruned fine-tune.

The loop and the loss are the text recovery's (`tunery.onnx.distill.train_towards` and
`distill_loss`: temperature-scaled KL to the teacher's logits, the cross-entropy share, the normalized per-layer hidden-state MSE with kept
layers mapped to the teacher layers they were copied from), and so is what is trained (all but
the embeddings, `distill.trained_parameters`). What differs is the feed: `distill.recover` draws
length-grouped batches of token features with labels (`RecoveryData`); here a batch is
`pixel_values` drawn at random from images that need no label — the unlabelled pool SimCLR
learned from plus the train split — with the teacher's argmax standing in for the label in the
cross-entropy share (`kd_weight` 1, the default here, leaves it out).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tunery.errors import TuneryError


def recover(
    student: Any,
    teacher: Any,
    pixel_values: Any,
    cfg: Any,
    *,
    teacher_layers: Sequence[int] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train `student` (in place) towards `teacher` for `cfg.steps` batches of `cfg.batch_size`
    images of `pixel_values` (a float tensor `[N, C, H, W]`) with the text recovery's loop
    (`distill.train_towards`); returns it in eval mode and what the recovery did (steps, images,
    seconds, first/last loss, the settings)."""
    from tunery.onnx import distill

    if len(pixel_values) < cfg.batch_size:
        raise TuneryError(
            f"compress.prune.recovery: {len(pixel_values)} images, fewer than one batch of "
            f"batch_size={cfg.batch_size}"
        )
    rng = np.random.default_rng(cfg.seed)
    batches = (
        _with_teacher_labels(teacher, pixel_values[idx])
        for idx in _batches(len(pixel_values), cfg.batch_size, rng)
    )
    record = distill.train_towards(student, teacher, batches, cfg, teacher_layers=teacher_layers)
    return student, {"images": len(pixel_values), **record}


def _with_teacher_labels(teacher: Any, x: Any) -> tuple[dict[str, Any], Any]:
    """A batch's feed and the teacher's argmax as its labels (the images need none)."""
    import torch

    with torch.no_grad():
        labels = teacher(pixel_values=x).logits.argmax(-1)
    return {"pixel_values": x}, labels


def _batches(n: int, size: int, rng: np.random.Generator) -> Any:
    """Index batches of `size`, each pass a new permutation, whole batches only, endlessly."""
    import torch

    while True:
        order = rng.permutation(n)
        for start in range(0, n - size + 1, size):
            yield torch.from_numpy(order[start : start + size])
