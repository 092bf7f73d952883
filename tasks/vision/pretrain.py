"""pretrain (images): SimCLR or MAE (`pretrain.objective`) on the unlabelled pool, a ViT from
scratch (or a base folder's).

Inputs:  the corpus stage's snapshot, `<corpus.out_dir>/` (tunery/vision/corpus.py):
         `unlabelled.parquet` and `train.parquet` (the pool: images only, labels unused),
         `val.parquet` (the probe's score), `labels.json`. Not prepare's outputs: a small drop of
         labelled images leaves the snapshot, and so this stage, as it is (`corpus.pretrain_policy`).
Outputs: `<out_dir>/` (tunery/vision/encoder_dir.py): `init/` the weights pretraining started
         from, `model/` after it, `pretrain.json`; `metrics/pretrain.json` (the objective, steps,
         images/s, the loss, the probe: the pretrained encoder vs its starting weights, frozen,
         on val).

Checkpoints go to `checkpoint_dir` every `save_steps` of the objective's section; a killed run
resumes from the newest complete one made with the same settings and pool, and they are removed
once the output is written. It runs unchanged under `torchrun` (DDP; the `batch_size` is the global batch; rank 0
probes, writes and logs), e.g. `torchrun --standalone --nproc-per-node 2 -m tasks.vision.pretrain`
as the stage's `cmd` in vision/dvc.yaml.
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
    if tracking_run is not None:
        for point in metrics.get("history", []):
            tracking_run.log_metrics({f"{cfg.objective}_loss": point["loss"]}, step=point["step"])
    return metrics


def _rank_stage(params: VisionParams, root: Path) -> None:
    """A DDP rank other than 0: trains its share; rank 0 probes, writes and logs."""
    _stage(params, root, None)


def main(argv: list[str] | None = None) -> None:
    from tunery.vision.threads import passive_omp

    passive_omp()  # before torch loads (tunery/vision/threads.py)
    from tunery.modeling import training
    from tunery.vision.params import load_vision_params

    if training.is_main_process():
        from tunery.stage import stage_main

        stage_main("pretrain", _stage, argv, loader=load_vision_params)
    else:
        training.worker_main("tasks.vision.pretrain", _rank_stage, argv, loader=load_vision_params)
    training.shutdown_distributed()


if __name__ == "__main__":
    main()
