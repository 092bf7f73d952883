"""Distillation recovery of a pruned image ViT towards the unpruned fine-tune.

The loss is the text recovery's (`tunery.onnx.distill.distill_loss`: temperature-scaled KL to the
teacher's logits, the cross-entropy share, the normalized per-layer hidden-state MSE with kept
layers mapped to the teacher layers they were copied from), and so is what is trained (all but
the embeddings, `distill.trained_parameters`). What differs is the feed: `distill.recover` draws
length-grouped batches of token features with labels (`RecoveryData`); here a batch is
`pixel_values` drawn at random from images that need no label — the unlabelled pool SimCLR
learned from plus the train split — with the teacher's argmax standing in for the label in the
cross-entropy share (`kd_weight` 1, the default here, leaves it out).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from tunery.errors import TuneryError

log = logging.getLogger("tunery.compress")


def recover(
    student: Any,
    teacher: Any,
    pixel_values: Any,
    cfg: Any,
    *,
    teacher_layers: Sequence[int] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train `student` (in place) towards `teacher` for `cfg.steps` batches of `cfg.batch_size`
    images of `pixel_values` (a float tensor `[N, C, H, W]`); returns it in eval mode and what
    the recovery did (steps, seconds, first/last loss, the settings)."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from tunery.onnx import distill

    if len(pixel_values) < cfg.batch_size:
        raise TuneryError(
            f"compress.prune.recovery: {len(pixel_values)} images, fewer than one batch of "
            f"batch_size={cfg.batch_size}"
        )
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    teacher.eval()
    student.train()
    opt = torch.optim.AdamW(
        distill.trained_parameters(student), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    sched = get_linear_schedule_with_warmup(
        opt, int(cfg.warmup_ratio * cfg.steps), max(cfg.steps, 1)
    )
    started, losses = time.monotonic(), []
    batches = _batches(len(pixel_values), cfg.batch_size, rng)
    for step in range(cfg.steps):
        x = pixel_values[next(batches)]
        with torch.no_grad():
            labels = teacher(pixel_values=x).logits.argmax(-1)
        loss = distill.distill_loss(
            student, teacher, {"pixel_values": x}, labels, cfg, teacher_layers
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 100 == 0 or step == cfg.steps - 1:
            log.info("prune recovery: step %d/%d loss %.4f", step + 1, cfg.steps, losses[-1])
    student.eval()
    return student, {
        "steps": cfg.steps,
        "images": len(pixel_values),
        "seconds": round(time.monotonic() - started, 1),
        "first_loss": round(losses[0], 5) if losses else None,
        "last_loss": round(float(np.mean(losses[-20:])), 5) if losses else None,
        **cfg.model_dump(exclude={"steps"}),
    }


def _batches(n: int, size: int, rng: np.random.Generator) -> Any:
    """Index batches of `size`, each pass a new permutation, whole batches only, endlessly."""
    import torch

    while True:
        order = rng.permutation(n)
        for start in range(0, n - size + 1, size):
            yield torch.from_numpy(order[start : start + size])
