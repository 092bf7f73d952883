"""The stages' metrics files: one owner for where they are, what is in them and how they are read.

Every stage returns all its numbers. They go two ways:
- `metrics/<stage>.json`: the headline numbers (`HEADLINE`), what DVC declares as metrics, so that
  `dvc metrics show`, `dvc metrics diff` and `dvc exp show` print a screen a person can read
  (all numbers made one line of ~115,000 characters, 400 metrics over eight files; the headline
  ones are ~60: `dvc metrics show metrics/evaluate.json` shows one stage's);
- `reports/metrics/<stage>.json`: every number, nested as the stage returned it; what code reads
  (`read`), a DVC output beside the stage's others. MLflow gets every number too (tunery/stage.py).
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunery.io import write_json

HEADLINE_DIR = "metrics"
DETAIL_DIR = "reports/metrics"

# Dotted key patterns (fnmatch) kept in metrics/<stage>.json; a stage missing here keeps all.
HEADLINE: dict[str, tuple[str, ...]] = {
    "ingest": (
        "data_version",
        "rows",
        "classes",
        "unlabelled_texts",
        "unlabelled_images",
        "incoming_*",
        "*_dropped",
        "seconds",
    ),
    "prepare": ("rows.*", "classes", "corpus_words", "seconds"),
    "corpus": ("moved", "change_share", "texts", "seconds"),
    "pretrain": (
        "objective",
        "steps",
        "stopped_by_budget",
        "final_loss",
        "heldout.*_loss",
        "probe.*.logreg",
        "probe.pretrained",
        "probe.init",
        "images_per_s",
        "seconds",
    ),
    "finetune": (
        "method",
        "trainable_share",
        "best_val_macro_f1",
        "epochs",
        "train_seconds",
        "chosen_arm",
        "pretrain_gate_applied",
        "arms.*.holdout_macro_f1",
        "seconds",
    ),
    "export": ("size_mb", "parity.agreement", "parity.macro_f1_delta", "seconds"),
    "compress": (
        "selected",
        "selected_size_mb",
        "selected_macro_f1_delta*",
        "calibration.temperature",
        "variants.*.cpu_speedup_vs_pytorch",
        "seconds",
    ),
    "evaluate": (
        "method",
        "test.macro_f1",
        "holdout.macro_f1",
        "holdout.accuracy",
        "holdout.ece*",
        "baseline_tfidf_lr.holdout.macro_f1",
        "baseline_pixels_lr.holdout.macro_f1",
        "holdout_macro_f1_over_baseline",
        "newest.delta_macro_f1",
        "champion.holdout.macro_f1",
        "deltas.macro_f1",
        "deltas.worst_class_f1",
        "seconds",
    ),
}


def headline_path(root: Path, stage: str) -> Path:
    return root / HEADLINE_DIR / f"{stage}.json"


def detail_path(root: Path, stage: str) -> Path:
    return root / DETAIL_DIR / f"{stage}.json"


def headline(stage: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The part of `metrics` that `HEADLINE` keeps for `stage`, nested as it was."""
    patterns = HEADLINE.get(stage)
    if patterns is None:
        return dict(metrics)
    return _keep(metrics, "", patterns)


def _keep(node: Mapping[str, Any], prefix: str, patterns: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            inner = _keep(value, f"{dotted}.", patterns)
            if inner:
                out[key] = inner
        elif any(fnmatch.fnmatchcase(dotted, p) for p in patterns):
            out[key] = value
    return out


def write(root: Path, stage: str, metrics: Mapping[str, Any]) -> None:
    """Both files, atomically each: the details first, so a headline never outlives its details."""
    write_json(detail_path(root, stage), dict(metrics))
    write_json(headline_path(root, stage), headline(stage, metrics))


def read(root: Path, stage: str) -> dict[str, Any] | None:
    """Every number the stage's last successful run wrote; None before its first."""
    path = detail_path(root, stage)
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
