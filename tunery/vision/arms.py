"""The image fine-tune stage's work: the method on the pretrained encoder (SimCLR's or MAE's), and
the arms it is judged by.

Arms, all with the same steps, schedule, seed and classifier initialisation:

  probe     the pretrained encoder frozen, logistic regression on its pooled embeddings
  base      the method (full in the demo, or LoRA) on the weights pretraining started from
  pipeline  the same method on the pretrained encoder
  full      every weight trained, on the encoder the pretrain gate chose (the reference)
  lora      with `method: full` (the demo's default) only: LoRA on that encoder, so the
            table shows the PEFT alternative next to the full fine-tune that is shipped

The pretrain gate: the better of pipeline and base by val macro-F1 is shipped; when base wins,
pretraining steps aside and the decision says so (arms.json, the log, the stage-value table).
With `ablations: false` only the pipeline arm trains and nothing is gated.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tunery.evaluation.metrics import classification_metrics

log = logging.getLogger("tunery.finetune")

SCORED = ("val", "test", "holdout")
ARM_ORDER = ("probe", "base", "pipeline", "full", "lora")


def settings_for(cfg: Any, method: str) -> Any:
    """The `FinetuneSettings` of one arm (the method's learning rate, the shared schedule)."""
    from tunery.vision.finetune import FinetuneSettings

    return FinetuneSettings(
        method=method,
        batch_size=cfg.batch_size,
        learning_rate=cfg.lora.learning_rate if method == "lora" else cfg.full.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_share=cfg.warmup_share,
        max_steps=cfg.max_steps,
        lora_r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        augment=cfg.augment,
        head_init=cfg.head_init,
        seed=cfg.seed,
    )


def scores(pred: np.ndarray, y: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    report = classification_metrics(y.tolist(), pred.tolist(), labels)
    return {"macro_f1": round(report["macro_f1"], 4), "accuracy": round(report["accuracy"], 4)}


def train_arm(
    base_dir: Path, method: str, cfg: Any, processor: Any, labels: list[str], data: dict
) -> tuple[Any, dict[str, Any]]:
    """Fine-tune a classifier on `base_dir`'s encoder; the merged model and its record."""
    from tunery.vision.finetune import finetune, logits
    from tunery.vision.vit import build_classifier

    model = build_classifier(processor, labels, base_dir=base_dir, seed=cfg.seed)
    train_x, train_y = data["train"]
    val_x, val_y = data["val"]
    with tempfile.TemporaryDirectory(prefix="tunery-vision-ft-") as work:
        r = finetune(
            model,
            train_x,
            train_y,
            val_x,
            val_y,
            settings_for(cfg, method),
            out_dir=Path(work),
            processor=processor,
        )
    model = r["model"]
    record: dict[str, Any] = {
        "method": method,
        "trainable_share": r["trainable_share"],
        "train_seconds": r["seconds"],
        "train_loss_last": r["train_loss_last"],
        "params": sum(p.numel() for p in model.parameters()),
    }
    for split in SCORED:
        x, y = data[split]
        record[split] = scores(logits(model, x).argmax(-1).numpy(), y, labels)
    return model, record


def probe_arm(encoder_dir: Path, labels: list[str], data: dict) -> dict[str, Any]:
    """Logistic regression on the frozen pretrained encoder's embeddings (train -> each split)."""
    import time

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tunery.vision.probe import embed
    from tunery.vision.simclr import ViTForSimCLR

    t0 = time.perf_counter()
    encoder = ViTForSimCLR.from_pretrained(encoder_dir, attn_implementation="eager")
    pooling = encoder.config.simclr_pooling
    train_x, train_y = data["train"]
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(embed(encoder, train_x, pooling=pooling), train_y)
    record: dict[str, Any] = {"method": "probe", "trainable_share": None}
    for split in SCORED:
        x, y = data[split]
        record[split] = scores(clf.predict(embed(encoder, x, pooling=pooling)), y, labels)
    record["train_seconds"] = round(time.perf_counter() - t0, 2)
    return record


def gate(pipeline: dict, base: dict, method: str, objective: str = "simclr") -> dict[str, Any]:
    """The pretrain gate on val macro-F1: does the pretrained encoder beat its starting weights?"""
    from tunery.vision.encoder_dir import objective_name

    name = objective_name(objective)
    p, b = pipeline["val"]["macro_f1"], base["val"]["macro_f1"]
    pays = p >= b
    diff = 100 * (p - b)
    if pays:
        decision = (
            f"{name} pays: {method} val macro-F1 {p:.4f} vs {b:.4f} from its starting weights "
            f"({diff:+.1f} pt); the pretrained encoder is shipped"
        )
    else:
        decision = (
            f"{name} does NOT pay: {method} val macro-F1 {p:.4f} vs {b:.4f} from its starting "
            f"weights ({diff:+.1f} pt); pretraining steps aside, the fine-tune without it is shipped"
        )
    return {
        "applied": True,
        "pays": pays,
        "val_macro_f1_diff_pt": round(diff, 2),
        "decision": decision,
    }


def run_arms(
    cfg: Any,
    processor: Any,
    labels: list[str],
    data: dict,
    *,
    init_dir: Path,
    pretrained_dir: Path,
    objective: str = "simclr",
) -> tuple[Any, dict[str, Any]]:
    """Every arm; returns the shipped model and arms.json's content."""
    arms: dict[str, Any] = {}
    pipeline_model, arms["pipeline"] = train_arm(
        pretrained_dir, cfg.method, cfg, processor, labels, data
    )
    _log_arm("pipeline", arms["pipeline"])
    if not cfg.ablations:
        return pipeline_model, {
            "arms": arms,
            "chosen": "pipeline",
            "pretrain_gate": {"applied": False},
        }
    arms["probe"] = probe_arm(pretrained_dir, labels, data)
    _log_arm("probe", arms["probe"])
    base_model, arms["base"] = train_arm(init_dir, cfg.method, cfg, processor, labels, data)
    _log_arm("base", arms["base"])
    decision = gate(arms["pipeline"], arms["base"], cfg.method, objective)
    log.info("pretrain gate: %s", decision["decision"])
    chosen = "pipeline" if decision["pays"] else "base"
    shipped = pipeline_model if chosen == "pipeline" else base_model
    encoder = pretrained_dir if chosen == "pipeline" else init_dir
    if cfg.method == "full":  # the method is the reference; LoRA on the same encoder is shown
        arms["full"] = dict(arms[chosen])
        _, arms["lora"] = train_arm(encoder, "lora", cfg, processor, labels, data)
        _log_arm("lora", arms["lora"])
    else:
        _, arms["full"] = train_arm(encoder, "full", cfg, processor, labels, data)
        _log_arm("full", arms["full"])
    ordered = {k: arms[k] for k in ARM_ORDER if k in arms}
    return shipped, {"arms": ordered, "chosen": chosen, "pretrain_gate": decision}


def _log_arm(name: str, record: dict[str, Any]) -> None:
    log.info(
        "arm %-8s val macro-F1 %.4f, holdout %.4f (accuracy %.4f), %s s",
        name,
        record["val"]["macro_f1"],
        record["holdout"]["macro_f1"],
        record["holdout"]["accuracy"],
        record.get("train_seconds"),
    )
