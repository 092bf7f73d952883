"""The evaluate stage's models as they are served, and what they are scored on.

`ServedModel` is a deployable ONNX folder or registry version behind the `LoadedClassifier` calls
(`predict_proba`, `labels`, `info`); the champion may also be a finetune output. The newest data
are the test rows from origins the champion never trained on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tunery.config import EvaluateConfig
from tunery.data.labelled import LABELS_FILE, Split, data_labels, load_split
from tunery.data.split import BASE_ORIGIN_PREFIX
from tunery.errors import FinetuneError
from tunery.evaluation import metrics as ev
from tunery.modeling import finetune_dir as finetune_folder
from tunery.modeling.finetune_dir import INFO_FILE
from tunery.modeling.predict import LoadedClassifier, load_classifier
from tunery.onnx import compress_report
from tunery.onnx.export import MODEL_FILE

log = logging.getLogger("tunery.evaluate")


def score(clf: LoadedClassifier | Any, split: Any, cfg: EvaluateConfig) -> dict[str, Any]:
    probs = clf.predict_proba(split.texts, batch_size=cfg.batch_size)
    return ev.evaluate_predictions(
        split.texts,
        split.labels,
        probs,
        clf.labels,
        n_bins=cfg.calibration_bins,
        k=cfg.confident_wrong,
    )


class ServedModel:
    """A deployable ONNX folder or registry version, scored exactly as it is served (the
    `Predictor` of `tunery predict` and the HTTP server), behind the `LoadedClassifier` calls."""

    def __init__(self, ref: str, *, device: str = "cpu", info: dict[str, Any] | None = None):
        from tunery.onnx.runtime import Predictor

        self.predictor = Predictor(ref, device=device)
        self.labels = list(self.predictor.classes)
        self.info = (
            info if info is not None else self.predictor.manifest.get("source", {}).get("finetune")
        )

    def predict_proba(self, texts: list[str], *, batch_size: int = 128) -> Any:
        from tunery.progress import Progress

        bar = Progress(
            f"evaluate: scoring with {self.predictor.model_dir.name}", len(texts), unit="text"
        )
        return self.predictor.predict(
            texts, progress=lambda n: bar.update(bar.done + n)
        ).probabilities

    def uncalibrated_proba(self, texts: list[str]) -> Any:
        """softmax(logits): what the model would serve without its fitted temperature."""
        from tunery.onnx.runtime import softmax

        return softmax(self.predictor.logits(texts))


def load_champion(ref: str | None, root: Path) -> tuple[str, Any] | None:
    """The champion as (where, model): a finetune output dir, a deployable ONNX folder, or a
    `models:/name@champion` URI once the registry has registered its resolver with
    `tunery.onnx.runtime.register_resolver`."""
    if ref is None:
        return None
    path = Path(ref) if Path(ref).is_absolute() else root / ref
    if finetune_folder.is_finetune_dir(path):
        return str(path), load_classifier(path)
    if ":/" in ref and not path.exists():
        return ref, ServedModel(ref)
    if (path / MODEL_FILE).is_file():
        return str(path), ServedModel(str(path))
    raise FinetuneError(
        f"evaluate.champion {ref!r}: neither a finetune output ({INFO_FILE}) nor a deployable "
        "ONNX folder (model.onnx) nor a registry URI"
    )


def champion_holdout(
    cfg: EvaluateConfig, champion: tuple[str, Any], data_dir: Path, labels: list[str]
) -> dict[str, Any]:
    """The champion's holdout numbers, when its label set is the one being evaluated."""
    where, model = champion
    if list(model.labels) != list(labels):
        # Different label sets cannot be compared class by class: the gate fails closed.
        return {
            "path": where,
            "comparable": False,
            "reason": f"champion labels {list(model.labels)} differ from {list(labels)}",
        }
    holdout = load_split(data_dir / "holdout.parquet", labels)
    report = ev.restrict_to_present(score(model, holdout, cfg))
    return {"path": where, "comparable": True, "report": report}


def origins_of(model: Any) -> list[str] | None:
    """The data origins a model was fine-tuned on, when it recorded them (finetune.json, or the
    `source.finetune` block of a deployable folder's manifest)."""
    info = getattr(model, "info", None)
    origins = (info or {}).get("data_origins")
    return list(origins) if origins is not None else None


def newest_origins(test_origins: list[str], champion_origins: list[str] | None) -> list[str]:
    """Which test rows count as the newest data: those from origins the champion never trained on;
    without a champion that recorded its origins, those of the last incoming file (ingest appends
    incoming files in name order). The frozen holdout never holds appended rows, so this is where
    a retrain shows how each model does on what just arrived."""
    present = sorted(set(test_origins))
    if champion_origins is not None:
        return [o for o in present if o not in set(champion_origins)]
    incoming = [o for o in present if not o.startswith(BASE_ORIGIN_PREFIX)]
    return incoming[-1:]


def score_newest(
    cfg: EvaluateConfig,
    clf: LoadedClassifier,
    champion: tuple[str, Any] | None,
    data_dir: Path,
) -> dict[str, Any]:
    import pandas as pd

    path = data_dir / "test.parquet"
    df = pd.read_parquet(path)
    origins = df["origin"].astype(str).tolist() if "origin" in df.columns else []
    champ_origins = origins_of(champion[1]) if champion else None
    chosen = newest_origins(origins, champ_origins)
    rows = [i for i, o in enumerate(origins) if o in set(chosen)]
    out: dict[str, Any] = {
        "split": "test",
        "origins": chosen,
        "rows": len(rows),
        "rule": "origins the champion did not train on"
        if champ_origins is not None
        else "the last incoming file",
    }
    if not rows:
        return out
    full = load_split(path, clf.labels)
    subset = Split("newest", [full.texts[i] for i in rows], [full.labels[i] for i in rows])
    out["report"] = ev.restrict_to_present(score(clf, subset, cfg))
    if champion is not None and list(champion[1].labels) == list(clf.labels):
        out["champion_report"] = ev.restrict_to_present(score(champion[1], subset, cfg))
        out["deltas"] = ev.deltas(out["report"], out["champion_report"])
    return out


def newest_summary_of(newest: dict[str, Any]) -> dict[str, Any]:
    out = {"rows": newest["rows"], "origins": ", ".join(newest["origins"]) or "none"}
    if "report" in newest:
        out.update(
            macro_f1=round(newest["report"]["macro_f1"], 4),
            accuracy=round(newest["report"]["accuracy"], 4),
        )
    if "champion_report" in newest:
        out.update(
            champion_macro_f1=round(newest["champion_report"]["macro_f1"], 4),
            champion_accuracy=round(newest["champion_report"]["accuracy"], 4),
            delta_macro_f1=newest["deltas"]["macro_f1"],
        )
    return out


def served_challenger(cfg: EvaluateConfig, model_dir: Path, finetune_dir: Path) -> ServedModel:
    info = (
        finetune_folder.read_info(finetune_dir)
        if finetune_folder.is_finetune_dir(finetune_dir)
        else None
    )
    if not (model_dir / MODEL_FILE).is_file():
        raise FinetuneError(f"{model_dir}: no deployable model (model.onnx); run compress first")
    return ServedModel(str(model_dir), device=cfg.device, info=info)


def deployed_summary(
    clf: ServedModel, holdout: dict[str, Any], uncalibrated: dict[str, Any], compress: dict
) -> dict[str, Any]:
    """The deployed row of the stage-value table: what is served, at what cost (`compress`: the
    compress report, `tunery.onnx.compress_report`)."""
    manifest = clf.predictor.manifest
    variant = manifest.get("variant")
    calib = manifest.get("calibration") or {}
    numbers = compress_report.served_numbers(compress, variant)
    speed = (
        numbers["throughput"] / numbers["reference_throughput"]
        if numbers["throughput"] and numbers["reference_throughput"]
        else None
    )
    size = sum(f.stat().st_size for f in clf.predictor.model_dir.glob("*.onnx*")) / 1e6
    return {
        "variant": variant,
        "method": (clf.info or {}).get("method"),
        "macro_f1": round(holdout["macro_f1"], 4),
        "accuracy": round(holdout["accuracy"], 4),
        "rows": holdout.get("rows"),
        "ece": round(holdout["ece"], 4),
        "ece_uncalibrated": round(uncalibrated["ece"], 4),
        **_ece_spread(holdout, "ece"),
        **_ece_spread(uncalibrated, "ece_uncalibrated"),
        "temperature": calib.get("temperature"),
        "size_mb": round(size, 1),
        "speedup": round(speed, 2) if speed else None,
        "drop_macro_f1": (
            -numbers["macro_f1_delta"] if numbers["macro_f1_delta"] is not None else None
        ),
        "candidates": compress_report.candidates(compress),
    }


def _ece_spread(report: dict[str, Any], key: str) -> dict[str, Any]:
    """The ECE's bootstrap interval and sampling floor (`metrics.ece_interval`, `ece_floor`)."""
    out = {}
    if report.get("ece_ci95") is not None:
        out[f"{key}_ci95"] = [round(v, 4) for v in report["ece_ci95"]]
    if report.get("ece_floor") is not None:
        out[f"{key}_floor"] = round(report["ece_floor"], 4)
    return out


def check_labels(data_dir: Path, clf: ServedModel, model_dir: Path) -> None:
    """Every label of the data must be one the served model knows."""
    labels = data_labels(data_dir)
    unknown = sorted(set(labels) - set(clf.labels))
    if unknown:
        from tunery.errors import DataValidationError

        raise DataValidationError(
            data_dir / LABELS_FILE,
            "unknown_label",
            f"labels {unknown} are unknown to the model in {model_dir}; re-run finetune",
        )


def baseline_scores(
    cfg: EvaluateConfig, data_dir: Path, labels: list[str], splits: dict
) -> dict | None:
    """TF-IDF + logistic regression on the same splits, for reference (`evaluate.baseline`)."""
    if not cfg.baseline:
        return None
    t0 = time.perf_counter()
    train = load_split(data_dir / "train.parquet", labels)
    baseline = ev.tfidf_baseline(
        train.texts,
        train.labels,
        {name: (s.texts, s.labels) for name, s in splits.items()},
        labels,
    )
    baseline["seconds"] = round(time.perf_counter() - t0, 1)
    return baseline
