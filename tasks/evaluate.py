"""evaluate: score the model as it is served on the test split and the frozen holdout, against the
champion as it is served, and say what each stage bought.

Inputs:  `<compress.out_dir>/` (the deployable ONNX model: the compressed, calibrated variant that
         `tunery predict` and the registry serve, run by onnxruntime), `<finetune.out_dir>/`
         (`finetune.json`: method and data origins; `arms.json`: the fine-tune arms),
         `<compress.report_dir>/report.json` (speed-up and drop of the deployed variant),
         `<prepare.out_dir>/{train,test,holdout}.parquet` (train only for the TF-IDF +
         logistic-regression baseline); optionally the champion (`evaluate.champion`): a registry
         URI (`models:/<name>/<version>`, served the same way), a deployable ONNX folder, or a
         finetune output dir.
Outputs: `metrics/evaluate.json` (headline numbers), `<report_dir>/` written atomically:
         `gate.json` (what the promotion gate reads: holdout macro-F1, per-class F1, champion and
         deltas), `stage_value.{json,md}` (tunery/evaluation/stage_value.py), `<split>.json` (full report:
         confusion matrix, reliability bins, confidently wrong), `<split>_confident_wrong.md`;
         `plots/evaluate/` (confusion and reliability PNGs, and `<split>_predictions.json` for
         `dvc plots` confusion templates).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tunery.config import EvaluateConfig, Params
from tunery.data.labelled import LABELS_FILE, Split, data_labels, load_split
from tunery.data.split import BASE_ORIGIN_PREFIX
from tunery.errors import FinetuneError
from tunery.evaluation import metrics as ev
from tunery.evaluation import stage_value
from tunery.io import atomic_dir
from tunery.modeling import finetune_dir as finetune_folder
from tunery.modeling.finetune_dir import INFO_FILE, read_arms
from tunery.modeling.predict import LoadedClassifier, load_classifier
from tunery.onnx.export import MODEL_FILE
from tunery.registry import gate_report, refs

log = logging.getLogger("tunery.evaluate")

SPLITS = ("test", "holdout")
GATE_FILE = gate_report.FILE


def _score(clf: LoadedClassifier | Any, split: Any, cfg: EvaluateConfig) -> dict[str, Any]:
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


def _champion(
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
    report = ev.restrict_to_present(_score(model, holdout, cfg))
    return {"path": where, "comparable": True, "report": report}


def _origins_of(model: Any) -> list[str] | None:
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


def _newest(
    cfg: EvaluateConfig,
    clf: LoadedClassifier,
    champion: tuple[str, Any] | None,
    data_dir: Path,
) -> dict[str, Any]:
    import pandas as pd

    path = data_dir / "test.parquet"
    df = pd.read_parquet(path)
    origins = df["origin"].astype(str).tolist() if "origin" in df.columns else []
    champ_origins = _origins_of(champion[1]) if champion else None
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
    out["report"] = ev.restrict_to_present(_score(clf, subset, cfg))
    if champion is not None and list(champion[1].labels) == list(clf.labels):
        out["champion_report"] = ev.restrict_to_present(_score(champion[1], subset, cfg))
        out["deltas"] = ev.deltas(out["report"], out["champion_report"])
    return out


def _newest_summary(newest: dict[str, Any]) -> dict[str, Any]:
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


def _served_challenger(cfg: EvaluateConfig, model_dir: Path, finetune_dir: Path) -> ServedModel:
    info = (
        finetune_folder.read_info(finetune_dir)
        if finetune_folder.is_finetune_dir(finetune_dir)
        else None
    )
    if not (model_dir / MODEL_FILE).is_file():
        raise FinetuneError(f"{model_dir}: no deployable model (model.onnx); run compress first")
    return ServedModel(str(model_dir), device=cfg.device, info=info)


def _deployed_summary(
    clf: ServedModel, holdout: dict[str, Any], uncalibrated: dict[str, Any], compress: dict
) -> dict[str, Any]:
    """The deployed row of the stage-value table: what is served, at what cost."""
    manifest = clf.predictor.manifest
    variant = manifest.get("variant")
    calib = manifest.get("calibration") or {}
    target = compress.get("target_provider", "cpu")
    bench = ((compress.get("variants") or {}).get(variant) or {}).get("bench", {}).get(target, {})
    ref = (compress.get("reference_bench") or {}).get(target, {})
    parity = ((compress.get("variants") or {}).get(variant) or {}).get("parity") or {}
    speed = (
        bench["throughput"] / ref["throughput"]
        if bench.get("throughput") and ref.get("throughput")
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
        "temperature": calib.get("temperature"),
        "size_mb": round(size, 1),
        "speedup": round(speed, 2) if speed else None,
        "drop_macro_f1": -parity["macro_f1_delta"] if "macro_f1_delta" in parity else None,
    }


def _check_labels(data_dir: Path, clf: ServedModel, model_dir: Path) -> None:
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


def _baseline(cfg: EvaluateConfig, data_dir: Path, labels: list[str], splits: dict) -> dict | None:
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


def _gate(
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


def _metrics(
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


def _confident_wrong_md(title: str, rows: list[dict[str, Any]]) -> str:
    return f"# Most confidently wrong ({title})\n\n" + ev.markdown_table(
        rows, ["confidence", "label", "predicted", "label_probability", "text"]
    )


def _labelled_json(labels: list[str], report: dict[str, Any]) -> str:
    return json.dumps({"labels": labels, **report}, indent=2) + "\n"


def _write_reports(
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
            (tmp / f"{name}.json").write_text(_labelled_json(labels, report))
            (tmp / f"{name}_confident_wrong.md").write_text(
                _confident_wrong_md(name, report["confident_wrong"])
            )
        (tmp / "newest.json").write_text(_labelled_json(labels, newest))
        if "report" in newest:
            (tmp / "newest_confident_wrong.md").write_text(
                _confident_wrong_md(
                    f"newest data: {', '.join(newest['origins'])}",
                    newest["report"]["confident_wrong"],
                )
            )
        if champion_result is not None and champion_result["comparable"]:
            (tmp / "champion_holdout.json").write_text(
                _labelled_json(labels, champion_result["report"])
            )


def _write_plots(plot_dir: Path, labels: list[str], reports: dict[str, Any]) -> None:
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
            pairs = [{"actual": labels[t], "predicted": labels[p]} for t, p in _pairs(report)]
            (tmp / f"{name}_predictions.json").write_text(json.dumps(pairs, indent=0) + "\n")


def _log_result(holdout: dict, baseline: dict | None, gate: dict, newest: dict, table) -> None:
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


def run(
    cfg: EvaluateConfig,
    *,
    model_dir: Path,
    finetune_dir: Path,
    data_dir: Path,
    report_dir: Path,
    plot_dir: Path,
    compress_report: Path | None = None,
    champion: str | None = None,
    root: Path | None = None,
) -> dict[str, Any]:
    # Everything that can fail on bad input happens before anything is written.
    clf = _served_challenger(cfg, model_dir, finetune_dir)
    _check_labels(data_dir, clf, model_dir)
    splits = {name: load_split(data_dir / f"{name}.parquet", clf.labels) for name in SPLITS}
    reports = {name: _score(clf, split, cfg) for name, split in splits.items()}
    # A class with no holdout rows (added after the holdout froze) says nothing about the model:
    # macro-F1 over the classes present, not an F1 of 0 averaged in.
    holdout = ev.restrict_to_present(reports["holdout"])
    uncalibrated = ev.evaluate_predictions(
        splits["holdout"].texts,
        splits["holdout"].labels,
        clf.uncalibrated_proba(splits["holdout"].texts),
        clf.labels,
        n_bins=cfg.calibration_bins,
        k=0,
    )
    champ = load_champion(champion, root or Path.cwd())
    champion_result = _champion(cfg, champ, data_dir, clf.labels) if champ else None
    newest = _newest(cfg, clf, champ, data_dir)
    baseline = _baseline(cfg, data_dir, clf.labels, splits)
    compress = _read_json(compress_report) if compress_report else {}
    deployed = _deployed_summary(clf, holdout, uncalibrated, compress)
    table = stage_value.build(arms=read_arms(finetune_dir), baseline=baseline, deployed=deployed)
    newest_summary = _newest_summary(newest)
    gate = _gate(model_dir, deployed, holdout, champion_result, baseline, newest_summary)
    metrics = _metrics(reports, deployed, baseline, newest_summary, champion_result, gate, table)
    _write_reports(
        report_dir,
        labels=clf.labels,
        reports=reports,
        gate=gate,
        table=table,
        newest=newest,
        champion_result=champion_result,
    )
    _write_plots(plot_dir, clf.labels, reports)
    _log_result(holdout, baseline, gate, newest, table)
    return metrics


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _pairs(report: dict[str, Any]) -> list[tuple[int, int]]:
    """(true, predicted) pairs rebuilt from the confusion matrix, for DVC's confusion template."""
    out = []
    for i, row in enumerate(report["confusion"]):
        for j, count in enumerate(row):
            out.extend([(i, j)] * int(count))
    return out


def champion_ref(params: Params, root: Path) -> str | None:
    """`evaluate.champion: registry` -> the registry's current champion, or None before the first."""
    if params.evaluate.champion != "registry":
        return params.evaluate.champion
    from tunery import tracking

    reg = refs.Registry.of(params, root)
    version = tracking.alias_version(root, reg.name, refs.CHAMPION)
    if version is None:
        log.info("no champion in the registry yet (%s): nothing to compare against", reg.name)
        return None
    log.info("comparing against the registry's champion: %s version %s", reg.name, version)
    return reg.version_uri(version)


def _stage(params: Params, root: Path, tracking_run: Any) -> dict[str, Any]:
    cfg = params.evaluate
    report_dir = root / cfg.report_dir
    plot_dir = root / "plots" / "evaluate"
    metrics = run(
        cfg,
        model_dir=root / params.compress.out_dir,
        finetune_dir=root / params.finetune.out_dir,
        compress_report=root / params.compress.report_dir / "report.json",
        data_dir=root / params.prepare.out_dir,
        report_dir=report_dir,
        plot_dir=plot_dir,
        champion=champion_ref(params, root),
        root=root,
    )
    tracking_run.log_artifact(report_dir, "evaluate")
    tracking_run.log_artifact(plot_dir, "evaluate/plots")
    return metrics


def main(argv: list[str] | None = None) -> None:
    from tunery.stage import stage_main

    stage_main("evaluate", _stage, argv)


if __name__ == "__main__":
    main()
