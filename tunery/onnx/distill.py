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

With `quant_aware`, the student trains under `fake_quantized`: every Linear layer sees its input
and weight rounded as onnxruntime's dynamic int8 rounds them in the deployed graph (MatMulInteger /
QAttention after DynamicQuantizeLinear), and its frozen embedding tables as QEmbedLayerNormalization
stores them, with the straight-through estimator for the gradient; the exported model stays a
plain float graph that `quantize_int8_dynamic` then quantizes.
Measured on the demo (`bench/results/prune_recovery-cpu.json`): FFN 50 % removed cost -4.0 pt
macro-F1 on val + test, 300 steps (logits only) brought it back to +0.01 pt.

A short loop rather than `transformers.Trainer`: distillation needs a second model in the loss
(a `compute_loss` override), its batches come from `length_batches` (the compress stage's
unpadded features, padded per batch), and the stage must not write checkpoints or logs of its
own; AdamW and the warm-up/linear-decay schedule are torch's and transformers' own.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
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
    if len(data.encoded) < cfg.batch_size:
        raise TuneryError(
            f"compress.prune.recovery: {len(data.encoded)} training texts, fewer than one batch "
            f"of batch_size={cfg.batch_size}"
        )
    rng = np.random.default_rng(cfg.seed)
    groups = _length_grouped(data, rng, cfg.batch_size)
    batches = (_feed(data, idx) for idx in groups)
    return student, train_towards(student, teacher, batches, cfg, teacher_layers=teacher_layers)


def train_towards(
    student: Any,
    teacher: Any,
    batches: Iterator[tuple[dict, Any]],
    cfg: Any,
    *,
    teacher_layers: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The recovery loop both pipelines share: `cfg.steps` AdamW steps (linear warm-up and
    decay) of `distill_loss` on `batches` ((feed, labels) pairs, drawn lazily: the teacher is in
    eval mode by then), under `fake_quantized` when `cfg.quant_aware`; leaves `student` in eval
    mode and returns what it did (steps, seconds, first/last loss, the settings)."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(cfg.seed)
    teacher.eval()
    student.train()
    opt = torch.optim.AdamW(trained_parameters(student), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(
        opt, int(cfg.warmup_ratio * cfg.steps), max(cfg.steps, 1)
    )
    started, losses = time.monotonic(), []
    quant_aware = getattr(cfg, "quant_aware", False)
    with fake_quantized(student) if quant_aware else contextlib.nullcontext():
        for step in range(cfg.steps):
            feed, labels = next(batches)
            loss = distill_loss(student, teacher, feed, labels, cfg, teacher_layers)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if step % 100 == 0 or step == cfg.steps - 1:
                log.info("prune recovery: step %d/%d loss %.4f", step + 1, cfg.steps, losses[-1])
    student.eval()
    return {
        "steps": cfg.steps,
        "seconds": round(time.monotonic() - started, 1),
        "first_loss": round(losses[0], 5) if losses else None,
        "last_loss": round(float(np.mean(losses[-20:])), 5) if losses else None,
        **cfg.model_dump(exclude={"steps"}),
    }


def trained_parameters(student: Any) -> list[Any]:
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


def distill_loss(
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


# --------------------------------------------------------------------------- fake quantization
# onnxruntime's dynamic int8 (`compress.quantize_int8_dynamic` with per_channel + reduce_range):
# weights symmetric int8 per output channel in the 7-bit range [-64, 64] (scale = max|w| / 64,
# zero point 0); each MatMul's input quantized at run time by DynamicQuantizeLinear, per tensor,
# asymmetric uint8 over [min(x, 0), max(x, 0)]; the embedding tables and their LayerNorm weights
# (QEmbedLayerNormalization) asymmetric uint8 per tensor, quantized once.
_WEIGHT_Q = 64  # reduce_range: int8 weights in [-64, 64]


@contextlib.contextmanager
def fake_quantized(model: Any) -> Iterator[Any]:
    """`model` with its Linear layers' inputs and weights fake-quantized as the int8 graph computes
    them (straight-through gradients: torch's fake_quantize ops) and its embedding parameters
    replaced by their uint8-rounded values; everything is restored on exit.

    Each Linear alone reproduces its int8 node to ~1e-5 of the logits on the demo model; all of
    them at once, rounding differences compound (mean |logit - int8 graph's| 0.066 vs the float
    model's 0.109 on the demo's val + test): the same kind of error, not the same bits."""
    import torch

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    embeddings = getattr(getattr(model, "base_model", None), "embeddings", None)
    saved, tokens = [], {}

    def real_tokens(_module: Any, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        tokens["real"] = None if mask is None else mask.bool()

    hook = model.register_forward_pre_hook(real_tokens, with_kwargs=True)
    try:
        seen = _seen_tokens(model)
        for lin in linears:
            lin.forward = _fake_quant_forward(lin, tokens, seen.get(id(lin), "real"))
        if embeddings is not None:
            with torch.no_grad():
                for p in embeddings.parameters():
                    saved.append((p, p.detach().clone()))
                    p.copy_(fake_quant_uint8(p))
        yield model
    finally:
        hook.remove()
        for lin in linears:
            lin.__dict__.pop("forward", None)
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)


def _seen_tokens(model: Any) -> dict[int, str]:
    """Which positions each Linear's input range covers in the deployed int8 graph: the real
    tokens (`pack_tokens`; padding rows there are copies of real ones) by default; the padded
    batch for the first layer's Q/K/V (the embeddings' output, PAD embeddings included); the
    first token for the last layer's post-attention Linears (`cls_only_tail`). The Q/K/V
    projections are a layer's first three Linear modules (BERT family)."""
    import torch

    layers = getattr(getattr(getattr(model, "base_model", None), "encoder", None), "layer", None)
    if not layers:
        return {}
    seen = {}
    for k, layer in enumerate(layers):
        lins = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        for j, lin in enumerate(lins):
            if j < 3 and k == 0:
                seen[id(lin)] = "padded"
            elif j >= 3 and k == len(layers) - 1:
                seen[id(lin)] = "first"
    return seen


def _fake_quant_forward(lin: Any, tokens: dict, seen: str) -> Any:
    import torch
    import torch.nn.functional as F

    def forward(x: Any) -> Any:
        real = tokens.get("real")
        if x.dim() != 3 or real is None or x.shape[:2] != real.shape or seen == "padded":
            mask = None  # the pooler, the classifier: one row a text
        elif seen == "first":
            mask = torch.zeros_like(real)
            mask[:, 0] = True
        else:
            mask = real
        return F.linear(fake_quant_uint8(x, mask), fake_quant_weight(lin.weight), lin.bias)

    return forward


def fake_quant_weight(w: Any) -> Any:
    """Symmetric per-output-channel int8 in the 7-bit range (a torch Linear's rows)."""
    import torch

    scale = (w.detach().abs().amax(dim=1) / _WEIGHT_Q).clamp_min(1e-12).float()
    zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -_WEIGHT_Q, _WEIGHT_Q)


def fake_quant_uint8(x: Any, mask: Any = None) -> Any:
    """Per-tensor asymmetric uint8 over [min(x, 0), max(x, 0)] (DynamicQuantizeLinear); with
    `mask` (batch, length), the range of the real tokens' values only."""
    import torch

    seen = x.detach() if mask is None else x.detach()[mask]
    lo, hi = seen.min().clamp(max=0), seen.max().clamp(min=0)
    scale = ((hi - lo) / 255).clamp_min(1e-12).float().reshape(1)
    zero = torch.round(-lo / scale).clamp(0, 255).to(torch.int32).reshape(1)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)
