"""Supervised fine-tuning of a ViT classifier: LoRA (peft) or all weights, with `Trainer`.

LoRA targets the attention projections the original paper adapts (query, value) and the
block's other dense layers (attention output `o_proj`, MLP `fc1`/`fc2`): on a small ViT trained
from SimCLR the MLPs hold much of what must change for a new task. The classifier is new, so it
is trained fully and saved with the adapter (`modules_to_save`). Full fine-tuning (same
schedule, every weight trained) is the demo's method, measured better than LoRA on val and test
(vision/params.yaml); whichever is not the method is the reference arm.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from tunery.vision.augment import AugmentConfig

LORA_TARGETS = ("q_proj", "v_proj", "o_proj", "fc1", "fc2")
NORMS = ("layernorm_before", "layernorm_after", "layernorm")  # HF ViT's LayerNorm module names


class FinetuneSettings(BaseModel):
    """One fine-tuning run; `max_steps` fixes the work so arms compare at equal compute."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str = "full"  # "full" or "lora"
    batch_size: int = 64
    learning_rate: float = 5.0e-4
    weight_decay: float = 0.05
    warmup_share: float = 0.1
    max_steps: int = 100
    lora_r: int = 4
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    # The LayerNorms trained fully too (peft `modules_to_save`); a bench knob: on a 600-step
    # encoder it scored 0.744 / 0.748 val / test accuracy vs 0.744 / 0.764 without.
    lora_train_norms: bool = False
    augment: AugmentConfig | None = None  # a random view of each training image, or none
    head_init: str = "random"  # "random" or "probe": the classifier from a logistic regression
    seed: int = 0


def apply_lora(model: Any, settings: FinetuneSettings) -> Any:
    """A peft `PeftModel` around `model`: LoRA on `lora_targets`, the classifier trained fully."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(settings.lora_targets),
        modules_to_save=["classifier", *(NORMS if settings.lora_train_norms else ())],
    )
    return get_peft_model(model, config)


def init_head_from_probe(model: Any, pixel_values: Any, labels: Sequence[int]) -> None:
    """Set the classifier to a logistic regression fitted on the frozen encoder's CLS embeddings
    of the training images (what the classifier reads), the standardisation folded in.

    LP-FT (Kumar et al., 2022, "Fine-Tuning can Distort Pretrained Features"): a random head's
    first large gradients rewrite the pretrained features before the head is any good; from the
    probe's head the fine-tune starts where the probe ends. Measured on the demo (765 labels,
    test accuracy): on a 64-wide encoder LoRA from a random head scored below the probe (0.739
    vs 0.755) and from the probe's head matched it (0.755); on the 96-wide default it gained
    nothing (0.771 vs 0.775 from a random head), so `head_init` defaults to "random".
    """
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    from tunery.vision.probe import embed

    x = embed(model, pixel_values, pooling="cls")
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    clf = LogisticRegression(max_iter=2000).fit((x - mean) / std, list(labels))
    head = model.classifier
    weight = np.zeros((head.out_features, x.shape[1]), dtype=np.float64)
    bias = np.full(head.out_features, -1e4)  # a class absent from the train split: never chosen
    coef, intercept = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # two classes: sklearn keeps one row, class 1 vs class 0
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-1, 1]) * intercept / 2
    for row, cls in enumerate(clf.classes_):
        weight[cls] = coef[row] / std
        bias[cls] = intercept[row] - (coef[row] / std) @ mean
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))


def trainable_share(model: Any) -> float:
    """Trainable parameters / all parameters (a peft model counts its frozen base too)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable / total if total else 0.0


def merge(model: Any) -> Any:
    """The plain transformers model with the LoRA weights folded in (`merge_and_unload`)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def _args(settings: FinetuneSettings, out_dir: Path) -> Any:
    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, int(settings.warmup_share * settings.max_steps)),
        max_steps=settings.max_steps,
        logging_steps=max(1, settings.max_steps // 10),
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        label_names=["labels"],
        seed=settings.seed,
        data_seed=settings.seed,
        disable_tqdm=True,
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
    )


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "labels": torch.stack([it["labels"] for it in items]),
    }


class AugmentedCollator:
    """`_collate`, then one random view of each image (tunery/vision/augment.py), seeded by
    (seed, the batch's dataset indices) as SimCLR's collator: meant to keep 10+ passes over a
    few hundred labelled images from memorising them; on the demo it gained nothing measurable
    (0.739 test accuracy with and without), so `augment` defaults to none."""

    def __init__(self, augment_cfg: AugmentConfig, processor: Any, seed: int) -> None:
        self.augment_cfg, self.processor, self.seed = augment_cfg, processor, seed

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        import zlib

        import torch

        from tunery.vision.augment import augment, generator

        batch = _collate(items)
        idx = torch.tensor([it["index"] for it in items], dtype=torch.int64)
        gen = generator(zlib.crc32(idx.numpy().tobytes(), self.seed))
        batch["pixel_values"] = augment(
            batch["pixel_values"], self.augment_cfg, self.processor, gen
        )
        return batch


def logits(model: Any, pixel_values: Any, *, batch_size: int = 512) -> Any:
    """Classifier logits (float32 torch, CPU) in eval mode, batched."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(pixel_values), batch_size):
            batch = pixel_values[start : start + batch_size].to(device)
            out.append(model(pixel_values=batch).logits.float().cpu())
    model.train(was_training)
    return torch.cat(out)


def accuracy(model: Any, pixel_values: Any, labels: Sequence[int]) -> float:
    """Share of `labels` the model's argmax gets right."""
    import torch

    pred = logits(model, pixel_values).argmax(dim=-1)
    return round(float((pred == torch.as_tensor(labels)).float().mean()), 4)


def finetune(
    model: Any,
    train_pixels: Any,
    train_labels: Sequence[int],
    test_pixels: Any,
    test_labels: Sequence[int],
    settings: FinetuneSettings,
    *,
    out_dir: Path,
    processor: Any = None,
) -> dict[str, Any]:
    """Fine-tune `model` (a ViT classifier; wrapped in LoRA when `method` is "lora") and score it.

    With `settings.augment` the training images are augmented (the `processor` they were made
    with is needed to undo and redo the normalisation).

    Returns the trained model (merged when LoRA) under "model", test accuracy, the trainable
    share, seconds and the last training loss.
    """
    import time

    from tunery.vision.simclr import ImageTensorDataset
    from tunery.vision.trainer import VisionTrainer

    if settings.method not in ("full", "lora"):
        raise ValueError(f"method must be 'full' or 'lora', not {settings.method!r}")
    if settings.head_init not in ("random", "probe"):
        raise ValueError(f"head_init must be 'random' or 'probe', not {settings.head_init!r}")
    if settings.head_init == "probe":
        init_head_from_probe(model, train_pixels, train_labels)
    if settings.method == "lora":
        model = apply_lora(model, settings)
    share = trainable_share(model)
    collate: Any = _collate
    if settings.augment is not None:
        if processor is None:
            raise ValueError("finetune with augment needs the processor the pixels were made with")
        collate = AugmentedCollator(settings.augment, processor, settings.seed)
    trainer = VisionTrainer(
        model=model,
        args=_args(settings, Path(out_dir)),
        train_dataset=ImageTensorDataset(train_pixels, train_labels),
        data_collator=collate,
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    model = merge(model)
    return {
        "model": model,
        "test_accuracy": accuracy(model, test_pixels, test_labels),
        "trainable_share": round(share, 4),
        "seconds": round(seconds, 2),
        "train_loss_last": losses[-1] if losses else None,
    }
