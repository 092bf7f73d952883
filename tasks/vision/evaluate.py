"""evaluate (images): the deployed model as served, on the frozen holdout; what each stage bought.

Inputs:  `<compress.out_dir>/` (the deployed, calibrated ONNX folder), `<compress.report_dir>/
         report.json` (its speed-up and drop), `<finetune.out_dir>/arms.json` (the arms and the
         pretrain gate), `<prepare.out_dir>/{train,test,holdout}.parquet` (train: the raw-pixel
         logistic-regression baseline); the registry champion (`evaluate.champion: registry`),
         scored on the same holdout.
Outputs: `<report_dir>/gate.json` (tunery/registry/gate_report.py: what the promotion gate reads),
         `stage_value.{json,md}` (tunery/evaluation/stage_value.py), `holdout.json`, `test.json`;
         `plots/evaluate/` (confusion matrix, reliability diagram, the most confidently wrong
         holdout images as a picture grid); `metrics/evaluate.json`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tunery.evaluation import metrics as ev
from tunery.io import atomic_dir
from tunery.registry import gate_report, refs
from tunery.vision import evaluation as vev
from tunery.vision import finetune_dir, splits
from tunery.vision.params import VisionEvaluateConfig, VisionParams

log = logging.getLogger("tunery.evaluate")


def _plots(report: dict, root: Path, labels: list[str], plot_dir: Path) -> None:
    plot_dir.mkdir(parents=True, exist_ok=True)
    ev.plot_confusion(report["confusion"], labels, plot_dir / "confusion.png", "holdout (served)")
    ev.plot_reliability(
        report["reliability"], report["ece"], plot_dir / "reliability.png", "holdout (served)"
    )
    vev.grid(report["confident_wrong"], root, plot_dir / vev.GRID_FILE)


def run(
    cfg: VisionEvaluateConfig,
    processor: Any,
    *,
    root: Path,
    model_dir: Path,
    finetune: Path,
    compress_report: Path,
    data_dir: Path,
    report_dir: Path,
    plot_dir: Path,
    champion: tuple[str, Path] | None = None,
) -> dict[str, Any]:
    from tunery.vision import deploy

    manifest, _, labels = deploy.folder_processor(model_dir)
    ft = finetune_dir.read(finetune)
    frames = {n: splits.read(data_dir, n) for n in ("test", "holdout")}
    reports = {n: vev.score_folder(model_dir, df, root, labels, cfg) for n, df in frames.items()}
    holdout = ev.restrict_to_present(reports["holdout"])
    baseline = None
    if cfg.baseline:
        _, tx, ty = splits.load(data_dir, "train", root, processor, labels)
        _, hx, hy = splits.load(data_dir, "holdout", root, processor, labels)
        baseline = vev.pixel_baseline((tx, ty), (hx, hy), labels)
    champ = (
        vev.champion_entry(champion[0], champion[1], frames["holdout"], root, labels, cfg)
        if champion
        else None
    )
    deltas = ev.deltas(holdout, champ["report"]) if champ and champ.get("comparable") else None
    shipped = ft["arms"].get("chosen", "pipeline")
    deployed = vev.deployed_entry(
        manifest, holdout, json.loads(compress_report.read_text()), ft["info"]["method"], shipped
    )
    table = vev.table(ft["arms"], baseline, deployed, ft["info"].get("objective", "simclr"))
    gate = gate_report.build(
        holdout=holdout,
        challenger={
            "model": str(model_dir),
            "variant": manifest["variant"],
            "method": ft["info"]["method"],
        },
        champion={k: v for k, v in champ.items() if k != "report"} if champ else None,
        champion_report=champ.get("report") if champ else None,
        deltas=deltas,
        baseline_macro_f1=round(baseline["holdout"]["macro_f1"], 4) if baseline else None,
        newest={},
    )
    _write(report_dir, reports, gate, table)
    _plots(holdout, root, labels, plot_dir)
    from tunery.evaluation import stage_value

    log.info("\n%s", stage_value.terminal(table))
    return {
        "method": ft["info"]["method"],
        "variant": manifest["variant"],
        "test": ev.summary(reports["test"]),
        "holdout": {
            **ev.summary(holdout),
            "ece_uncalibrated": round(holdout["ece_uncalibrated"], 4),
        },
        "baseline_pixels_lr": {"holdout": _scores(baseline["holdout"])} if baseline else None,
        "holdout_macro_f1_over_baseline": round(
            holdout["macro_f1"] - baseline["holdout"]["macro_f1"], 4
        )
        if baseline
        else None,
        "champion": {"holdout": ev.summary(champ["report"])}
        if champ and champ.get("comparable")
        else None,
        "deltas": deltas,
        "stage_value": {r["row"]: r["macro_f1"] for r in table["rows"]},
        "verdicts": table["verdicts"],
    }


def _scores(report: dict) -> dict[str, Any]:
    """A classifier's headline numbers without calibration (the baseline has no probabilities)."""
    return {
        "rows": report["rows"],
        "accuracy": round(report["accuracy"], 4),
        "macro_f1": round(report["macro_f1"], 4),
        "per_class_f1": {label: round(m["f1"], 4) for label, m in report["per_class"].items()},
    }


def _write(report_dir: Path, reports: dict, gate: dict, table: dict) -> None:
    from tunery.evaluation import stage_value

    with atomic_dir(report_dir) as tmp:
        for name, report in reports.items():
            (tmp / f"{name}.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
        gate_report.write(tmp, gate)
        stage_value.write(tmp, table)


def champion_of(params: VisionParams, root: Path) -> tuple[str, Path] | None:
    """`evaluate.champion`: the registry's champion (a local copy) or a model folder, or None."""
    ref = params.evaluate.champion
    if ref is None:
        return None
    if ref != "registry":
        return ref, (Path(ref) if Path(ref).is_absolute() else root / ref)
    from tunery import tracking
    from tunery.registry.registration import resolve_registry_uri

    reg = refs.Registry.of(params, root)
    version = tracking.alias_version(root, reg.name, refs.CHAMPION)
    if version is None:
        log.info("no champion in the registry yet (%s): nothing to compare against", reg.name)
        return None
    log.info("comparing against the registry's champion: %s version %s", reg.name, version)
    return reg.version_uri(version), resolve_registry_uri(reg.version_uri(version))


def _stage(params: VisionParams, root: Path, tracking_run: Any) -> dict[str, Any]:
    cfg = params.evaluate
    report_dir = root / cfg.report_dir
    plot_dir = root / "plots" / "evaluate"
    metrics = run(
        cfg,
        params.processor,
        root=root,
        model_dir=root / params.compress.out_dir,
        finetune=root / params.finetune.out_dir,
        compress_report=root / params.compress.report_dir / "report.json",
        data_dir=root / params.prepare.out_dir,
        report_dir=report_dir,
        plot_dir=plot_dir,
        champion=champion_of(params, root),
    )
    tracking_run.log_artifact(report_dir, "evaluate")
    tracking_run.log_artifact(plot_dir, "evaluate/plots")
    return metrics


def main(argv: list[str] | None = None) -> None:
    from tunery.stage import stage_main
    from tunery.vision.params import load_vision_params
    from tunery.vision.threads import passive_omp

    passive_omp()  # before torch loads (tunery/vision/threads.py)
    stage_main("evaluate", _stage, argv, loader=load_vision_params)


if __name__ == "__main__":
    main()
