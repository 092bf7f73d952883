"""compress: ONNX variants of the exported model, each checked on the task; deploy the best one.

Inputs:  `<export.out_dir>/{model.onnx, raw.onnx, tokenizer, labels.json}`, `<finetune.out_dir>/merged`
         (the PyTorch reference, and the source for pruning), `<prepare.out_dir>/{val,test}.parquet`
         (the accuracy checks; test alone for timing; val also fits the temperature),
         `<prepare.out_dir>/train.parquet` (calibration texts; the pruned model's recovery).
Outputs: `<variants_dir>/<variant>/` one deployable folder per variant kept (fp32, int8_dynamic, and
         when listed fp16, int8_static, with `prune.enabled` pruned_fp32/pruned_int8_dynamic when
         within budget: whole layers/heads/FFN neurons removed, then `prune.recovery.steps` of distillation
         towards the fine-tune on train, `tunery.onnx.distill`); `<out_dir>/` the selected variant with its calibrated probabilities as a
         second graph output (model.onnx, tokenizer, labels.json, tunery_model.json), loadable on
         its own by `tunery.Predictor`; `<report_dir>/report.{json,md}`,
         `plots/compress/tradeoff.png`; `metrics/compress.json`.

Selection: the fastest variant on `target_provider` whose macro-F1 on val + test together is at
most `max_f1_drop` below the PyTorch model's (point estimate; a paired bootstrap 95 % interval is
reported beside it). A dynamic int8 variant over budget first keeps its most sensitive nodes in
float (`int8.max_fallback_nodes`); a pruned variant over budget is recorded with its numbers
(report table row "no: over budget"), not kept; a variant whose quantization fails is recorded,
not fatal. The
deployed graph gets `probabilities = Softmax(logits / T)`, T fitted on val (`tunery.onnx.calibration`).
The stage fails, writing nothing, if none qualifies or the target provider is not available here.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from tunery.config import CompressConfig, Params
from tunery.onnx import variants as vs
from tunery.onnx.export import MANIFEST_FILE


def run(
    cfg: CompressConfig,
    *,
    finetune_dir: Path,
    export_dir: Path,
    data_dir: Path,
    variants_dir: Path,
    out_dir: Path,
    report_dir: Path,
    plot_path: Path,
) -> dict[str, Any]:
    from tunery.onnx import compress as comp

    setup = vs.load_setup(cfg, finetune_dir=finetune_dir, export_dir=export_dir, data_dir=data_dir)
    singles, groups = vs.bench_inputs(cfg, setup)
    with tempfile.TemporaryDirectory(
        dir=variants_dir.parent if variants_dir.parent.exists() else None
    ) as scratch:
        work = Path(scratch)
        built = vs.build_variants(
            cfg, setup, export_dir=export_dir, work=work, singles=singles, groups=groups
        )
        # PyTorch timed right after the variants (`build_variants` times them all at its end):
        # the × PyTorch ratios are measured side by side, not minutes apart.
        reference_bench = vs.reference_bench(cfg, setup, singles, groups)
        selected, eligible = comp.select(
            built.variants,
            target=cfg.target_provider,
            max_f1_drop=cfg.max_f1_drop,
            rank_by=cfg.rank_by,
        )
        calibration = vs.calibrate(setup, built.logits_of[selected])
        vs.write_outputs(
            cfg,
            setup,
            built,
            selected=selected,
            eligible=eligible,
            calibration=calibration,
            work=work,
            variants_dir=variants_dir,
            out_dir=out_dir,
        )
    report = vs.report(
        cfg,
        setup,
        built,
        reference_bench=reference_bench,
        selected=selected,
        eligible=eligible,
        calibration=calibration,
    )
    vs.write_report(report, report_dir, plot_path)
    return vs.metrics(report)


def _stage(params: Params, root: Path, tracking_run: Any) -> dict[str, Any]:
    cfg = params.compress
    report_dir = root / cfg.report_dir
    plot = root / "plots" / "compress" / "tradeoff.png"
    metrics = run(
        cfg,
        finetune_dir=root / params.finetune.out_dir,
        export_dir=root / params.export.out_dir,
        data_dir=root / params.prepare.out_dir,
        variants_dir=root / cfg.variants_dir,
        out_dir=root / cfg.out_dir,
        report_dir=report_dir,
        plot_path=plot,
    )
    tracking_run.log_artifact(report_dir, "compress")
    tracking_run.log_artifact(plot, "compress")
    tracking_run.log_dict(
        json.loads((root / cfg.out_dir / MANIFEST_FILE).read_text()), "compress/deploy.json"
    )
    tracking_run.set_tags({"tunery.compress.selected": metrics["selected"]})
    return metrics


def main(argv: list[str] | None = None) -> None:
    from tunery.stage import stage_main

    stage_main("compress", _stage, argv)


if __name__ == "__main__":
    main()
