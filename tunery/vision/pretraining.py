"""The image pretrain stage's work: SimCLR or MAE on the pool, then a probe against the starting
weights.

The pool is the unlabelled images plus the train split's images (labels unused; never val, test
or holdout), read in the pipeline from the corpus stage's snapshot (tunery/vision/corpus.py). The
starting weights are kept (`init/`), so the fine-tune's "no pretraining" arm starts from exactly
what pretraining started from; both objectives start from the same weights (a ViT of `vit`'s
size from `simclr.seed`, or the base's encoder) and write the same encoder folder
(tunery/vision/encoder_dir.py). The probe (logistic regression on frozen pooled embeddings,
train split -> val split) tells, before any fine-tuning, whether pretraining taught the encoder
anything a random ViT's features do not already give.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

from tunery.io import atomic_dir
from tunery.vision import encoder_dir, splits
from tunery.vision.corpus import pool_frame

log = logging.getLogger("tunery.pretrain")


def build(cfg: Any, processor: Any, root: Path) -> Any:
    """The starting weights: a `ViTForSimCLR` of `cfg.vit`'s size, or on `cfg.base`'s encoder.
    SimCLR trains it as it is; MAE trains its own model from it (`mae.build_mae`)."""
    from tunery.vision.simclr import build_simclr

    base = None
    if cfg.init == "base":
        if not cfg.base:
            from tunery.errors import ConfigError

            raise ConfigError("pretrain.init is 'base' but pretrain.base names no folder")
        base = Path(root) / cfg.base
    return build_simclr(processor, cfg.simclr, spec=cfg.vit, base_dir=base)


def train(cfg: Any, start: Any, pool: Any, processor: Any, **loop: Any) -> tuple[Any, dict]:
    """Pretrain with `cfg.objective` from `start`: the trained encoder (a `ViTForSimCLR`,
    `start` itself for SimCLR, a copy with MAE's encoder weights for MAE) and the run's numbers."""
    if cfg.objective == "simclr":
        from tunery.vision.simclr import pretrain

        result = pretrain(
            start, pool, cfg.simclr, processor=processor, augment_cfg=cfg.augment, **loop
        )
        return start, result
    import copy

    from tunery.vision import mae

    model = mae.build_mae(start, cfg.mae)
    result = mae.pretrain(model, pool, cfg.mae, **loop)
    return mae.into_encoder(model, copy.deepcopy(start)), result


def probe(init: Any, trained: Any, train: tuple, val: tuple, max_train: int) -> dict[str, Any]:
    """Val accuracy of a logistic regression on frozen embeddings: pretrained vs its start."""
    from tunery.vision.probe import probe as run_probe

    (train_x, train_y), (val_x, val_y) = train, val
    train_x, train_y = train_x[:max_train], train_y[:max_train]
    pooling = trained.config.simclr_pooling
    scores = run_probe(
        {"pretrained": trained, "init": init}, train_x, train_y, val_x, val_y, pooling=pooling
    )
    scores["diff_pt"] = round(100 * (scores["pretrained"] - scores["init"]), 2)
    return scores


def resume_fingerprint(cfg: Any, processor: Any, pool_sha256: list[str]) -> str:
    """What a checkpoint must share with this run to be resumed: the settings that shape the
    training (not where it writes, how often it saves or logs, its clock, the probe) and the pool
    (each image's hash, in order): a resume must never continue another run's training."""
    from tunery.modeling.training import fingerprint

    shaping = cfg.model_dump(mode="json", exclude={"out_dir", "checkpoint_dir", "probe_max_train"})
    shaping.pop("mae" if cfg.objective == "simclr" else "augment")  # the other objective's
    for key in ("max_minutes", "save_steps", "logging_steps"):
        shaping[cfg.objective].pop(key)
    pool = hashlib.sha256("".join(pool_sha256).encode()).hexdigest()
    return fingerprint(shaping, processor.model_dump(mode="json"), pool)


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
    from tunery.modeling.training import is_main_process
    from tunery.vision.simclr import ViTForSimCLR

    pool_df = pool_frame(raw_dir, data_dir)
    pool = splits.pixels(pool_df, root, processor)
    start = build(cfg, processor, root)
    fp = resume_fingerprint(cfg, processor, list(pool_df["sha256"]))
    loop = {"out_dir": checkpoint_dir, "resume": fp}
    if not is_main_process():  # a torchrun rank other than 0 trains its share; rank 0 writes
        train(cfg, start, pool, processor, **loop)
        return {}
    names = splits.labels(data_dir)
    _, train_x, train_y = splits.load(data_dir, "train", root, processor, names)
    _, val_x, val_y = splits.load(data_dir, "val", root, processor, names)
    log.info(
        "%s on %d images, %d steps of %d",
        cfg.objective,
        len(pool),
        cfg.schedule.max_steps,
        cfg.schedule.batch_size,
    )
    with atomic_dir(out_dir) as tmp:
        start.save_pretrained(tmp / encoder_dir.INIT)  # before SimCLR trains it in place
        encoder, result = train(cfg, start, pool, processor, **loop)
        encoder.save_pretrained(tmp / encoder_dir.MODEL)
        init = ViTForSimCLR.from_pretrained(tmp / encoder_dir.INIT, attn_implementation="eager")
        scores = probe(init, encoder, (train_x, train_y), (val_x, val_y), cfg.probe_max_train)
        log.info(
            "probe (frozen encoder + logreg, val accuracy): %s %.4f vs its start %.4f (%+.1f pt)",
            cfg.objective,
            scores["pretrained"],
            scores["init"],
            scores["diff_pt"],
        )
        info = {
            "objective": cfg.objective,
            "init": cfg.init,
            "pool_images": len(pool),
            "params": sum(p.numel() for p in encoder.vit.parameters()),
            **result,
            "final_loss": result["loss_last"],
            "probe": scores,
        }
        encoder_dir.write_info(tmp, info)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return info
