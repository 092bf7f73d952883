"""finetune: adapt the pretrained encoder to the labelled task with peft (or fully, as the baseline).

Inputs:  `<prepare.out_dir>/{train,val,test,holdout}.parquet` and `labels.json` (test and holdout
         are only scored, never used to choose); the encoder dir (`finetune.encoder`, default
         `<pretrain.out_dir>`); with ablations on, the pretrain stage's input too (`pretrain.base`,
         or random weights of the encoder's architecture for `pretrain.init: scratch`);
         optionally a previous finetune output to warm-start from (`finetune.warm_start`).
Arms (ablations on; one schedule and seed): `pipeline` (the method on the pretrain output),
         `base` (the method on the pretrain input), `full` and `probe` (on the chosen encoder).
         The pretrain gate saves the better of pipeline and base by validation macro-F1 (ties:
         pipeline). Ablations off: the pipeline arm only, no gate.
Outputs: `<out_dir>/` written atomically: `adapter/` (peft adapter + head in safetensors, and the
         tokenizer; the full model for method `full`), `merged/` (a plain
         AutoModelForSequenceClassification + tokenizer; LoRA, IA3, AdaLoRA and full only, parity
         checked against the adapter model), `labels.json`, `finetune.json` (its `encoder` is
         the chosen one), `arms.json` (the arms table and the gate, see
         tunery.modeling.finetune_dir), `encoder/` only when the chosen arm is a random-weights base;
         `metrics/finetune.json` (headline numbers, `arms.<name>.*` flat),
         `plots/finetune/{train_loss,val}.csv`.
         Checkpoints (main arm only) live in `<checkpoint_dir>/<fingerprint>/` (outside DVC) until
         success.
"""

from __future__ import annotations

import csv
import functools
import logging
from pathlib import Path
from typing import Any

from tunery.config import FinetuneConfig, Params
from tunery.data.labelled import data_labels, load_split, load_splits
from tunery.errors import ConfigError, FinetuneError
from tunery.io import atomic_path
from tunery.modeling import finetune_dir
from tunery.modeling.arms import BaseArm, Inputs, flat_summary, train_arms
from tunery.modeling.save import write_finetune
from tunery.modeling.training import (
    drop_resume_points,
    is_main_process,
    model_files,
    worker_main,
    world_size,
)
from tunery.modeling.training import fingerprint_files as fingerprint

log = logging.getLogger("tunery.finetune")


def _write_curves(history: list[dict[str, float]], plot_dir: Path) -> None:
    rows = {
        "train_loss.csv": [
            {"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h and "step" in h
        ],
        "val.csv": [
            {
                "step": h["step"],
                "epoch": h.get("epoch"),
                "macro_f1": h["eval_macro_f1"],
                "accuracy": h.get("eval_accuracy"),
                "loss": h.get("eval_loss"),
            }
            for h in history
            if "eval_macro_f1" in h
        ],
    }
    for name, data in rows.items():
        if not data:
            continue
        with atomic_path(plot_dir / name) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(data[0]))
            writer.writeheader()
            writer.writerows(data)


def _resume_key(cfg: FinetuneConfig, encoder: Path, data_dir: Path, warm: Path | None) -> str:
    """The checkpoint folder's name: the settings, the encoder and the data it trains on."""
    return fingerprint(
        {
            "cfg": cfg.model_dump(mode="json", exclude={"out_dir", "checkpoint_dir", "ablations"}),
            "encoder": fingerprint({}, model_files(encoder)),
        },
        [
            data_dir / "train.parquet",
            data_dir / "val.parquet",
            data_dir / finetune_dir.LABELS_FILE,
            *(model_files(warm) if warm else []),
        ],
    )


def _log_to(tracker: Any, metrics: dict[str, float], step: int) -> None:
    if tracker is not None:
        tracker.log_metrics({f"train.{k}": v for k, v in metrics.items()}, step=step)


def run(
    cfg: FinetuneConfig,
    *,
    encoder: Path,
    data_dir: Path,
    out_dir: Path,
    checkpoint_root: Path,
    plot_dir: Path,
    root: Path,
    base: BaseArm | None = None,
    tracker: Any = None,
    callbacks: tuple = (),
) -> dict[str, Any]:
    """Fine-tune the pipeline encoder; with ablations on, also the arms and the pretrain gate.

    `base` is the pretrain stage's input (the `base` arm); None or `base.skipped`: no base arm.
    """
    from transformers import AutoTokenizer

    encoder = Path(encoder).resolve()
    labels = data_labels(data_dir)
    inputs = Inputs(
        labels=labels,
        train_split=load_split(data_dir / "train.parquet", labels),
        val_split=load_split(data_dir / "val.parquet", labels),
        scored=load_splits(data_dir, labels, ("test", "holdout")),
    )
    warm = finetune_dir.resolve(cfg.warm_start, root)
    if not (encoder / "config.json").is_file():
        raise FinetuneError(f"{encoder}: encoder not found (no config.json); run pretrain")
    checkpoint_dir = checkpoint_root / _resume_key(cfg, encoder, data_dir, warm)
    outcome = train_arms(
        cfg,
        inputs,
        encoder=encoder,
        tokenizer=AutoTokenizer.from_pretrained(encoder),
        base=base,
        warm=warm,
        checkpoint_dir=checkpoint_dir,
        on_log=functools.partial(_log_to, tracker),
        callbacks=callbacks,
    )
    if not is_main_process():
        return {}  # torchrun: every collective is behind us; rank 0 alone writes the outputs
    _write_curves(outcome.chosen.result.history, plot_dir)
    checks = write_finetune(out_dir, cfg, outcome, inputs, data_dir=data_dir, warm=warm)
    log.info(
        "wrote %s (%s, %s arm; merge diff %s, adapter reload diff %s)",
        out_dir,
        cfg.method,
        outcome.report["chosen"],
        checks["merge"],
        checks["adapter_reload"],
    )
    stats = outcome.chosen.stats
    metrics: dict[str, Any] = {
        **{k: v for k, v in stats.items() if k != "resumed_from"},
        "resumed": stats["resumed_from"] is not None,
        "world_size": world_size(),  # training processes (torchrun), as pretrain records it
        "merge_max_abs_logit_diff": checks["merge"],
        "adapter_reload_max_abs_logit_diff": checks["adapter_reload"],
        "train_rows": len(inputs.train_split),
        "val_rows": len(inputs.val_split),
        **flat_summary(outcome.report),
    }
    # Finished and written: this resume point has served its purpose, and the others (of params
    # since abandoned) would only pile up.
    dropped = drop_resume_points(checkpoint_dir.parent)
    if len(dropped) > 1:
        log.info("removed %d resume points of earlier params", len(dropped) - 1)
    return metrics


def encoder_path(params: Params, root: Path) -> Path:
    cfg = params.finetune
    if cfg.encoder is not None:
        path = Path(cfg.encoder)
    else:
        pretrain = getattr(params, "pretrain", None)
        if pretrain is None:
            raise ConfigError("finetune.encoder is null and params.yaml has no pretrain section")
        path = Path(pretrain.out_dir)
    return path if path.is_absolute() else root / path


def pretrain_input(params: Params, root: Path) -> BaseArm:
    """What the pretrain stage started from: `pretrain.base` (init base) or random weights of the
    pipeline encoder's architecture (init scratch); none when `finetune.encoder` is set."""
    if params.finetune.encoder is not None:
        return BaseArm(
            encoder=None,
            skipped="finetune.encoder is set (not the pretrain output): no pipeline pretraining to judge",
        )
    pretrain = getattr(params, "pretrain", None)
    if pretrain is None:
        return BaseArm(encoder=None, skipped="params.yaml has no pretrain section")
    if pretrain.init == "base":
        from tunery.modeling.factory import resolve_model_ref as resolve_base

        ref = pretrain.base
        local = root / ref
        return BaseArm(encoder=Path(resolve_base(str(local) if local.is_dir() else ref)).resolve())
    return BaseArm(encoder=encoder_path(params, root), init="random")


def _config(params: Params, root: Path) -> FinetuneConfig:
    cfg = params.finetune
    if cfg.warm_start == "champion":
        # Through registration (not refs): the registry is no DVC-tracked input of this stage.
        from tunery.registry.registration import Registry, champion_finetune_dir

        champion = champion_finetune_dir(Registry.of(params, root))
        cfg = cfg.model_copy(update={"warm_start": str(champion) if champion else None})
    return cfg


def _stage(params: Params, root: Path, tracking_run: Any) -> dict[str, Any]:
    cfg = _config(params, root)
    plot_dir = root / "plots" / "finetune"
    metrics = run(
        cfg,
        encoder=encoder_path(params, root),
        base=pretrain_input(params, root),
        data_dir=root / params.prepare.out_dir,
        out_dir=root / cfg.out_dir,
        checkpoint_root=root / cfg.checkpoint_dir,
        plot_dir=plot_dir,
        root=root,
        tracker=tracking_run,
    )
    tracking_run.set_tags({"finetune.method": cfg.method})
    tracking_run.log_artifact(root / cfg.out_dir / finetune_dir.INFO_FILE, "finetune")
    if plot_dir.is_dir():
        tracking_run.log_artifact(plot_dir, "finetune/curves")
    tracking_run.log_artifact(root / cfg.out_dir / finetune_dir.ARMS_FILE, "finetune")
    return metrics


def _rank_stage(params: Params, root: Path) -> None:
    """A torchrun rank other than 0: trains its share of every arm in step with rank 0, which
    alone writes the outputs, plots, metrics and tracking run (this rank's go to a scratch dir)."""
    import tempfile

    cfg = _config(params, root)
    with tempfile.TemporaryDirectory(prefix="tunery-finetune-rank-") as scratch:
        run(
            cfg,
            encoder=encoder_path(params, root),
            base=pretrain_input(params, root),
            data_dir=root / params.prepare.out_dir,
            out_dir=Path(scratch) / "out",
            checkpoint_root=root / cfg.checkpoint_dir,
            plot_dir=Path(scratch) / "plots",
            root=root,
        )


def main(argv: list[str] | None = None) -> None:
    from tunery.modeling.training import shutdown_distributed
    from tunery.stage import stage_main

    if is_main_process():
        stage_main("finetune", _stage, argv)
    else:
        worker_main("tasks.finetune", _rank_stage, argv)
    shutdown_distributed()


if __name__ == "__main__":
    main()
