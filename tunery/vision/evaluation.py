"""The image evaluate stage's work: the deployed model as served, the baseline, the champion,
the stage-value table and the confidently-wrong picture grid.

Metrics are the text pipeline's (`tunery.evaluation.metrics`: accuracy, macro-F1, per class,
calibration, the most confident mistakes, named by image path); the table is its
`tunery.evaluation.stage_value`, with logistic regression on raw pixels as the baseline row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from tunery.evaluation import metrics as ev
from tunery.vision import splits

log = logging.getLogger("tunery.evaluate")

PIXELS_WHAT = "logistic regression on raw pixels"
ARM_LABELS = {
    "probe": "{objective} encoder frozen + logistic regression (probe)",
    "base": "{method} from random weights (no pretraining)",
    "pipeline": "{method} on this pipeline's {objective} encoder",
    "lora": "LoRA on the shipped encoder (the PEFT alternative)",
}
GRID_FILE = "confident_wrong.png"


def score_folder(folder: Path, df: pd.DataFrame, root: Path, labels: list[str], cfg: Any) -> dict:
    """A deployed image folder on a split, as served: the report plus the uncalibrated ECE."""
    from tunery.onnx.calibration import ece
    from tunery.vision import deploy

    y = splits.label_ids(df, labels)
    logits, probs = deploy.outputs(folder, splits.paths(df, root))
    names = [str(Path(r) / i) for r, i in zip(df["root"], df["image"], strict=True)]
    report = ev.evaluate_predictions(
        names, y.tolist(), probs, labels, n_bins=cfg.calibration_bins, k=cfg.confident_wrong
    )
    report["ece_uncalibrated"] = ece(logits, y, 1.0, cfg.calibration_bins)
    return report


def pixel_baseline(train: tuple, holdout: tuple, labels: list[str]) -> dict[str, Any]:
    """Logistic regression on the raw (normalised) pixels of the train split, on the holdout."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    (tx, ty), (hx, hy) = train, holdout
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(tx.reshape(len(tx), -1).numpy(), ty)
    pred = clf.predict(hx.reshape(len(hx), -1).numpy())
    report = ev.classification_metrics(hy.tolist(), pred.tolist(), labels)
    return {
        "holdout": ev.restrict_to_present(report),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def champion_entry(
    ref: str, folder: Path, df: pd.DataFrame, root: Path, labels: list[str], cfg: Any
) -> dict:
    """The champion on the same holdout when it is an image model with the same classes."""
    from tunery.errors import TuneryError
    from tunery.vision import deploy

    try:
        _, _, their_labels = deploy.folder_processor(folder)
    except TuneryError as exc:
        return {"path": ref, "comparable": False, "reason": str(exc)}
    if their_labels != list(labels):
        return {
            "path": ref,
            "comparable": False,
            "reason": f"champion labels {their_labels} differ from {list(labels)}",
        }
    report = ev.restrict_to_present(score_folder(folder, df, root, labels, cfg))
    return {"path": ref, "comparable": True, "report": report}


def grid(wrong: Sequence[dict[str, Any]], root: Path, dest: Path, columns: int = 8) -> None:
    """The most confidently wrong images, each titled "predicted (confidence) / true label"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tunery.data.images import open_image

    n = max(1, len(wrong))
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, 2.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, item in zip(axes.flat, wrong, strict=False):
        ax.imshow(open_image(Path(root) / item["text"]), cmap="gray")
        ax.set_title(
            f"{item['predicted'][:12]} ({item['confidence']:.2f})\ntrue: {item['label'][:12]}",
            fontsize=7,
        )
    fig.suptitle(
        "Most confidently wrong holdout images (predicted (confidence) / true)", fontsize=9
    )
    ev._save(fig, dest)


def deployed_entry(
    manifest: dict, report: dict, compress_report: dict, method: str, shipped: str
) -> dict:
    chosen = compress_report.get("variants", {}).get(compress_report.get("selected"), {})
    calibration = manifest.get("calibration", {})
    return {
        "variant": manifest.get("variant"),
        "rows": report["rows"],
        "macro_f1": round(report["macro_f1"], 4),
        "accuracy": round(report["accuracy"], 4),
        "ece": round(report["ece"], 4),
        "ece_uncalibrated": round(report["ece_uncalibrated"], 4),
        "temperature": calibration.get("temperature"),
        "size_mb": chosen.get("size_mb"),
        "speedup": chosen.get("cpu_speedup_vs_pytorch"),
        "drop_macro_f1": -chosen["parity"]["macro_f1_delta"] if chosen.get("parity") else None,
        "method": method,
        "shipped_arm": shipped,
    }


def table(
    arms: dict, baseline: dict | None, deployed: dict, objective: str = "simclr"
) -> dict[str, Any]:
    from tunery.evaluation import stage_value
    from tunery.vision.encoder_dir import objective_name

    method = deployed.get("method") or "fine-tune"
    name = objective_name(objective)
    return stage_value.build(
        arms=arms,
        baseline=baseline,
        deployed=deployed,
        baseline_what=PIXELS_WHAT,
        arm_labels={k: v.format(method=method, objective=name) for k, v in ARM_LABELS.items()},
        unit="images",
        baseline_short="raw-pixel LR",
    )
