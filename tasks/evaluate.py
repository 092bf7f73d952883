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

import logging
from pathlib import Path
from typing import Any

from tunery.config import EvaluateConfig, Params
from tunery.data.labelled import load_split
from tunery.evaluation import metrics as ev
from tunery.evaluation import reports as written
from tunery.evaluation import served, stage_value
from tunery.modeling.finetune_dir import read_arms
from tunery.onnx import compress_report
from tunery.registry import gate_report, refs

log = logging.getLogger("tunery.evaluate")

SPLITS = ("test", "holdout")
GATE_FILE = gate_report.FILE


def run(
    cfg: EvaluateConfig,
    *,
    model_dir: Path,
    finetune_dir: Path,
    data_dir: Path,
    report_dir: Path,
    plot_dir: Path,
    compress_report_dir: Path | None = None,
    champion: str | None = None,
    root: Path | None = None,
) -> dict[str, Any]:
    # Everything that can fail on bad input happens before anything is written.
    clf = served.served_challenger(cfg, model_dir, finetune_dir)
    served.check_labels(data_dir, clf, model_dir)
    splits = {name: load_split(data_dir / f"{name}.parquet", clf.labels) for name in SPLITS}
    scored = {name: served.score(clf, split, cfg) for name, split in splits.items()}
    # A class with no holdout rows (added after the holdout froze) says nothing about the model:
    # macro-F1 over the classes present, not an F1 of 0 averaged in.
    holdout = ev.restrict_to_present(scored["holdout"])
    uncalibrated = ev.evaluate_predictions(
        splits["holdout"].texts,
        splits["holdout"].labels,
        clf.uncalibrated_proba(splits["holdout"].texts),
        clf.labels,
        n_bins=cfg.calibration_bins,
        k=0,
    )
    champ = served.load_champion(champion, root or Path.cwd())
    champion_result = served.champion_holdout(cfg, champ, data_dir, clf.labels) if champ else None
    newest = served.score_newest(cfg, clf, champ, data_dir)
    baseline = served.baseline_scores(cfg, data_dir, clf.labels, splits)
    compress = compress_report.read(compress_report_dir) if compress_report_dir else {}
    deployed = served.deployed_summary(clf, holdout, uncalibrated, compress)
    table = stage_value.build(arms=read_arms(finetune_dir), baseline=baseline, deployed=deployed)
    newest_summary = served.newest_summary_of(newest)
    gate = written.gate(model_dir, deployed, holdout, champion_result, baseline, newest_summary)
    metrics = written.metrics(
        scored, deployed, baseline, newest_summary, champion_result, gate, table
    )
    written.write_reports(
        report_dir,
        labels=clf.labels,
        reports=scored,
        gate=gate,
        table=table,
        newest=newest,
        champion_result=champion_result,
    )
    written.write_plots(plot_dir, clf.labels, scored)
    written.log_result(holdout, baseline, gate, newest, table)
    return metrics


def champion_ref(cfg: EvaluateConfig, reg: refs.Registry) -> str | None:
    """`evaluate.champion: registry` -> the registry's current champion, or None before the first."""
    if cfg.champion != "registry":
        return cfg.champion
    from tunery import tracking

    version = tracking.alias_version(reg.root, reg.name, refs.CHAMPION)
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
        compress_report_dir=root / params.compress.report_dir,
        data_dir=root / params.prepare.out_dir,
        report_dir=report_dir,
        plot_dir=plot_dir,
        champion=champion_ref(cfg, refs.Registry.of(params, root)),
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
