"""pretrain: self-supervised pretraining of the encoder that later stages fine-tune.

Inputs:  `<corpus.out_dir>/corpus.parquet` (column text: unlabelled pretraining texts) and
         `<corpus.out_dir>/{train,val}.parquet` (text, label: only for the probe) — the corpus
         stage's snapshot of `prepare`'s outputs (or `prepare.out_dir` itself without that stage).
Outputs: `<out_dir>/` config.json + model.safetensors + tokenizer files (`from_pretrained`
         loadable with AutoModel, AutoModelForSequenceClassification and AutoTokenizer; the
         tokenizer returns token_type_ids); `metrics/pretrain.json` (held-out loss, probe accuracy
         of the pretrained encoder and of the same architecture with random weights, throughput);
         `plots/pretrain/loss.{png,json}`. Checkpoints live in `<checkpoint_dir>` (outside the DVC
         output): a re-run after a crash or kill resumes from the newest complete one.

Initialisation: `scratch` (a BERT built from params + a WordPiece tokenizer trained on the corpus)
or `base` (a model folder, `package:<module>`, or a hub id; its own tokenizer). Objectives: `mlm`
(BERT masking, optional whole-word, sparse head; a base without an MLM head needs
`mlm.head_warmup_steps` > 0) or `simcse` (unsupervised; `simcse.deletion` > 0 deletes tokens from
the second view). Training is `transformers.Trainer`; it runs unchanged under `torchrun` (DDP;
rank 0 evaluates, writes and logs). It stops at `train.max_steps` (or `epochs`); a wall-clock
`train.max_minutes` is off by default, and a stop on it is recorded in the metrics.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tunery.config import Params, PretrainConfig
from tunery.io import write_json
from tunery.modeling import pretrainer as pl
from tunery.modeling.encoder import write_encoder

log = logging.getLogger("tunery.pretrain")


def run(
    cfg: PretrainConfig,
    *,
    data_dir: Path,
    out_dir: Path,
    checkpoint_dir: Path,
    plots_dir: Path,
) -> dict[str, Any]:
    from tunery.modeling import objectives as pt
    from tunery.modeling import training

    started = time.perf_counter()
    main = training.is_main_process()
    if cfg.train.threads:
        import torch

        torch.set_num_threads(cfg.train.threads)
    inputs = pl.load_inputs(cfg, data_dir)
    trained = pl.train(cfg, inputs, checkpoint_dir=checkpoint_dir, main=main)
    if not main:
        return {}
    history = training.loss_history(trained.trainer.state.log_history)
    twin = pl.twin_of(cfg, trained)
    heldout = pl.heldout_losses(cfg, trained, twin, inputs.held_texts)
    probe = pl.probes(cfg, trained, twin, inputs)
    del twin
    write_encoder(out_dir, cfg, trained.model, trained.tok, check_texts=inputs.probe_val[0][:8])
    plots_dir.mkdir(parents=True, exist_ok=True)
    write_json(plots_dir / "loss.json", history)
    pt.plot_loss(history, plots_dir / "loss.png", title=f"pretrain ({cfg.init}, {cfg.objective})")
    metrics = pl.metrics(
        cfg, trained, history=history, heldout=heldout, probe=probe, started=started
    )
    log.info(
        "pretrained %d steps in %.1f s; probe %s vs random %s",
        trained.trainer.state.global_step,
        trained.train_seconds,
        probe["pretrained"],
        probe["random"],
    )
    return metrics


def _stage(params: Params, root: Path, tracking_run: Any) -> dict[str, Any]:
    cfg = params.pretrain
    plots = root / "plots" / "pretrain"
    snapshot = getattr(params, "corpus", None)  # the corpus stage's snapshot, where it exists
    metrics = run(
        cfg,
        data_dir=root / (snapshot.out_dir if snapshot is not None else params.prepare.out_dir),
        out_dir=root / cfg.out_dir,
        checkpoint_dir=root / cfg.checkpoint_dir,
        plots_dir=plots,
    )
    if tracking_run is not None and metrics:
        for point in json.loads((plots / "loss.json").read_text()):
            tracking_run.log_metrics({"train_loss": point["loss"]}, step=point["step"])
        tracking_run.log_artifact(plots / "loss.png", "plots")
        tracking_run.set_tags(
            {"tunery.pretrain.init": cfg.init, "tunery.pretrain.objective": cfg.objective}
        )
    return metrics


def main(argv: list[str] | None = None) -> None:
    from tunery.modeling import training

    if training.is_main_process():
        from tunery.stage import stage_main

        stage_main("pretrain", _stage, argv)
    else:
        training.worker_main("tasks.pretrain", _rank_stage, argv)
    training.shutdown_distributed()


def _rank_stage(params: Params, root: Path) -> None:
    """A DDP rank other than 0: trains its share; rank 0 evaluates, writes and logs."""
    _stage(params, root, None)


if __name__ == "__main__":
    main()
