"""export: the merged fine-tuned model -> one checked, optimized fp32 ONNX model.

Inputs:  `<finetune.out_dir>/{merged/, labels.json, finetune.json}` (merged = a plain
         AutoModelForSequenceClassification folder; absent for prefix tuning, which cannot be
         exported), `<prepare.out_dir>/test.parquet` (parity check).
Outputs: `<out_dir>/` a deployable folder: `model.onnx` (opset >= 17, dynamic batch and sequence
         axes, onnxruntime transformer fusions for BERT-family encoders), `raw.onnx` (the graph as
         exported, for static quantization), tokenizer files, `labels.json`, `tunery_model.json`;
         `metrics/export.json` (fused operators, parity against PyTorch on the test split).

The stage fails, writing nothing, if the graph fails `onnx.checker` or its logits differ from
PyTorch's by more than `max_logit_diff` or agree on fewer than `min_agreement` of the test texts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tunery.config import ExportConfig, Params
from tunery.errors import TuneryError
from tunery.io import atomic_dir
from tunery.onnx.export import MANIFEST_FILE

log = logging.getLogger("tunery.export")


def run(cfg: ExportConfig, *, finetune_dir: Path, data_dir: Path, out_dir: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from tunery.data.tokens import unpadded
    from tunery.onnx import compress as comp
    from tunery.onnx import export as ox

    ft = ox.load_finetuned(finetune_dir)
    model = ox.load_torch_model(ft.merged_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(ft.merged_dir))
    model_type, heads, hidden = ox.model_shape(model)
    test = pd.read_parquet(data_dir / "test.parquet")
    y_true = test["label"].map({label: i for i, label in enumerate(ft.labels)}).to_numpy()
    if np.isnan(y_true.astype(float)).any():
        raise TuneryError(f"{data_dir / 'test.parquet'}: labels not in {finetune_dir}/labels.json")

    with atomic_dir(out_dir) as tmp:
        names = ox.export_onnx(
            model, tokenizer, tmp / "raw.onnx", opset=cfg.opset, max_length=ft.max_length
        )
        fused: dict[str, int] = {}
        if cfg.optimize:
            fused = ox.optimize(
                tmp / "raw.onnx",
                tmp / "opt.onnx",
                model_type=model_type,
                num_heads=heads,
                hidden_size=hidden,
            )
        else:
            (tmp / "opt.onnx").write_bytes((tmp / "raw.onnx").read_bytes())
        manifest = ox.write_model_dir(
            tmp,
            onnx_file=tmp / "opt.onnx",
            tokenizer=tokenizer,
            labels=ft.labels,
            variant="fp32",
            provider="cpu",
            opset=cfg.opset,
            max_length=ft.max_length,
            source={"finetune": ft.info, "model_type": model_type},
            extra={"fused_operators": fused, "inputs": names},
        )
        (tmp / "opt.onnx").unlink()

        encoded = unpadded(tokenizer, test["text"].tolist(), max_length=ft.max_length)
        n = len(ft.labels)
        ref = comp.run_batches(comp.torch_forward(model), encoded, cfg.batch_size, names, n)
        runner = comp.onnx_runner(tmp / ox.MODEL_FILE, "cpu")
        got = comp.run_batches(runner, encoded, cfg.batch_size, runner.input_names, n)
        check = comp.parity(ref, got, y_true)
        log.info("fp32 ONNX vs PyTorch on %d test texts: %s", len(test), check)
        comp.require_export_parity(check, cfg, data_dir / "test.parquet")
    return {
        "method": ft.info.get("method"),
        "opset": cfg.opset,
        "size_mb": round((out_dir / ox.MODEL_FILE).stat().st_size / 2**20, 2),
        "fused_operators": fused,
        "parity": check,
        "sha256": manifest["sha256"],
    }


def _stage(params: Params, root: Path, tracking_run: Any) -> dict[str, Any]:
    out_dir = root / params.export.out_dir
    metrics = run(
        params.export,
        finetune_dir=root / params.finetune.out_dir,
        data_dir=root / params.prepare.out_dir,
        out_dir=out_dir,
    )
    tracking_run.log_artifact(out_dir / MANIFEST_FILE, "export")
    return metrics


def main(argv: list[str] | None = None) -> None:
    from tunery.stage import stage_main

    stage_main("export", _stage, argv)


if __name__ == "__main__":
    main()
