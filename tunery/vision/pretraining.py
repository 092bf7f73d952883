"""The image pretrain stage's work: SimCLR on the pool, then a probe against the starting weights.

The pool is the unlabelled images plus the train split's images (labels unused; never val, test
or holdout), read in the pipeline from the corpus stage's snapshot (tunery/vision/corpus.py). The
starting weights are kept (`init/`), so the fine-tune's "no pretraining" arm starts from exactly
what SimCLR started from. The probe (logistic regression on frozen mean-pooled
embeddings, train split -> val split) tells, before any fine-tuning, whether SimCLR taught the
encoder anything a random ViT's features do not already give.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from tunery.io import atomic_dir
from tunery.vision import encoder_dir, splits
from tunery.vision.corpus import pool_frame

log = logging.getLogger("tunery.pretrain")


def build(cfg: Any, processor: Any, root: Path) -> Any:
    """The SimCLR model to train: a ViT of `cfg.vit`'s size, or on `cfg.base`'s encoder."""
    from tunery.vision.simclr import build_simclr

    base = None
    if cfg.init == "base":
        if not cfg.base:
            from tunery.errors import ConfigError

            raise ConfigError("pretrain.init is 'base' but pretrain.base names no folder")
        base = Path(root) / cfg.base
    return build_simclr(processor, cfg.simclr, spec=cfg.vit, base_dir=base)


def probe(init: Any, trained: Any, train: tuple, val: tuple, max_train: int) -> dict[str, Any]:
    """Val accuracy of a logistic regression on frozen embeddings: SimCLR vs its start."""
    from tunery.vision.probe import probe as run_probe

    (train_x, train_y), (val_x, val_y) = train, val
    train_x, train_y = train_x[:max_train], train_y[:max_train]
    pooling = trained.config.simclr_pooling
    scores = run_probe(
        {"simclr": trained, "init": init}, train_x, train_y, val_x, val_y, pooling=pooling
    )
    scores["diff_pt"] = round(100 * (scores["simclr"] - scores["init"]), 2)
    return scores


def fresh_checkpoints(checkpoint_dir: Path, key: dict[str, Any]) -> None:
    """Keep `checkpoint_dir`'s checkpoints only if they belong to this run (same settings, same
    pool): a resume must never continue another configuration's training."""
    marker = Path(checkpoint_dir) / "run.json"
    wanted = json.dumps(key, sort_keys=True)
    if marker.is_file() and marker.read_text() != wanted:
        log.info("checkpoints in %s are another run's: starting over", checkpoint_dir)
        shutil.rmtree(checkpoint_dir)
    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    marker.write_text(wanted)


def run(
    cfg: Any,
    processor: Any,
    *,
    root: Path,
    raw_dir: Path,
    data_dir: Path,
    out_dir: Path,
    checkpoint_dir: Path,
) -> dict[str, Any]:
    """Pretrain, probe, and write the encoder folder (tunery/vision/encoder_dir.py) atomically;
    the checkpoints (a resume point after a kill) are removed once it is in place."""
    from tunery.vision.simclr import ViTForSimCLR, pretrain

    pool_df = pool_frame(raw_dir, data_dir)
    pool = splits.pixels(pool_df, root, processor)
    names = splits.labels(data_dir)
    _, train_x, train_y = splits.load(data_dir, "train", root, processor, names)
    _, val_x, val_y = splits.load(data_dir, "val", root, processor, names)
    model = build(cfg, processor, root)
    pool_key = hashlib.sha256("".join(pool_df["sha256"]).encode()).hexdigest()
    fresh_checkpoints(
        checkpoint_dir,
        {
            "pretrain": cfg.model_dump(mode="json"),
            "processor": processor.model_dump(mode="json"),
            "pool": pool_key,
        },
    )
    log.info(
        "SimCLR on %d images, %d steps of %d",
        len(pool),
        cfg.simclr.max_steps,
        cfg.simclr.batch_size,
    )
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp / encoder_dir.INIT)
        result = pretrain(
            model,
            pool,
            cfg.simclr,
            processor=processor,
            augment_cfg=cfg.augment,
            out_dir=checkpoint_dir,
            resume=True,
        )
        shutil.copytree(checkpoint_dir / "model", tmp / encoder_dir.MODEL)
        init = ViTForSimCLR.from_pretrained(tmp / encoder_dir.INIT, attn_implementation="eager")
        scores = probe(init, model, (train_x, train_y), (val_x, val_y), cfg.probe_max_train)
        log.info(
            "probe (frozen encoder + logreg, val accuracy): SimCLR %.4f vs its start %.4f (%+.1f pt)",
            scores["simclr"],
            scores["init"],
            scores["diff_pt"],
        )
        info = {
            "objective": "simclr",
            "init": cfg.init,
            "pool_images": len(pool),
            "params": sum(p.numel() for p in model.vit.parameters()),
            **{k: v for k, v in result.items()},
            "final_loss": result["loss_last"],
            "probe": scores,
        }
        encoder_dir.write_info(tmp, info)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return info
