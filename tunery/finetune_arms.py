"""The finetune stage's arms: what the pretrain stage and fine-tuning each buy, and the pretrain gate.

- `pipeline`: the configured method on the pretrain stage's output (the main model).
- `base`: the same method, schedule and seed on the pretrain stage's input (`pretrain.base`, or
  random weights of the same architecture when pretraining starts from scratch).
- `full`: full fine-tuning of the chosen encoder, the reference.
- `probe`: frozen mean-pooled embeddings of the chosen encoder + logistic regression.

The gate (`pretrain_gate`) keeps the better of pipeline and base by best validation macro-F1 only;
test and holdout are scored for the table, never used to choose. The table's file (arms.json) is
owned by `tunery.finetuning` (`ARMS_FILE`, `write_arms`, `read_arms`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunery.finetuning import ARM_ORDER, Split, predict_proba, resolve_device

if TYPE_CHECKING:
    from tunery.config import FinetuneConfig

log = logging.getLogger("tunery.finetune")


@dataclass(frozen=True)
class BaseArm:
    """The pretrain stage's input, to fine-tune from for the `base` arm (or why there is none)."""

    encoder: Path | None  # a model dir (its config and tokenizer, at least)
    init: str = "pretrained"  # "random": the architecture of `encoder` with random weights
    skipped: str | None = None  # why there is no base arm


def split_scores(pred: Sequence[int], split: Split) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "macro_f1": round(float(f1_score(split.labels, pred, average="macro", zero_division=0)), 4),
        "accuracy": round(float(accuracy_score(split.labels, pred)), 4),
    }


def score_model(
    model: Any,
    tokenizer: Any,
    splits: Sequence[Split],
    cfg: FinetuneConfig,
    max_length: int,
) -> dict[str, dict[str, float]]:
    """macro-F1 and accuracy of a classifier on each split, keyed by split name."""
    model = getattr(model, "_orig_mod", model)
    device = resolve_device(cfg)
    out = {}
    for split in splits:
        probs = predict_proba(
            model,
            tokenizer,
            split.texts,
            max_length=max_length,
            batch_size=cfg.eval_batch_size,
            device=device,
        )
        out[split.name] = split_scores(probs.argmax(-1), split)
    return out


def probe_arm(
    cfg: FinetuneConfig,
    *,
    encoder: Path,
    init: str,
    tokenizer: Any,
    labels: Sequence[str],
    train_split: Split,
    val_split: Split,
    scored: Sequence[Split],
) -> dict[str, Any]:
    """Frozen encoder, mean-pooled embeddings, logistic regression fit on the train split."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tunery.finetuning import effective_max_length, load_base
    from tunery.pretraining import embed

    model, _ = load_base(encoder, labels, init=init, seed=cfg.seed)
    model.to(resolve_device(cfg))
    max_length = effective_max_length(cfg, "full", model.config)

    def vectors(split: Split) -> Any:
        return embed(
            model, tokenizer, split.texts, max_length=max_length, batch_size=cfg.eval_batch_size
        )

    t0 = time.perf_counter()
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    clf.fit(vectors(train_split), np.asarray(train_split.labels))
    train_seconds = round(time.perf_counter() - t0, 3)
    scores = {s.name: split_scores(clf.predict(vectors(s)), s) for s in (val_split, *scored)}
    head = clf[-1]
    trainable = int(head.coef_.size + head.intercept_.size)
    total = sum(p.numel() for p in model.base_model.parameters()) + trainable
    return arm_record(
        method="probe",
        encoder=encoder,
        init=init,
        scores={k: v for k, v in scores.items() if k != val_split.name},
        best_val_macro_f1=scores[val_split.name]["macro_f1"],
        train_seconds=train_seconds,
        trainable_params=trainable,
        total_params=total,
        epochs=None,
    )


def arm_record(
    *,
    method: str,
    encoder: Path,
    init: str,
    scores: Mapping[str, Mapping[str, float]],
    best_val_macro_f1: float,
    train_seconds: float,
    trainable_params: int,
    total_params: int,
    epochs: float | None,
) -> dict[str, Any]:
    """One row of arms.json."""
    return {
        "method": method,
        "encoder": str(encoder),
        "init": init,
        **{name: dict(s) for name, s in scores.items()},
        "best_val_macro_f1": round(float(best_val_macro_f1), 4),
        "train_seconds": train_seconds,
        "trainable_params": int(trainable_params),
        "trainable_share": round(trainable_params / total_params, 6),
        "params": int(total_params),
        "epochs": epochs,
    }


def pretrain_gate(pipeline_val: float, base_val: float | None, skipped: str | None) -> dict:
    """Keep the better of pipeline and base by validation macro-F1; ties go to the pipeline."""
    if base_val is None:
        return {
            "pipeline_val_macro_f1": round(pipeline_val, 4),
            "base_val_macro_f1": None,
            "decision": f"not applied: {skipped}",
            "applied": False,
            "chosen": "pipeline",
        }
    pv, bv = round(pipeline_val, 4), round(base_val, 4)
    if bv > pv:
        decision = (
            f"pretraining did not help: val macro-F1 {pv:.4f} (pipeline encoder) vs {bv:.4f} "
            "(its base): fine-tuning from the base"
        )
        chosen = "base"
    else:
        decision = (
            f"pretraining kept: val macro-F1 {pv:.4f} (pipeline encoder) vs {bv:.4f} (its base)"
        )
        chosen = "pipeline"
    return {
        "pipeline_val_macro_f1": pv,
        "base_val_macro_f1": bv,
        "decision": decision,
        "applied": True,
        "chosen": chosen,
    }


def arms_table_text(arms: Mapping[str, Mapping[str, Any]]) -> str:
    cols = ("best_val_macro_f1", "trainable_share", "train_seconds")
    lines = [
        f"  {'arm':<9}{'method':<7}{'init':<11}test F1  holdout F1  "
        + "  ".join(f"{c:<17}" for c in cols)
    ]
    for name in ARM_ORDER:
        if name not in arms:
            continue
        a = arms[name]
        lines.append(
            f"  {name:<9}{a['method']:<7}{a['init']:<11}{a['test']['macro_f1']:<9.4f}"
            f"{a['holdout']['macro_f1']:<12.4f}" + "  ".join(f"{a[c]!s:<17}" for c in cols)
        )
    return "\n".join(lines)


def flat_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """Headline numbers for metrics/finetune.json: arms.<name>.<metric>, flat."""
    out: dict[str, Any] = {
        "chosen_arm": report["chosen"],
        "pretrain_gate_applied": report["pretrain_gate"]["applied"],
    }
    for name, a in report["arms"].items():
        for split in ("test", "holdout"):
            out[f"arms.{name}.{split}_macro_f1"] = a[split]["macro_f1"]
        out[f"arms.{name}.best_val_macro_f1"] = a["best_val_macro_f1"]
        out[f"arms.{name}.train_seconds"] = a["train_seconds"]
    return out
