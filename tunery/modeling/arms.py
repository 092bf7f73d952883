"""The finetune stage's arms: what the pretrain stage and fine-tuning each buy, and the pretrain gate.

- `pipeline`: the configured method on the pretrain stage's output (the main model).
- `base`: the same method, schedule and seed on the pretrain stage's input (`pretrain.base`, or
  random weights of the same architecture when pretraining starts from scratch).
- `full`: full fine-tuning of the chosen encoder, the reference.
- `probe`: frozen mean-pooled embeddings of the chosen encoder + logistic regression.

The gate (`pretrain_gate`) keeps the better of pipeline and base by best validation macro-F1 only;
test and holdout are scored for the table, never used to choose. The table's file (arms.json) is
owned by `tunery.modeling.finetune_dir` (`ARMS_FILE`, `write_arms`, `read_arms`).

`train_arms` trains them all (the finetune stage's work); `train_variant` is one arm's training.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunery.data.labelled import Split
from tunery.modeling.devices import resolve_device
from tunery.modeling.finetune_dir import ARM_ORDER
from tunery.modeling.methods import (
    build_model,
    effective_max_length,
    load_base,
    trainable_parameters,
)
from tunery.modeling.predict import predict_proba
from tunery.modeling.trainer import TrainResult, train
from tunery.modeling.training import arm_resume_dir

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

    from tunery.modeling.objectives import embed

    model, _ = load_base(encoder, labels, init=init, seed=cfg.seed)
    model.to(resolve_device(cfg))
    max_length = effective_max_length(cfg, "full", model.config)

    batch = cfg.eval_batch_size
    t0 = time.perf_counter()
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    clf.fit(
        embed(model, tokenizer, train_split.texts, max_length=max_length, batch_size=batch),
        np.asarray(train_split.labels),
    )
    train_seconds = round(time.perf_counter() - t0, 3)
    scores = {
        s.name: split_scores(
            clf.predict(embed(model, tokenizer, s.texts, max_length=max_length, batch_size=batch)),
            s,
        )
        for s in (val_split, *scored)
    }
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


# --------------------------------------------------------------------------- training the arms
@dataclass(frozen=True)
class Inputs:
    """What every arm trains and is scored on."""

    labels: list[str]
    train_split: Split
    val_split: Split
    scored: list[Split]  # test and holdout: scored for the table, never used to choose


@dataclass
class Candidate:
    """A trained arm: its result, statistics, and the encoder (+ tokenizer) it started from."""

    result: TrainResult
    stats: dict[str, Any]
    encoder: Path
    init: str
    tokenizer: Any


@dataclass
class Outcome:
    """The chosen arm and the arms table (`report`: chosen, pretrain_gate, arms)."""

    chosen: Candidate
    report: dict[str, Any] = field(default_factory=dict)


def total_steps(cfg: FinetuneConfig, n_train: int, epochs: float) -> int:
    return max(1, math.ceil(math.ceil(n_train / cfg.batch_size) * epochs))


def train_variant(
    cfg: FinetuneConfig,
    *,
    method: str,
    init: str,
    encoder: Path,
    tokenizer: Any,
    labels: list[str],
    train_split: Split,
    val_split: Split,
    warm_start: Path | None = None,
    checkpoint_dir: Path | None = None,
    epochs: float | None = None,
    on_log: Any = None,
    callbacks: tuple = (),
    arm: str = "pipeline",
) -> tuple[TrainResult, dict[str, Any]]:
    """One arm: build the model for `method` on `encoder`, train it, and its statistics."""
    from tunery.modeling.callbacks import StepProgress

    epochs = cfg.epochs if epochs is None else epochs
    model = build_model(
        cfg,
        method=method,
        encoder=encoder,
        labels=labels,
        init=init,
        warm_start=warm_start,
        total_steps=total_steps(cfg, len(train_split), epochs),
    )
    trainable, total = trainable_parameters(model)
    log.info(
        "%s (%s encoder): %d trainable of %d parameters (%.2f %%)",
        method,
        init,
        trainable,
        total,
        100 * trainable / total,
    )
    max_length = effective_max_length(cfg, method, model.config)
    result = train(
        model,
        tokenizer,
        cfg,
        method=method,
        train_split=train_split,
        val_split=val_split,
        checkpoint_dir=checkpoint_dir,
        max_length=max_length,
        epochs=epochs,
        on_log=on_log,
        callbacks=(*callbacks, StepProgress(f"finetune {arm} arm ({method})")),
    )
    return result, variant_stats(
        result, method=method, init=init, trainable=trainable, total=total, max_length=max_length
    )


def variant_stats(
    result: TrainResult, *, method: str, init: str, trainable: int, total: int, max_length: int
) -> dict[str, Any]:
    return {
        "method": method,
        "init": init,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": round(trainable / total, 6),
        "best_val_macro_f1": round(result.best_val_macro_f1, 4),
        "epochs": round(result.epochs, 2),
        "steps": result.steps,
        "train_seconds": result.train_seconds,
        "samples_per_s": result.samples_per_s,
        "tokens_per_s": result.tokens_per_s,
        "padding_share": result.padding_share,
        "peak_memory_mb": result.peak_memory_mb,
        "memory_delta_mb": result.memory_delta_mb,
        "resumed_from": result.resumed_from,
        "max_length": max_length,
    }


def train_arms(
    cfg: FinetuneConfig,
    inputs: Inputs,
    *,
    encoder: Path,
    tokenizer: Any,
    base: BaseArm | None,
    warm: Path | None,
    checkpoint_dir: Path,
    on_log: Any = None,
    callbacks: tuple = (),
) -> Outcome:
    """The pipeline arm, the base arm and the pretrain gate, then (ablations on) probe and full."""
    common = dict(labels=inputs.labels, train_split=inputs.train_split, val_split=inputs.val_split)
    # pipeline arm: the main model; every arm resumes from its own last complete checkpoint
    result, stats = train_variant(
        cfg,
        method=cfg.method,
        init="pretrained",
        encoder=encoder,
        tokenizer=tokenizer,
        warm_start=warm,
        checkpoint_dir=checkpoint_dir,
        on_log=on_log,
        callbacks=callbacks,
        **common,
    )
    # Scored now: writing the outputs merges the adapter in place.
    candidates = {"pipeline": Candidate(result, stats, encoder, "pretrained", tokenizer)}
    arms = {"pipeline": arm_row(candidates["pipeline"], inputs.scored, cfg)}
    skipped = base_skipped(cfg, base, warm)
    if skipped is None:
        candidates["base"] = _train_base(cfg, base, common, checkpoint_dir)
        arms["base"] = arm_row(candidates["base"], inputs.scored, cfg)
    gate = pretrain_gate(
        arms["pipeline"]["best_val_macro_f1"],
        arms["base"]["best_val_macro_f1"] if "base" in arms else None,
        skipped,
    )
    chosen_name = gate.pop("chosen")
    (log.warning if chosen_name == "base" else log.info)("%s", gate["decision"])
    chosen = candidates.pop(chosen_name)
    candidates.clear()  # frees the other arm's model
    if cfg.ablations.enabled:
        arms.update(
            reference_arms(
                cfg, chosen, inputs, chosen_row=arms[chosen_name], checkpoint_dir=checkpoint_dir
            )
        )
    else:
        arms = {chosen_name: arms[chosen_name]}
    report = {"chosen": chosen_name, "pretrain_gate": gate, "arms": arms}
    log.info("arms (test and holdout splits; chosen: %s):\n%s", chosen_name, arms_table_text(arms))
    return Outcome(chosen=chosen, report=report)


def _train_base(
    cfg: FinetuneConfig, base: BaseArm, common: dict[str, Any], checkpoint_dir: Path
) -> Candidate:
    from transformers import AutoTokenizer

    log.info(
        "arm base: %s on the pretrain stage's input (%s, %s)", cfg.method, base.encoder, base.init
    )
    tokenizer = AutoTokenizer.from_pretrained(base.encoder)
    result, stats = train_variant(
        cfg,
        method=cfg.method,
        init=base.init,
        encoder=Path(base.encoder),
        tokenizer=tokenizer,
        arm="base",
        checkpoint_dir=arm_resume_dir(checkpoint_dir, "base", str(base.encoder), base.init),
        **common,
    )
    return Candidate(result, stats, Path(base.encoder), base.init, tokenizer)


def base_skipped(cfg: FinetuneConfig, base: BaseArm | None, warm: Path | None) -> str | None:
    """Why there is no base arm (None: there is one)."""
    if not cfg.ablations.enabled:
        return "finetune.ablations.enabled is false (main arm only)"
    if base is None:
        return "no pretrain stage input given"
    if base.skipped:
        return base.skipped
    if warm is not None:
        return "finetune.warm_start continues a previous adapter (no fresh comparison)"
    return None


def arm_row(arm: Candidate, scored: list[Split], cfg: FinetuneConfig) -> dict[str, Any]:
    stats = arm.stats
    return arm_record(
        method=stats["method"],
        encoder=arm.encoder,
        init=arm.init,
        scores=score_model(arm.result.model, arm.tokenizer, scored, cfg, stats["max_length"]),
        best_val_macro_f1=stats["best_val_macro_f1"],
        train_seconds=stats["train_seconds"],
        trainable_params=stats["trainable_params"],
        total_params=stats["total_params"],
        epochs=stats["epochs"],
    )


def reference_arms(
    cfg: FinetuneConfig,
    chosen: Candidate,
    inputs: Inputs,
    *,
    chosen_row: dict[str, Any],
    checkpoint_dir: Path,
) -> dict[str, dict[str, Any]]:
    """probe and full on the chosen encoder (full: the chosen arm itself when method is full)."""
    log.info("arm probe: frozen %s encoder + logistic regression", chosen.init)
    common = dict(labels=inputs.labels, train_split=inputs.train_split, val_split=inputs.val_split)
    where = dict(encoder=chosen.encoder, init=chosen.init, tokenizer=chosen.tokenizer)
    arms = {"probe": probe_arm(cfg, **where, **common, scored=inputs.scored)}
    if cfg.method == "full":
        arms["full"] = chosen_row
        return arms
    log.info("arm full: full fine-tuning of the chosen encoder (%s epochs)", cfg.epochs)
    resume = arm_resume_dir(checkpoint_dir, "full", str(chosen.encoder), chosen.init)
    result, stats = train_variant(
        cfg, method="full", **where, **common, arm="full", checkpoint_dir=resume
    )
    full = Candidate(result, stats, chosen.encoder, chosen.init, chosen.tokenizer)
    arms["full"] = arm_row(full, inputs.scored, cfg)
    return arms
