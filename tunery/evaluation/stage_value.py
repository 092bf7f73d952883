"""The stage-value table: what each stage bought, on the frozen holdout, in one run.

This module owns `<evaluate.report_dir>/stage_value.json` and `stage_value.md`: it builds the
table from what the stages measured, writes it, and reads it back for the end-of-run summary.

Rows, top to bottom (each compared with the row above):

  tfidf     TF-IDF + logistic regression on the train split: the bar any encoder must clear
  probe     the shipped encoder frozen, logistic regression on its embeddings
  base      the fine-tune method on the pretrain stage's input (no pretraining)
  pipeline  the same method, schedule and seed on the pretrain stage's output
  full      full fine-tuning of the chosen encoder (the reference PEFT is held to); one row, not
            two, when full fine-tuning is the method (the image demo: its `lora` row is held to it)
  deployed  the model that is served: compressed variant, calibrated, run by onnxruntime

Arms `probe`..`full` come from the finetune stage (`arms.json` in its output); `deployed` and
`tfidf` are scored by `evaluate` itself. A missing arm (ablations off, or an explicit
`finetune.encoder` that no pretraining produced) is left out, and the verdicts say so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunery.io import atomic_path

JSON_FILE = "stage_value.json"
MARKDOWN_FILE = "stage_value.md"

ROWS = ("tfidf", "probe", "base", "pipeline", "full", "deployed")
PEFT_TOLERANCE = 0.005  # issue 14: the default PEFT method within 0.5 pt of full fine-tuning


def _arm_row(key: str, arm: Mapping[str, Any], what: str) -> dict[str, Any]:
    holdout = arm.get("holdout") or {}
    return {
        "row": key,
        "what": what,
        "macro_f1": holdout.get("macro_f1"),
        "accuracy": holdout.get("accuracy"),
        "seconds": arm.get("train_seconds"),
        "trainable_share": arm.get("trainable_share"),
        "size": f"{arm['params'] / 1e6:.1f} M params" if arm.get("params") else None,
    }


def build(
    *,
    arms: Mapping[str, Any] | None,
    baseline: Mapping[str, Any] | None,
    deployed: Mapping[str, Any],
    baseline_what: str = "TF-IDF + logistic regression",
    arm_labels: Mapping[str, str] | None = None,
    unit: str = "texts",
    baseline_short: str = "TF-IDF + LR",
) -> dict[str, Any]:
    """The table and its verdicts.

    The image pipeline passes its own baseline (`baseline_what`: logistic regression on raw
    pixels), arm descriptions (`arm_labels`, merged over the text ones) and `unit` ("images").

    `arms`: the finetune stage's arms.json (or None); `baseline`: {"holdout": {...}, "seconds"};
    `deployed`: {"variant", "macro_f1", "accuracy", "ece", "ece_uncalibrated", "temperature",
    "size_mb", "speedup", "drop_macro_f1", "method", "shipped_arm"}.
    """
    arms = arms or {}
    table = arms.get("arms") or {}
    method = deployed.get("method") or (table.get("pipeline") or {}).get("method") or "fine-tune"
    rows: list[dict[str, Any]] = []
    if baseline:
        rows.append(
            {
                "row": "tfidf",
                "what": baseline_what,
                "macro_f1": baseline["holdout"]["macro_f1"],
                "accuracy": baseline["holdout"]["accuracy"],
                "seconds": baseline.get("seconds"),
                "size": None,
            }
        )
    labels = {
        "probe": "frozen encoder + logistic regression (probe)",
        "base": f"{method} on the base encoder (no pretraining)",
        "pipeline": f"{method} on this pipeline's pretrained encoder",
        "full": "full fine-tuning (reference)",
        **(arm_labels or {}),
    }
    # With full fine-tuning as the method, arms.json's "full" is the shipped arm itself: one row.
    repeated = {"full"} if method == "full" else set()
    rows += [_arm_row(k, table[k], labels[k]) for k in labels if k in table and k not in repeated]
    size = deployed.get("size_mb")
    speed = deployed.get("speedup")
    rows.append(
        {
            "row": "deployed",
            "what": f"deployed: {deployed.get('variant')} ONNX, calibrated"
            + (f" (T={deployed['temperature']:.3g})" if deployed.get("temperature") else ""),
            "macro_f1": deployed["macro_f1"],
            "accuracy": deployed.get("accuracy"),
            "ece": deployed.get("ece"),
            "seconds": None,
            "size": f"{size:.1f} MB" if size is not None else None,
            "speedup": speed,
        }
    )
    shipped = arms.get("chosen") or deployed.get("shipped_arm") or "pipeline"
    _deltas(rows, shipped)
    for r in rows:
        r["shipped"] = r["row"] in (shipped, "deployed")
    return {
        "split": "holdout",
        "metric": "macro_f1",
        "holdout_rows": deployed.get("rows"),
        "unit": unit,
        "baseline_what": baseline_what,
        "rows": rows,
        "shipped_arm": shipped,
        "verdicts": verdicts(rows, arms, deployed, baseline_short=baseline_short),
    }


def _deltas(rows: list[dict[str, Any]], shipped: str) -> None:
    """Each row's Δ against the row above it; the deployed row's against the fine-tune it was made
    from (what compression and calibration cost), which need not be the row above."""
    previous = None
    for r in rows:
        before = _f1(rows, shipped) if r["row"] == "deployed" else previous
        if before is None:
            before = previous
        r["delta"] = (
            round(r["macro_f1"] - before, 4)
            if before is not None and r["macro_f1"] is not None
            else None
        )
        r["delta_vs"] = shipped if r["row"] == "deployed" and _f1(rows, shipped) else None
        if r["macro_f1"] is not None:
            previous = r["macro_f1"]


def _f1(rows: list[dict[str, Any]], key: str) -> float | None:
    return next((r["macro_f1"] for r in rows if r["row"] == key), None)


def verdicts(
    rows: list[dict[str, Any]],
    arms: Mapping[str, Any],
    deployed: Mapping[str, Any],
    *,
    baseline_short: str = "TF-IDF + LR",
) -> dict[str, str]:
    """One line per stage that can make the model worse or must pay for itself."""
    out: dict[str, str] = {}
    gate = arms.get("pretrain_gate") or {}
    if gate.get("decision"):
        out["pretrain"] = gate["decision"]
    elif "base" not in {r["row"] for r in rows}:
        out["pretrain"] = "not judged: no fine-tune on the base encoder in this run"
    finetune = _peft_verdict(rows, arms.get("chosen") or "pipeline", deployed.get("method"))
    if finetune:
        out["finetune"] = finetune
    if deployed.get("ece_uncalibrated") is not None and deployed.get("ece") is not None:
        out["calibration"] = (
            f"holdout ECE {deployed['ece_uncalibrated']:.4f}"
            f"{_ci(deployed.get('ece_uncalibrated_ci95'))} uncalibrated -> {deployed['ece']:.4f}"
            f"{_ci(deployed.get('ece_ci95'))} served (temperature "
            f"{deployed.get('temperature') or 1.0:.3g})"
            + (
                f"; a perfectly calibrated model at the served confidences would measure "
                f"{deployed['ece_floor']:.4f} on these rows (sampling floor)"
                if deployed.get("ece_floor") is not None
                else ""
            )
        )
    if deployed.get("variant"):
        speed = deployed.get("speedup")
        drop = deployed.get("drop_macro_f1")
        out["compress"] = (
            f"deployed {deployed['variant']}"
            + (f" at {speed:.2f}x PyTorch eager throughput" if speed else "")
            + (f", macro-F1 {-drop:+.4f} vs PyTorch on the judged rows" if drop is not None else "")
            + _candidates(deployed.get("candidates") or [], deployed["variant"])
        )
    tfidf, served = _f1(rows, "tfidf"), deployed.get("macro_f1")
    if tfidf is not None and served is not None:
        out["baseline"] = f"served model {served - tfidf:+.4f} macro-F1 over {baseline_short}"
    return out


def _peft_verdict(rows: list[dict[str, Any]], chosen: str, method: str | None) -> str | None:
    """The PEFT method against full fine-tuning on the holdout. When full fine-tuning is the
    method (it ships), the PEFT arm held to it is the `lora` row, if the run trained one."""
    if method == "full":
        peft, full, name = _f1(rows, "lora"), _f1(rows, chosen), "lora"
        if peft is None:
            return "full fine-tuning is the method (shipped); no PEFT arm in this run"
    else:
        peft, full, name = _f1(rows, chosen), _f1(rows, "full"), method or "PEFT"
    if peft is None or full is None:
        return None
    gap = full - peft
    status = "within" if gap <= PEFT_TOLERANCE else "NOT within"
    shipped = "; full fine-tuning is the method and ships" if method == "full" else ""
    return (
        f"{name} holdout macro-F1 {peft:.4f} vs full fine-tuning {full:.4f} ({-gap:+.4f}): "
        f"{status} {PEFT_TOLERANCE:.3f}{shipped}"
    )


def _ci(interval: Any) -> str:
    return f" [95 % {interval[0]:.3f}-{interval[1]:.3f}]" if interval else ""


def _candidates(candidates: list[Mapping[str, Any]], deployed: str) -> str:
    """The other variants the compress stage weighed: speed-up, macro-F1 delta, why not chosen."""
    others = [
        f"{c['variant']} {_num(c.get('speedup'), '.2f')}x {_num(c.get('macro_f1_delta'), signed=True)}"
        f" ({c['status']})"
        for c in candidates
        if c.get("variant") != deployed
    ]
    return f"; also weighed: {', '.join(others)}" if others else ""


def _num(v: Any, fmt: str = ".4f", signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+{fmt}}" if signed else f"{v:{fmt}}"


def markdown(table: Mapping[str, Any]) -> str:
    num = _num
    lines = [
        f"# What each stage bought (frozen holdout{_texts(table)}, macro-F1)",
        "",
        "| | row | macro-F1 | Δ vs above | cost (s) | size | note |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in table["rows"]:
        note = []
        if r.get("trainable_share") is not None:
            note.append(f"{100 * r['trainable_share']:.2f} % trainable")
        if r.get("speedup"):
            note.append(f"{r['speedup']:.2f}x PyTorch")
        if r.get("ece") is not None:
            note.append(f"ECE {r['ece']:.3f}")
        lines.append(
            f"| {'**>**' if r.get('shipped') else ''} | {r['what']} | {num(r['macro_f1'])} "
            f"| {num(r['delta'], signed=True)} | {num(r.get('seconds'), '.0f')} "
            f"| {r.get('size') or '-'} | {', '.join(note)} |"
        )
    lines += [
        "",
        "**>** marks what is shipped (the fine-tune the deployed model was made from). The "
        "deployed row's Δ is against that fine-tune: what compression and calibration cost.",
        "",
    ]
    lines += [f"- **{k}**: {v}" for k, v in table["verdicts"].items()]
    lines += [f"- {line}" for line in _scale(table)]
    return "\n".join(lines) + "\n"


def _texts(table: Mapping[str, Any]) -> str:
    n = table.get("holdout_rows")
    return f", {n} {table.get('unit', 'texts')}" if n else ""


def _scale(table: Mapping[str, Any]) -> list[str]:
    """A reader's scale for the deltas: what one holdout text weighs."""
    n = table.get("holdout_rows")
    if not n:
        return []
    one = str(table.get("unit", "texts")).rstrip("s")
    return [f"scale: one holdout {one} is {100 / n:.2f} pt of accuracy; smaller deltas are noise"]


def write(report_dir: Path, table: Mapping[str, Any]) -> None:
    """Both files, into `report_dir` (inside evaluate's atomic report folder)."""
    with atomic_path(report_dir / JSON_FILE) as tmp:
        tmp.write_text(json.dumps(table, indent=2) + "\n")
    with atomic_path(report_dir / MARKDOWN_FILE) as tmp:
        tmp.write_text(markdown(table))


def read(report_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((report_dir / JSON_FILE).read_text())
    except (OSError, ValueError):
        return None


def terminal(table: Mapping[str, Any]) -> str:
    """A plain-text rendering for the end of `tunery run` / `tunery retrain`."""
    title = f"stage-value (holdout macro-F1{_texts(table)})"
    lines = [f"{'':2}{title:<58} {'F1':>7} {'Δ':>8}"]
    for r in table["rows"]:
        mark = "> " if r.get("shipped") else "  "
        delta = f"{r['delta']:+.4f}" if r.get("delta") is not None else ""
        f1 = f"{r['macro_f1']:.4f}" if r.get("macro_f1") is not None else "-"
        lines.append(f"{mark}{r['what'][:58]:<58} {f1:>7} {delta:>8}")
    lines += [f"  {k}: {v}" for k, v in table["verdicts"].items()]
    lines += [f"  {line}" for line in _scale(table)]
    return "\n".join(lines)
