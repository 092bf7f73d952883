"""Distillation recovery of a pruned classifier towards the unpruned one (the compress stage's
`prune.recovery`).

Structured pruning (`tunery.onnx.compress.prune_heads/prune_ffn`) removes whole heads and FFN
neurons; the few hundred steps here let the rest of the network take over their work. Per step, a
batch of training texts goes through the teacher (the unpruned fine-tune, frozen) and the student
(the pruned copy); the loss is

    kd_weight · T² · KL(softmax(teacher/T) || softmax(student/T))   (Hinton et al. 2015)
  + (1 - kd_weight) · cross-entropy(student, label)
  + hidden_weight · mean over layers of MSE(student hidden state, teacher hidden state)

the last term (layer-wise distillation as in TinyBERT / the "prune, then distill" recipes) on the
real tokens only, each layer's MSE divided by the teacher's mean square there, so that every layer
weighs alike. Pruning heads and FFN neurons keeps the hidden size, so the states compare directly;
when whole layers were dropped, each kept layer is compared with the teacher layer it was copied
from (`teacher_layers`).
The embeddings stay frozen (pruning leaves them as they are); batches are length-grouped.
Measured on the demo (`bench/results/prune_recovery-cpu.json`): FFN 50 % removed cost -4.0 pt
macro-F1 on val + test, 300 steps (logits only) brought it back to +0.01 pt.

A short loop rather than `transformers.Trainer`: distillation needs a second model in the loss
(a `compute_loss` override), its batches come from `length_batches` (the compress stage's
unpadded features, padded per batch), and the stage must not write checkpoints or logs of its
own; AdamW and the warm-up/linear-decay schedule are torch's and transformers' own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tunery.errors import TuneryError

log = logging.getLogger("tunery.compress")


@dataclass(frozen=True)
class RecoveryData:
    """What the student learns from: the training texts (unpadded features) and their labels."""

    encoded: Sequence[dict[str, list[int]]]
    labels: np.ndarray
    input_names: Sequence[str]


def recover(
    student: Any,
    teacher: Any,
    data: RecoveryData,
    cfg: Any,
    *,
    teacher_layers: Sequence[int] | None = None,
) -> tuple[Any, dict]:
    """Train `student` (in place) towards `teacher` for `cfg.steps` steps; returns it in eval mode
    and what the recovery did (steps, seconds, first/last loss).

    `teacher_layers[i]`: the teacher layer whose hidden state student layer i is compared with
    (the layer it was copied from when layers were dropped); default: the same index."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    if len(data.encoded) < cfg.batch_size:
        raise TuneryError(
            f"compress.prune.recovery: {len(data.encoded)} training texts, fewer than one batch "
            f"of batch_size={cfg.batch_size}"
        )
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    teacher.eval()
    student.train()
    opt = torch.optim.AdamW(_trained(student), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(
        opt, int(cfg.warmup_ratio * cfg.steps), max(cfg.steps, 1)
    )
    started, losses = time.monotonic(), []
    batches = _length_grouped(data, rng, cfg.batch_size)
    for step in range(cfg.steps):
        feed, labels = _feed(data, next(batches))
        loss = _loss(student, teacher, feed, labels, cfg, teacher_layers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 100 == 0 or step == cfg.steps - 1:
            log.info("prune recovery: step %d/%d loss %.4f", step + 1, cfg.steps, losses[-1])
    student.eval()
    record = {
        "steps": cfg.steps,
        "seconds": round(time.monotonic() - started, 1),
        "first_loss": round(losses[0], 5) if losses else None,
        "last_loss": round(float(np.mean(losses[-20:])), 5) if losses else None,
        **cfg.model_dump(exclude={"steps"}),
    }
    return student, record


def _trained(student: Any) -> list[Any]:
    """The student's parameters but its embeddings (frozen): pruning does not touch them, and
    their AdamW update (the 30k-word matrix holds half of MiniLM's weights) is cost for nothing."""
    embeddings = getattr(getattr(student, "base_model", None), "embeddings", None)
    frozen = set()
    if embeddings is not None:
        for p in embeddings.parameters():
            p.requires_grad_(False)
            frozen.add(id(p))
    return [p for p in student.parameters() if id(p) not in frozen]


def _length_grouped(data: RecoveryData, rng: np.random.Generator, size: int) -> Any:
    """Batches of row indices, endlessly: each pass shuffles the rows, sorts each chunk of 50
    batches by length and shuffles the batches (transformers' `LengthGroupedSampler` scheme), so
    a batch pads to texts of similar length: on the demo's glosses (median ~15 tokens, a long
    tail to 128) random batches padded to ~3x the real tokens."""
    lengths = np.array([len(e["input_ids"]) for e in data.encoded])
    while True:
        order = rng.permutation(len(lengths))
        chunk = 50 * size
        groups = []
        for start in range(0, len(order), chunk):
            part = order[start : start + chunk]
            part = part[np.argsort(lengths[part], kind="stable")]
            groups += [part[k : k + size] for k in range(0, len(part), size)]
        for g in rng.permutation(len(groups)):
            if len(groups[g]) == size:  # whole batches only
                yield groups[g]


def _feed(data: RecoveryData, idx: np.ndarray) -> tuple[dict, Any]:
    import torch

    from tunery.onnx.runtime import length_batches

    _, feed = next(
        length_batches([data.encoded[i] for i in idx], len(idx), data.input_names, sort=False)
    )
    return {k: torch.from_numpy(v) for k, v in feed.items()}, torch.from_numpy(data.labels[idx])


def _loss(
    student: Any,
    teacher: Any,
    feed: dict,
    labels: Any,
    cfg: Any,
    teacher_layers: Sequence[int] | None = None,
) -> Any:
    import torch
    import torch.nn.functional as F

    hidden = cfg.hidden_weight > 0
    with torch.no_grad():
        t_out = teacher(**feed, output_hidden_states=hidden)
    s_out = student(**feed, output_hidden_states=hidden)
    temp = cfg.temperature
    kd = F.kl_div(
        F.log_softmax(s_out.logits / temp, -1),
        F.softmax(t_out.logits / temp, -1),
        reduction="batchmean",
    ) * (temp * temp)
    loss = cfg.kd_weight * kd + (1 - cfg.kd_weight) * F.cross_entropy(s_out.logits, labels)
    if hidden:
        mask = feed["attention_mask"].bool() if "attention_mask" in feed else None
        t_hidden = t_out.hidden_states[1:]
        if teacher_layers is not None:
            t_hidden = [t_hidden[i] for i in teacher_layers]
        loss = loss + cfg.hidden_weight * _hidden_mse(s_out.hidden_states[1:], t_hidden, mask)
    return loss


def _hidden_mse(student: Sequence[Any], teacher: Sequence[Any], mask: Any) -> Any:
    """Mean over the layers (the layers' outputs, embeddings excluded: they are not pruned) of
    the MSE on real tokens, each divided by the teacher's mean square at that layer."""
    terms = []
    for s, t in zip(student, teacher, strict=True):
        if mask is not None:
            s, t = s[mask], t[mask]
        terms.append(((s - t) ** 2).mean() / (t**2).mean().clamp_min(1e-8))
    return sum(terms) / len(terms)
