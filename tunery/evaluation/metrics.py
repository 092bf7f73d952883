"""Evaluation: classification metrics, calibration, confident mistakes, plots, champion deltas.

Pure functions of (true labels, class probabilities) so that they can be checked by hand on a toy
prediction set; metrics come from `sklearn.metrics` (the `evaluate` package needs the hub).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tunery.io import atomic_path


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    `confusion[i][j]` counts examples of true class i predicted as class j. A class never
    predicted has precision 0 (sklearn's zero_division=0), not NaN, so JSON stays valid.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
    from sklearn.metrics import precision_recall_fscore_support as prfs

    ids = list(range(len(labels)))
    precision, recall, f1, support = prfs(y_true, y_pred, labels=ids, zero_division=0)
    return {
        "rows": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
    }


def calibration(
    y_true: Sequence[int], probs: np.ndarray, n_bins: int = 10
) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error of the top-class confidence, and the reliability bins.

    Equal-width bins over [0, 1]: bin b holds confidences in [b/n, (b+1)/n), the last bin also
    1.0. ECE = sum over bins of (share of examples) * |accuracy - mean confidence|.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    index = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    bins, ece, n = [], 0.0, len(y_true)
    for b in range(n_bins):
        mask = index == b
        count = int(mask.sum())
        acc = float(correct[mask].mean()) if count else 0.0
        conf = float(confidence[mask].mean()) if count else 0.0
        if count:
            ece += count / n * abs(acc - conf)
        bins.append(
            {
                "lower": b / n_bins,
                "upper": (b + 1) / n_bins,
                "count": count,
                "accuracy": acc,
                "confidence": conf,
            }
        )
    return float(ece), bins


ECE_RESAMPLES = 1000  # bootstrap resamples (interval) and simulated label draws (floor)


def _binned_ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> np.ndarray:
    """`calibration`'s ECE for each row of (resamples, rows) arrays at once:
    sum over bins of |sum(correct) - sum(confidence)| / rows equals the weighted gap."""
    r, n = confidence.shape
    index = (
        np.minimum((confidence * n_bins).astype(int), n_bins - 1) + n_bins * np.arange(r)[:, None]
    )
    size = r * n_bins
    hits = np.bincount(index.ravel(), weights=correct.ravel().astype(float), minlength=size)
    conf = np.bincount(index.ravel(), weights=confidence.ravel(), minlength=size)
    return np.abs(hits - conf).reshape(r, n_bins).sum(axis=1) / n


def ece_interval(
    y_true: Sequence[int],
    probs: np.ndarray,
    n_bins: int = 10,
    *,
    resamples: int = ECE_RESAMPLES,
    seed: int = 0,
) -> list[float]:
    """95 % bootstrap percentile interval of `calibration`'s ECE (rows drawn with replacement).

    The binned ECE is biased upwards by sampling noise (`ece_floor`) and a resample's repeated
    rows add to that, so the interval sits mostly above the point estimate: read it as the
    estimate's spread on this many rows, not as a range centred on the true calibration error.
    """
    probs = np.asarray(probs, dtype=np.float64)
    n = len(probs)
    if not n:
        return [0.0, 0.0]
    rows = np.random.default_rng(seed).integers(0, n, (resamples, n))
    correct = probs.argmax(axis=1) == np.asarray(y_true)
    eces = _binned_ece(probs.max(axis=1)[rows], correct[rows], n_bins)
    return [float(v) for v in np.percentile(eces, [2.5, 97.5])]


def ece_floor(
    probs: np.ndarray, n_bins: int = 10, *, draws: int = ECE_RESAMPLES, seed: int = 0
) -> float:
    """The ECE a perfectly calibrated model with these confidences would measure on these rows.

    Each draw makes every row correct with probability equal to its confidence (calibrated by
    construction) and scores it with `calibration`; the mean over draws is how far above 0 the
    binned estimate sits from sampling noise alone at this many rows (it shrinks as 1/sqrt(rows)).
    An ECE near its floor cannot be told from perfect calibration on this split.
    """
    if not len(probs):
        return 0.0
    confidence = np.asarray(probs, dtype=np.float64).max(axis=1)
    rng = np.random.default_rng(seed)
    sims = np.broadcast_to(confidence, (draws, len(confidence)))
    return float(_binned_ece(sims, rng.random(sims.shape) < sims, n_bins).mean())


def confident_wrong(
    texts: Sequence[str],
    y_true: Sequence[int],
    probs: np.ndarray,
    labels: Sequence[str],
    k: int = 10,
) -> list[dict[str, Any]]:
    """The k misclassified examples the model was most sure about (highest top probability)."""
    probs = np.asarray(probs)
    pred = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    wrong = [i for i in range(len(texts)) if pred[i] != y_true[i]]
    wrong.sort(key=lambda i: (-conf[i], i))
    return [
        {
            "text": texts[i],
            "label": labels[y_true[i]],
            "predicted": labels[pred[i]],
            "confidence": round(float(conf[i]), 4),
            "label_probability": round(float(probs[i, y_true[i]]), 4),
        }
        for i in wrong[:k]
    ]


def evaluate_predictions(
    texts: Sequence[str],
    y_true: Sequence[int],
    probs: np.ndarray,
    labels: Sequence[str],
    *,
    n_bins: int = 10,
    k: int = 10,
) -> dict[str, Any]:
    probs = np.asarray(probs)
    report = classification_metrics(y_true, probs.argmax(axis=1).tolist(), labels)
    report["ece"], report["reliability"] = calibration(y_true, probs, n_bins)
    # Beside the ECE, never instead of it: how sure the estimate is on this many rows.
    report["ece_ci95"] = ece_interval(y_true, probs, n_bins)
    report["ece_floor"] = ece_floor(probs, n_bins)
    report["confident_wrong"] = confident_wrong(texts, y_true, probs, labels, k)
    return report


def restrict_to_present(report: dict[str, Any]) -> dict[str, Any]:
    """Macro-F1 over the classes that occur in the scored rows (a subset such as the newest data
    may lack some classes; counting those as F1 0 would say nothing about the model)."""
    present = [m["f1"] for m in report["per_class"].values() if m["support"] > 0]
    report["macro_f1"] = float(np.mean(present)) if present else 0.0
    report["macro_f1_classes"] = len(present)
    return report


def summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers worth keeping in the metrics file: the headline and one F1 per class
    (`dvc metrics show` stays readable; precision, recall, support, the confusion matrix and the
    bins are in the split's report)."""
    return {
        "rows": report["rows"],
        "accuracy": round(report["accuracy"], 4),
        "macro_f1": round(report["macro_f1"], 4),
        "ece": round(report["ece"], 4),
        "per_class_f1": {label: round(m["f1"], 4) for label, m in report["per_class"].items()},
    }


def deltas(current: Mapping[str, Any], champion: Mapping[str, Any]) -> dict[str, Any]:
    """Challenger minus champion: overall and per class F1 (both scored on the same rows)."""
    per_class = {
        label: round(current["per_class"][label]["f1"] - champion["per_class"][label]["f1"], 4)
        for label in current["per_class"]
    }
    return {
        "macro_f1": round(current["macro_f1"] - champion["macro_f1"], 4),
        "accuracy": round(current["accuracy"] - champion["accuracy"], 4),
        "per_class_f1": per_class,
        "worst_class_f1": round(min(per_class.values()), 4) if per_class else 0.0,
    }


def tfidf_baseline(
    train_texts: Sequence[str],
    train_y: Sequence[int],
    splits: Mapping[str, tuple[Sequence[str], Sequence[int]]],
    labels: Sequence[str],
    *,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """TF-IDF (word 1-2 grams) + logistic regression on the same train split: the bar to beat."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    pipe = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
        LogisticRegression(max_iter=2000, C=10.0, random_state=seed),
    )
    pipe.fit(list(train_texts), list(train_y))
    out = {}
    for name, (texts, y) in splits.items():
        m = classification_metrics(y, pipe.predict(list(texts)).tolist(), labels)
        out[name] = {"accuracy": round(m["accuracy"], 4), "macro_f1": round(m["macro_f1"], 4)}
    return out


# --------------------------------------------------------------------------- plots and tables
def _save(fig: Any, dest: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_confusion(
    confusion: Sequence[Sequence[int]], labels: Sequence[str], dest: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion)
    size = max(5.0, 0.55 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                color = "white" if cm[i, j] > cm.max() / 2 else "black"
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8, color=color)
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, dest)


def plot_reliability(
    bins: Sequence[Mapping[str, float]], ece: float, dest: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    width = bins[0]["upper"] - bins[0]["lower"]
    used = [b for b in bins if b["count"]]
    ax.bar(
        [b["lower"] for b in used],
        [b["accuracy"] for b in used],
        width=width,
        align="edge",
        edgecolor="black",
        alpha=0.7,
        label="accuracy",
    )
    ax.plot(
        [b["confidence"] for b in used],
        [b["accuracy"] for b in used],
        "o",
        color="C1",
        label="mean confidence",
    )
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="confidence (top class)",
        ylabel="accuracy",
        title=f"{title} (ECE {ece:.3f})",
    )
    ax.legend(loc="upper left")
    _save(fig, dest)


def _cell(v: Any) -> str:
    text = f"{v:.4g}" if isinstance(v, float) else str(v)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    cell = _cell
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


SUMMARY_FILE = "summary.md"


def summary_markdown(
    holdout: Mapping[str, Any], gate: Mapping[str, Any], stage_value_md: str
) -> str:
    """`reports/evaluate/summary.md`: the served model on the holdout (per class, with the
    champion's F1 beside it when comparable) and the stage-value table, for a person to read."""
    challenger, champion = gate["challenger"], gate.get("champion") or {}
    champ_f1 = champion.get("per_class_f1") or {}
    rows = [
        {
            "class": label,
            "precision": round(m["precision"], 4),
            "recall": round(m["recall"], 4),
            "F1": round(m["f1"], 4),
            "support": m["support"],
            "champion F1": champ_f1.get(label, "-"),
            "Δ F1": round(m["f1"] - champ_f1[label], 4) if label in champ_f1 else "-",
        }
        for label, m in sorted(holdout["per_class"].items())
    ]
    if champion.get("macro_f1") is not None:
        versus = (
            f"Champion (`{champion.get('path', 'registry')}`) on the same rows: macro-F1 "
            f"{champion['macro_f1']:.4f}, accuracy {champion['accuracy']:.4f} "
            f"(Δ macro-F1 {challenger['macro_f1'] - champion['macro_f1']:+.4f})."
        )
    elif champion:
        versus = f"Champion not comparable: {champion.get('reason', 'unknown reason')}."
    else:
        versus = "No champion in the registry yet: the gate judges this model against its floor."
    head = [
        "# Evaluation summary (frozen holdout)",
        "",
        f"Served model: `{challenger['variant']}` ({challenger['method']}), as `tunery predict` "
        f"runs it. Holdout: {gate['rows']} texts; macro-F1 {challenger['macro_f1']:.4f}, "
        f"accuracy {challenger['accuracy']:.4f}, ECE {challenger['ece']:.4f}.",
        "",
        versus,
        "",
        "## Per class",
        "",
        markdown_table(rows, list(rows[0]) if rows else ["class"]),
    ]
    return "\n".join(head) + "\n" + stage_value_md.replace("# ", "## ", 1)
