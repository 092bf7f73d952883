"""compress (images): ONNX variants of the exported ViT, each checked on the task; deploy one.

Inputs:  `<export.out_dir>/model.onnx`, `<finetune.out_dir>/` (the PyTorch reference),
         `<prepare.out_dir>/{val,test}.parquet` (judged together; they also fit the temperature),
         `<prepare.out_dir>/train.parquet` (static int8 calibration images; with
         `prune.enabled` also the pruning's scores and, with `<ingest.out_dir>/unlabelled.parquet`,
         the images the pruned model is distilled on, labels unused).
Outputs: `<variants_dir>/<variant>/` a model folder per variant built; `<out_dir>/` the selected
         one with calibrated probabilities as a second output (modality image, the processor
         contract, labels.json, tunery_model.json); `<report_dir>/report.{json,md}`;
         `metrics/compress.json`.

Selection (tunery/vision/variants.py): the text compress's rule, the fastest variant on
`target_provider` within `max_f1_drop` of PyTorch's macro-F1 on val + test. The stage fails,
writing nothing, if none qualifies. With `prune.enabled` a pruned and distilled copy of the
fine-tune (tunery/vision/prune.py, recovery.py) is exported and built as pruned_fp32 and
pruned_int8_dynamic, judged and timed by the same rule against the same unpruned PyTorch model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from tunery.io import atomic_dir
from tunery.vision import finetune_dir, splits
from tunery.vision.params import VisionCompressConfig, VisionParams

log = logging.getLogger("tunery.compress")


def recovery_pool(
    cfg: VisionCompressConfig, processor: Any, root: Path, raw_dir: Path | None, data_dir: Path
) -> Any:
    """The images the pruned model is distilled on: up to `prune.images` of the unlabelled pool
    (`<raw_dir>/unlabelled.parquet`, absent: none) and the train split's images; labels unused.
    Never val, test or holdout (the pool is the training images outside the labelled ones)."""
    import pandas as pd

    frames = [splits.read(data_dir, "train")]
    unlabelled = Path(raw_dir) / "unlabelled.parquet" if raw_dir else None
    if unlabelled is not None and unlabelled.is_file() and cfg.prune.images:
        frames.insert(0, pd.read_parquet(unlabelled).head(cfg.prune.images))
    both = pd.concat([f[["root", "image", "sha256"]] for f in frames], ignore_index=True)
    return splits.pixels(both.drop_duplicates("sha256"), root, processor)


def _context(
    cfg: VisionCompressConfig,
    processor: Any,
    root: Path,
    finetune: Path,
    data_dir: Path,
    raw_dir: Path | None = None,
) -> dict:
    import torch

    from tunery.vision import deploy
    from tunery.vision.finetune import logits
    from tunery.vision.processor import contract

    ft = finetune_dir.read(finetune)
    model = finetune_dir.load_model(finetune)
    names = ft["labels"]
    _, val_x, val_y = splits.load(data_dir, "val", root, processor, names)
    _, test_x, test_y = splits.load(data_dir, "test", root, processor, names)
    train = splits.read(data_dir, "train").head(cfg.calibration_samples)
    judged_x = torch.cat([val_x, test_x])
    b = cfg.bench
    return {
        "labels": names,
        "model": model,
        "pool": recovery_pool(cfg, processor, root, raw_dir, data_dir)
        if cfg.prune.enabled
        else None,
        "judged": (judged_x, np.concatenate([val_y, test_y])),
        "ref": logits(model, judged_x).numpy(),
        "calibration": splits.pixels(train, root, processor),
        "bench_x": test_x,
        "torch_throughput": deploy.torch_throughput(
            model,
            test_x,
            batch=b.throughput_batch,
            batches=b.throughput_batches,
            repeats=b.throughput_repeats,
            threads=b.threads,
            timer=cfg.clock,
        ),
        "folder": {
            "labels": names,
            "provider": "cpu",
            "opset": 17,
            "source": {"finetune": ft["info"], "model_type": "vit"},
            "processor": contract(processor),
        },
    }


def run(
    cfg: VisionCompressConfig,
    processor: Any,
    *,
    root: Path,
    finetune: Path,
    export_dir: Path,
    data_dir: Path,
    variants_dir: Path,
    out_dir: Path,
    report_dir: Path,
    raw_dir: Path | None = None,
) -> dict[str, Any]:
    from tunery.onnx.export import MODEL_FILE
    from tunery.vision import variants as vs

    ctx = _context(cfg, processor, root, finetune, data_dir, raw_dir)
    torch_tp = ctx["torch_throughput"]
    log.info(
        "PyTorch eager fp32: %.1f images/s (batch %d, %s clock)",
        torch_tp,
        cfg.bench.throughput_batch,
        cfg.clock,
    )
    with atomic_dir(variants_dir) as vtmp:
        variants = vs.build_all(cfg, export_dir / MODEL_FILE, vtmp, ctx)
        selected, eligible = vs.select(variants, cfg)
        for v in variants.values():
            cpu = v.get("bench", {}).get("cpu")
            if cpu:
                v["cpu_speedup_vs_pytorch"] = round(cpu["throughput"] / torch_tp, 3)
        chosen = variants[selected]
        folder_args = {**ctx["folder"], "provider": cfg.target_provider}
        with atomic_dir(out_dir) as dtmp:
            deployed = vs.deploy_selected(
                vtmp / selected,
                dtmp,
                ctx["judged"],
                folder_args,
                {
                    "speedup_vs_pytorch": chosen.get("cpu_speedup_vs_pytorch"),
                    "parity": chosen["parity"],
                    **({"prune": ctx["prune"]} if selected in vs.PRUNED else {}),
                },
            )
    log.info("deployed %s (eligible, fastest first: %s)", selected, ", ".join(eligible))
    report = {
        "rule": (
            f"fastest on {cfg.target_provider} by {cfg.rank_by} ({cfg.clock} clock) with "
            f"macro-F1 drop <= {cfg.max_f1_drop} on val+test"
        ),
        "judged_rows": len(ctx["judged"][1]),
        "pytorch_throughput": torch_tp,
        "variants": variants,
        "eligible": eligible,
        "selected": selected,
        "parity_passed": True,
        "calibration": deployed["calibration"],
        **({"prune": ctx["prune"]} if "prune" in ctx else {}),
    }
    with atomic_dir(report_dir) as rtmp:
        (rtmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        lines = [f"# Compression ({report['rule']})", ""]
        lines += [f"- {vs.variant_line(n, v, torch_tp)}" for n, v in variants.items()]
        if "prune" in ctx:
            lines += ["", vs.prune_line(ctx["prune"])]
        lines += [
            "",
            f"Deployed: **{selected}**, temperature {deployed['calibration']['temperature']:.3g}.",
        ]
        (rtmp / "report.md").write_text("\n".join(lines) + "\n")
    return {
        "selected": selected,
        "selected_size_mb": chosen["size_mb"],
        "selected_macro_f1_delta": round(chosen["parity"]["macro_f1_delta"], 4),
        "pytorch_throughput": torch_tp,
        "calibration": {"temperature": round(deployed["calibration"]["temperature"], 4)},
        "selected_agreement": round(chosen["parity"]["agreement"], 4),
        "variants": {
            n: {k: v[k] for k in ("cpu_speedup_vs_pytorch", "size_mb") if k in v}
            for n, v in variants.items()
        },
    }


def _stage(params: VisionParams, root: Path, tracking_run: Any) -> dict[str, Any]:
    cfg = params.compress
    return run(
        cfg,
        params.processor,
        root=root,
        finetune=root / params.finetune.out_dir,
        export_dir=root / params.export.out_dir,
        data_dir=root / params.prepare.out_dir,
        variants_dir=root / cfg.variants_dir,
        out_dir=root / cfg.out_dir,
        report_dir=root / cfg.report_dir,
        raw_dir=root / params.ingest.out_dir,
    )


def main(argv: list[str] | None = None) -> None:
    from tunery.stage import stage_main
    from tunery.vision.params import load_vision_params
    from tunery.vision.threads import passive_omp

    passive_omp()  # before torch loads (tunery/vision/threads.py)
    stage_main("compress", _stage, argv, loader=load_vision_params)


if __name__ == "__main__":
    main()
