"""pretrain (images): SimCLR on the unlabelled pool, a ViT from scratch (or a base folder's).

Inputs:  the corpus stage's snapshot, `<corpus.out_dir>/` (tunery/vision/corpus.py):
         `unlabelled.parquet` and `train.parquet` (the pool: images only, labels unused),
         `val.parquet` (the probe's score), `labels.json`. Not prepare's outputs: a small drop of
         labelled images leaves the snapshot, and so this stage, as it is (`corpus.pretrain_policy`).
Outputs: `<out_dir>/` (tunery/vision/encoder_dir.py): `init/` the weights SimCLR started from,
         `model/` after SimCLR, `pretrain.json`; `metrics/pretrain.json` (steps, images/s, the
         loss, the probe: SimCLR vs its starting weights, frozen, on val).

Checkpoints go to `checkpoint_dir` every `simclr.save_steps`; a killed run resumes there, and
they are removed once the output is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunery.vision import pretraining
from tunery.vision.params import VisionParams


def _stage(params: VisionParams, root: Path, tracking_run: Any) -> dict[str, Any]:
    cfg = params.pretrain
    snapshot = root / params.corpus.out_dir
    metrics = pretraining.run(
        cfg,
        params.processor,
        root=root,
        raw_dir=snapshot,
        data_dir=snapshot,
        out_dir=root / cfg.out_dir,
        checkpoint_dir=root / cfg.checkpoint_dir,
    )
    for point in metrics.get("history", []):
        tracking_run.log_metrics({"simclr_loss": point["loss"]}, step=point["step"])
    return metrics


def main(argv: list[str] | None = None) -> None:
    from tunery.stage import stage_main
    from tunery.vision.params import load_vision_params
    from tunery.vision.threads import passive_omp

    passive_omp()  # before torch loads (tunery/vision/threads.py)
    stage_main("pretrain", _stage, argv, loader=load_vision_params)


if __name__ == "__main__":
    main()
