"""export (images): the shipped fine-tuned ViT -> one checked fp32 ONNX model folder.

Inputs:  `<finetune.out_dir>/` (tunery/vision/finetune_dir.py), `<prepare.out_dir>/test.parquet`
         (parity).
Outputs: `<out_dir>/`: `model.onnx` (as exported: onnxruntime's
         transformer fusions target BERT-family text encoders) (opset 17, one `pixel_values` input with a dynamic batch axis,
         `logits` out), `labels.json`, `tunery_model.json` (modality image, the processor
         contract: how images become pixel_values); `metrics/export.json`.

The stage fails, writing nothing, if the graph fails `onnx.checker` or its logits differ from
PyTorch's by more than `max_logit_diff` or agree on fewer than `min_agreement` of the test images.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tunery.io import atomic_dir
from tunery.vision import finetune_dir, splits
from tunery.vision.params import VisionExportConfig, VisionParams

log = logging.getLogger("tunery.export")


def run(
    cfg: VisionExportConfig,
    processor: Any,
    *,
    root: Path,
    finetune: Path,
    data_dir: Path,
    out_dir: Path,
) -> dict[str, Any]:
    from tunery.onnx import compress as comp
    from tunery.onnx import export as ox
    from tunery.vision import deploy
    from tunery.vision.export import export_onnx
    from tunery.vision.finetune import logits
    from tunery.vision.processor import contract

    ft = finetune_dir.read(finetune)
    model = finetune_dir.load_model(finetune)
    _, test_x, test_y = splits.load(data_dir, "test", root, processor, ft["labels"])
    with atomic_dir(out_dir) as tmp:
        export_onnx(model, tmp / "exported.onnx", opset=cfg.opset)
        manifest = ox.write_model_dir(
            tmp,
            onnx_file=tmp / "exported.onnx",
            labels=ft["labels"],
            variant="fp32",
            provider="cpu",
            opset=cfg.opset,
            source={"finetune": ft["info"], "model_type": "vit"},
            processor=contract(processor),
        )
        (tmp / "exported.onnx").unlink()
        ref = logits(model, test_x).numpy()
        got = deploy.run_batches(deploy.runner(tmp / ox.MODEL_FILE), test_x)
        check = comp.parity(ref, got, test_y)
        log.info("fp32 ONNX vs PyTorch on %d test images: %s", len(test_y), check)
        comp.require_export_parity(check, cfg, data_dir / "test.parquet")
    return {
        "method": ft["info"].get("method"),
        "opset": cfg.opset,
        "size_mb": round((out_dir / ox.MODEL_FILE).stat().st_size / 2**20, 3),
        "parity": check,
        "sha256": manifest["sha256"],
    }


def _stage(params: VisionParams, root: Path, tracking_run: Any) -> dict[str, Any]:
    return run(
        params.export,
        params.processor,
        root=root,
        finetune=root / params.finetune.out_dir,
        data_dir=root / params.prepare.out_dir,
        out_dir=root / params.export.out_dir,
    )


def main(argv: list[str] | None = None) -> None:
    from tunery.stage import stage_main
    from tunery.vision.params import load_vision_params
    from tunery.vision.threads import passive_omp

    passive_omp()  # before torch loads (tunery/vision/threads.py)
    stage_main("export", _stage, argv, loader=load_vision_params)


if __name__ == "__main__":
    main()
