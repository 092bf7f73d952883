"""What the evaluate stage writes: gate.json's content, metrics/evaluate.json, the report folder
(per-split reports, confidently wrong tables, the stage-value table, the summary) and the plots.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tunery.evaluation import metrics as ev
from tunery.evaluation import stage_value
from tunery.io import atomic_dir
from tunery.registry import gate_report

log = logging.getLogger("tunery.evaluate")


def gate(
    model_dir: Path,
    deployed: dict[str, Any],
    holdout: dict[str, Any],
    champion_result: dict[str, Any] | None,
    baseline: dict[str, Any] | None,
    newest: dict[str, Any],
) -> dict[str, Any]:
    """gate.json's content (see `tunery.registry.gate_report`)."""
    comparable = champion_result is not None and champion_result["comparable"]
    champ_report = champion_result["report"] if comparable else None
    return gate_report.build(
        holdout=holdout,
        challenger={
            "model": str(model_dir),
            "variant": deployed["variant"],
            "method": deployed["method"],
        },
        champion=(
            {k: v for k, v in champion_result.items() if k != "report"}
            if champion_result is not None
            else None
        ),
        champion_report=champ_report,
        deltas=ev.deltas(holdout, champ_report) if champ_report is not None else None,
        baseline_macro_f1=baseline["holdout"]["macro_f1"] if baseline else None,
        newest=newest,
    )


def metrics(
    reports: dict[str, Any],
    deployed: dict[str, Any],
    baseline: dict[str, Any] | None,
    newest_summary: dict[str, Any],
    champion_result: dict[str, Any] | None,
    gate: dict[str, Any],
    table: dict[str, Any],
) -> dict[str, Any]:
    """metrics/evaluate.json."""
    metrics: dict[str, Any] = {
        "method": deployed["method"],
        "variant": deployed["variant"],
        **{name: ev.summary(r) for name, r in reports.items()},
    }
    if baseline is not None:
        metrics["baseline_tfidf_lr"] = baseline
        metrics["holdout_macro_f1_over_baseline"] = round(
            reports["holdout"]["macro_f1"] - baseline["holdout"]["macro_f1"], 4
        )
    metrics["newest"] = newest_summary
    if champion_result is not None:
        if champion_result["comparable"]:
            metrics["champion"] = {"holdout": ev.summary(champion_result["report"])}
            metrics["deltas"] = gate["deltas"]
        else:
            metrics["champion"] = {"comparable": False}
    metrics["holdout"]["ece_uncalibrated"] = deployed["ece_uncalibrated"]
    metrics["stage_value"] = {
        r["row"]: r["macro_f1"] for r in table["rows"] if r["macro_f1"] is not None
    }
    return metrics


def confident_wrong_md(title: str, rows: list[dict[str, Any]]) -> str:
    return f"# Most confidently wrong ({title})\n\n" + ev.markdown_table(
        rows, ["confidence", "label", "predicted", "label_probability", "text"]
    )


def labelled_json(labels: list[str], report: dict[str, Any]) -> str:
    return json.dumps({"labels": labels, **report}, indent=2) + "\n"


def write_reports(
    report_dir: Path,
    *,
    labels: list[str],
    reports: dict[str, Any],
    gate: dict[str, Any],
    table: dict[str, Any],
    newest: dict[str, Any],
    champion_result: dict[str, Any] | None,
) -> None:
    with atomic_dir(report_dir) as tmp:
        gate_report.write(tmp, gate)
        stage_value.write(tmp, table)
        (tmp / ev.SUMMARY_FILE).write_text(
            ev.summary_markdown(reports["holdout"], gate, stage_value.markdown(table))
        )
        for name, report in reports.items():
            (tmp / f"{name}.json").write_text(labelled_json(labels, report))
            (tmp / f"{name}_confident_wrong.md").write_text(
                confident_wrong_md(name, report["confident_wrong"])
            )
        (tmp / "newest.json").write_text(labelled_json(labels, newest))
        if "report" in newest:
            (tmp / "newest_confident_wrong.md").write_text(
                confident_wrong_md(
                    f"newest data: {', '.join(newest['origins'])}",
                    newest["report"]["confident_wrong"],
                )
            )
        if champion_result is not None and champion_result["comparable"]:
            (tmp / "champion_holdout.json").write_text(
                labelled_json(labels, champion_result["report"])
            )


def write_plots(plot_dir: Path, labels: list[str], reports: dict[str, Any]) -> None:
    with atomic_dir(plot_dir) as tmp:
        for name, report in reports.items():
            ev.plot_confusion(
                report["confusion"], labels, tmp / f"{name}_confusion.png", f"Confusion ({name})"
            )
            ev.plot_reliability(
                report["reliability"],
                report["ece"],
                tmp / f"{name}_reliability.png",
                f"Reliability ({name})",
            )
            rows = [{"actual": labels[t], "predicted": labels[p]} for t, p in pairs(report)]
            (tmp / f"{name}_predictions.json").write_text(json.dumps(rows, indent=0) + "\n")


def log_result(holdout: dict, baseline: dict | None, gate: dict, newest: dict, table) -> None:
    log.info(
        "holdout macro-F1 %.4f (accuracy %.4f, ECE %.4f)%s%s",
        holdout["macro_f1"],
        holdout["accuracy"],
        holdout["ece"],
        f"; TF-IDF+LR baseline {baseline['holdout']['macro_f1']:.4f}" if baseline else "",
        f"; vs champion {gate['deltas']['macro_f1']:+.4f}" if gate["deltas"] else "",
    )
    if "report" in newest:
        log.info(
            "newest data (%s, %d test rows): macro-F1 %.4f%s",
            ", ".join(newest["origins"]),
            newest["rows"],
            newest["report"]["macro_f1"],
            f" vs champion {newest['champion_report']['macro_f1']:.4f}"
            if "champion_report" in newest
            else "",
        )
    else:
        log.info("newest data: none in the test split (%s)", newest["rule"])
    log.info("what each stage bought:\n%s", stage_value.terminal(table))


def pairs(report: dict[str, Any]) -> list[tuple[int, int]]:
    """(true, predicted) pairs rebuilt from the confusion matrix, for DVC's confusion template."""
    out = []
    for i, row in enumerate(report["confusion"]):
        for j, count in enumerate(row):
            out.extend([(i, j)] * int(count))
    return out
