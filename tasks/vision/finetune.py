"""finetune (images): full fine-tuning (default) or LoRA of SimCLR's ViT, and the arms judging it.

Inputs:  `<prepare.out_dir>/{train,val,test,holdout}.parquet` + `labels.json` (train: the
         low-label set; every arm is scored on val, test and holdout; only val chooses),
         `<pretrain.out_dir>/{init,model}` (tunery/vision/encoder_dir.py).
Outputs: `<out_dir>/` (tunery/vision/finetune_dir.py): the shipped classifier (LoRA merged),
         labels, finetune.json, arms.json (probe, base = no pretraining, pipeline, full, lora
         when the method is full, and the pretrain gate's decision); `metrics/finetune.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunery.io import atomic_dir
from tunery.vision import arms as arm_runs
from tunery.vision import encoder_dir, finetune_dir, splits
from tunery.vision.params import VisionFinetuneConfig, VisionParams


def run(
    cfg: VisionFinetuneConfig,
    processor: Any,
    *,
    root: Path,
    data_dir: Path,
    encoder: Path,
    out_dir: Path,
) -> dict[str, Any]:
    from tunery.vision.processor import contract

    labels = splits.labels(data_dir)
    data = {
        name: splits.load(data_dir, name, root, processor, labels)[1:]
        for name in ("train", *arm_runs.SCORED)
    }
    objective = encoder_dir.objective(encoder)
    model, arms = arm_runs.run_arms(
        cfg,
        processor,
        labels,
        data,
        init_dir=encoder_dir.init_dir(encoder),
        pretrained_dir=encoder_dir.model_dir(encoder),
        objective=objective,
    )
    chosen = arms["chosen"]
    shipped = arms["arms"][chosen]
    info = {
        "modality": "image",
        "method": cfg.method,
        "chosen_arm": chosen,
        "encoder": objective if chosen == "pipeline" else "init (no pretraining)",
        "objective": objective,  # what made the pretrained encoder (the arms' pipeline)
        "processor": contract(processor),
        "settings": cfg.model_dump(mode="json"),
        "train_rows": len(data["train"][1]),
    }
    with atomic_dir(out_dir) as tmp:
        finetune_dir.write(tmp, model, labels, info, arms)
    return {
        "method": cfg.method,
        "chosen_arm": chosen,
        "pretrain_gate_applied": bool(arms["pretrain_gate"].get("applied")),
        "pretrain_pays": arms["pretrain_gate"].get("pays"),
        "trainable_share": shipped["trainable_share"],
        "train_seconds": shipped["train_seconds"],
        "best_val_macro_f1": shipped["val"]["macro_f1"],
        "train_rows": info["train_rows"],
        "arms": {
            name: {f"{split}_{k}": v for split in arm_runs.SCORED for k, v in a[split].items()}
            for name, a in arms["arms"].items()
        },
    }


def _stage(params: VisionParams, root: Path, tracking_run: Any) -> dict[str, Any]:
    metrics = run(
        params.finetune,
        params.processor,
        root=root,
        data_dir=root / params.prepare.out_dir,
        encoder=root / params.pretrain.out_dir,
        out_dir=root / params.finetune.out_dir,
    )
    tracking_run.set_tags({"chosen_arm": metrics["chosen_arm"]})
    return metrics


def main(argv: list[str] | None = None) -> None:
    from tunery.stage import stage_main
    from tunery.vision.params import load_vision_params
    from tunery.vision.threads import passive_omp

    passive_omp()  # before torch loads (tunery/vision/threads.py)
    stage_main("finetune", _stage, argv, loader=load_vision_params)


if __name__ == "__main__":
    main()
