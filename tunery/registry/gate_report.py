"""`gate.json`: what the promotion gate judges on, written by the evaluate stage.

    split, rows       the frozen holdout the numbers come from
    challenger        the deployable model: macro_f1, accuracy, ece, per_class_f1 (classes present)
    champion          the registry champion (or folder) on the same rows, or null; `path` names
                      the registry version it was (`models:/NAME/VERSION`), `comparable` whether
                      the label sets match
    deltas            challenger minus champion, or null
    baseline_macro_f1, newest   shown beside the decision; never judged on

The one module that names, writes, checks and reads it (`tunery.registry.gate` decides on its content).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunery.registry import refs

FILE = "gate.json"


def path_in(report_dir: Path) -> Path:
    """Where the file is: `<evaluate.report_dir>/gate.json`."""
    return Path(report_dir) / FILE


def _f1s(report: Mapping[str, Any]) -> dict[str, float]:
    return {k: round(v["f1"], 4) for k, v in report["per_class"].items() if v["support"]}


def scores(report: Mapping[str, Any]) -> dict[str, Any]:
    """A model's entry: its holdout numbers as the gate reads them."""
    return {
        "macro_f1": round(report["macro_f1"], 4),
        "accuracy": round(report["accuracy"], 4),
        "ece": round(report["ece"], 4),
        "per_class_f1": _f1s(report),
    }


def build(
    *,
    holdout: Mapping[str, Any],
    challenger: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    champion_report: Mapping[str, Any] | None,
    deltas: Mapping[str, Any] | None,
    baseline_macro_f1: float | None,
    newest: Mapping[str, Any],
) -> dict[str, Any]:
    """The gate report: challenger and champion on the very same holdout rows.

    `challenger`: model, variant, method (its scores are added from `holdout`); `champion`: the
    champion's path/comparable/reason (its scores are added from `champion_report`)."""
    entry = None
    if champion is not None:
        entry = dict(champion)
        if champion_report is not None:
            entry.update(scores(champion_report))
    return {
        "split": "holdout",
        "rows": holdout["rows"],
        "challenger": {**challenger, **scores(holdout)},
        "champion": entry,
        "deltas": dict(deltas) if deltas is not None else None,
        "baseline_macro_f1": baseline_macro_f1,
        # Shown with the decision; the gate itself judges on the frozen holdout only.
        "newest": dict(newest),
    }


def write(report_dir: Path, gate: Mapping[str, Any]) -> Path:
    """Write into `report_dir` (the evaluate stage's atomic output folder)."""
    path = path_in(report_dir)
    path.write_text(json.dumps(dict(gate), indent=2) + "\n")
    return path


def read(report_dir: Path) -> dict[str, Any]:
    """The gate report, or {} when there is none (or it is unreadable): the gate fails closed."""
    try:
        data = json.loads(path_in(report_dir).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def compared_version(champion: Mapping[str, Any] | None, name: str) -> str | None:
    """The registry version the evaluation compared against (`path: models:/NAME/VERSION`), or
    None when it compared against no registry version (no champion, or a local folder)."""
    return refs.version_of(str((champion or {}).get("path") or ""), name)
