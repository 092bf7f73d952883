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
         the chosen one), `arms.json` (the arms table and the gate, see tunery.finetuning's
         `read_arms`), `encoder/` only when the chosen arm is a random-weights base;
         `metrics/finetune.json` (headline numbers, `arms.<name>.*` flat),
         `plots/finetune/{train_loss,val}.csv`.
         Checkpoints (main arm only) live in `<checkpoint_dir>/<fingerprint>/` (outside DVC) until
         success.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

from tunery.config import FinetuneConfig, Params
from tunery.errors import ConfigError
from tunery.finetune_arms import (
    BaseArm,
    arm_record,
    arms_table_text,
    flat_summary,
    pretrain_gate,
    probe_arm,
    score_model,
)
from tunery.finetuning import (
    ADAPTER_DIR,
    ARMS_FILE,
    INFO_FILE,
    LABELS_FILE,
    MERGEABLE,
    MERGED_DIR,
    FinetuneError,
    Split,
    build_model,
    effective_max_length,
    fingerprint,
    load_base,
    load_split,
    logits_on,
    model_files,
    read_labels,
    resolve_model_ref,
    train,
    trainable_parameters,
    write_arms,
)
from tunery.io import atomic_dir, atomic_path
from tunery.progress import trainer_callback
from tunery.training import drop_resume_points, is_main_process, worker_main, world_size

log = logging.getLogger("tunery.finetune")

PARITY_BATCH = 64  # validation texts used for the merge / reload parity checks
ENCODER_DIR = "encoder"  # the random base encoder, when that arm is chosen (scratch pretraining)


def _total_steps(cfg: FinetuneConfig, n_train: int, epochs: float) -> int:
    return max(1, math.ceil(math.ceil(n_train / cfg.batch_size) * epochs))


def _train_variant(
    cfg: FinetuneConfig,
    *,
    method: str,
    init: str,
    encoder: Path,
    tokenizer: Any,
    labels: list[str],
    train_split: Split,
    val_split: Split,
    warm_start: Path | None = None,
    checkpoint_dir: Path | None = None,
    epochs: float | None = None,
    on_log: Any = None,
    callbacks: tuple = (),
    arm: str = "pipeline",
) -> tuple[Any, dict[str, Any]]:
    epochs = cfg.epochs if epochs is None else epochs
    model = build_model(
        cfg,
        method=method,
        encoder=encoder,
        labels=labels,
        init=init,
        warm_start=warm_start,
        total_steps=_total_steps(cfg, len(train_split), epochs),
    )
    trainable, total = trainable_parameters(model)
    log.info(
        "%s (%s encoder): %d trainable of %d parameters (%.2f %%)",
        method,
        init,
        trainable,
        total,
        100 * trainable / total,
    )
    max_length = effective_max_length(cfg, method, model.config)
    result = train(
        model,
        tokenizer,
        cfg,
        method=method,
        train_split=train_split,
        val_split=val_split,
        checkpoint_dir=checkpoint_dir,
        max_length=max_length,
        epochs=epochs,
        on_log=on_log,
        callbacks=(*callbacks, trainer_callback(f"finetune {arm} arm ({method})")),
    )
    stats = {
        "method": method,
        "init": init,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": round(trainable / total, 6),
        "best_val_macro_f1": round(result.best_val_macro_f1, 4),
        "epochs": round(result.epochs, 2),
        "steps": result.steps,
        "train_seconds": result.train_seconds,
        "samples_per_s": result.samples_per_s,
        "tokens_per_s": result.tokens_per_s,
        "padding_share": result.padding_share,
        "peak_memory_mb": result.peak_memory_mb,
        "memory_delta_mb": result.memory_delta_mb,
        "resumed_from": result.resumed_from,
        "max_length": max_length,
    }
    return result, stats


def _max_diff(a: Any, b: Any) -> float:
    return float((a - b).abs().max())


def _save_outputs(
    dest: Path,
    model: Any,
    tokenizer: Any,
    *,
    cfg: FinetuneConfig,
    method: str,
    encoder: Path,
    labels: list[str],
    parity_texts: list[str],
    max_length: int,
) -> dict[str, float | None]:
    """Write adapter/ (and merged/), then reload what was written and compare logits."""
    from transformers import AutoModelForSequenceClassification

    model = getattr(model, "_orig_mod", model).to("cpu").eval()
    reference = logits_on(model, tokenizer, parity_texts, max_length=max_length)
    adapter, merged = dest / ADAPTER_DIR, dest / MERGED_DIR
    checks: dict[str, float | None] = {"adapter_reload": None, "merge": None}
    if method == "full":
        model.save_pretrained(merged)
        tokenizer.save_pretrained(merged)
        adapter.mkdir()
        for f in merged.iterdir():  # the same files: link rather than copy the weights twice
            try:
                os.link(f, adapter / f.name)
            except OSError:
                shutil.copy2(f, adapter / f.name)
    else:
        from peft import PeftModel

        model.save_pretrained(adapter)
        sort_adapter_config(adapter / "adapter_config.json")
        tokenizer.save_pretrained(adapter)
        base, _ = load_base(encoder, labels)
        reloaded = PeftModel.from_pretrained(base, str(adapter))
        checks["adapter_reload"] = _max_diff(
            reference, logits_on(reloaded, tokenizer, parity_texts, max_length=max_length)
        )
        if method in MERGEABLE:
            model = model.merge_and_unload()
            model.save_pretrained(merged)
            tokenizer.save_pretrained(merged)
    if merged.is_dir():
        reloaded = AutoModelForSequenceClassification.from_pretrained(merged)
        checks["merge"] = _max_diff(
            reference, logits_on(reloaded, tokenizer, parity_texts, max_length=max_length)
        )
    for name, diff in checks.items():
        if diff is not None and diff > cfg.merge_tolerance:
            what = "merged model" if name == "merge" else "reloaded adapter"
            raise FinetuneError(
                f"the {what} differs from the trained model by {diff:.3g} in logits "
                f"(> finetune.merge_tolerance {cfg.merge_tolerance}); nothing written"
            )
    return checks


def sort_adapter_config(path: Path) -> None:
    """peft writes `target_modules` (a set) in hash order: sorted, identical runs give identical
    files, so the DVC hash of the output depends on the weights only."""
    config = json.loads(path.read_text())
    for key in ("target_modules", "modules_to_save"):
        if isinstance(config.get(key), list):
            config[key] = sorted(dict.fromkeys(config[key]))
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


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


def trained_origins(data_dir: Path, warm_start: Path | None) -> list[str]:
    """The `origin`s (source file, incoming file) of the rows fine-tuned on, with those of the
    warm-start model it continues from."""
    import pandas as pd

    origins: set[str] = set()
    for split in ("train", "val"):
        df = pd.read_parquet(data_dir / f"{split}.parquet")
        if "origin" in df.columns:
            origins.update(df["origin"].astype(str))
    if warm_start is not None and (warm_start / INFO_FILE).is_file():
        origins.update(json.loads((warm_start / INFO_FILE).read_text()).get("data_origins") or [])
    return sorted(origins)


def _scored_splits(data_dir: Path, labels: list[str]) -> list[Split]:
    return [load_split(data_dir / f"{name}.parquet", labels) for name in ("test", "holdout")]


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
    labels = read_labels(data_dir / "labels.json")
    train_split = load_split(data_dir / "train.parquet", labels)
    val_split = load_split(data_dir / "val.parquet", labels)
    scored = _scored_splits(data_dir, labels)
    warm = resolve_model_ref(cfg.warm_start, root)
    if not (encoder / "config.json").is_file():
        raise FinetuneError(f"{encoder}: encoder not found (no config.json); run pretrain")
    tokenizer = AutoTokenizer.from_pretrained(encoder)

    encoder_fp = fingerprint({}, model_files(encoder))
    resume_key = fingerprint(
        {
            "cfg": cfg.model_dump(mode="json", exclude={"out_dir", "checkpoint_dir", "ablations"}),
            "encoder": encoder_fp,
        },
        [
            data_dir / "train.parquet",
            data_dir / "val.parquet",
            data_dir / "labels.json",
            *(model_files(warm) if warm else []),
        ],
    )
    checkpoint_dir = checkpoint_root / resume_key

    def on_log(metrics: dict[str, float], step: int) -> None:
        if tracker is not None:
            tracker.log_metrics({f"train.{k}": v for k, v in metrics.items()}, step=step)

    common = dict(labels=labels, train_split=train_split, val_split=val_split)
    # pipeline arm: the main model, the only one with a resume point
    result, stats = _train_variant(
        cfg,
        method=cfg.method,
        init="pretrained",
        encoder=encoder,
        tokenizer=tokenizer,
        warm_start=warm,
        checkpoint_dir=checkpoint_dir,
        on_log=on_log,
        callbacks=callbacks,
        **common,
    )
    # Scored now: writing the outputs merges the adapter in place.
    candidates = {"pipeline": (result, stats, encoder, "pretrained", tokenizer)}
    arms = {"pipeline": _arm_row(result, stats, encoder, "pretrained", tokenizer, scored, cfg)}

    skipped = _base_skipped(cfg, base, warm)
    if skipped is None:
        log.info(
            "arm base: %s on the pretrain stage's input (%s, %s)",
            cfg.method,
            base.encoder,
            base.init,
        )
        base_tok = AutoTokenizer.from_pretrained(base.encoder)
        b_result, b_stats = _train_variant(
            cfg,
            method=cfg.method,
            init=base.init,
            encoder=Path(base.encoder),
            tokenizer=base_tok,
            arm="base",
            **common,
        )
        candidates["base"] = (b_result, b_stats, Path(base.encoder), base.init, base_tok)
        arms["base"] = _arm_row(
            b_result, b_stats, Path(base.encoder), base.init, base_tok, scored, cfg
        )
    gate = pretrain_gate(
        arms["pipeline"]["best_val_macro_f1"],
        arms["base"]["best_val_macro_f1"] if "base" in arms else None,
        skipped,
    )
    chosen = gate.pop("chosen")
    (log.warning if chosen == "base" else log.info)("%s", gate["decision"])
    result, stats, chosen_encoder, chosen_init, tokenizer = candidates[chosen]
    for name in [n for n in candidates if n != chosen]:
        del candidates[name]  # frees the other arm's model
    _write_curves(result.history, plot_dir)

    if cfg.ablations.enabled:
        arms.update(
            _reference_arms(
                cfg,
                encoder=chosen_encoder,
                init=chosen_init,
                tokenizer=tokenizer,
                scored=scored,
                chosen_row=arms[chosen],
                **common,
            )
        )
    else:
        arms = {chosen: arms[chosen]}
    report = {"chosen": chosen, "pretrain_gate": gate, "arms": arms}
    log.info("arms (test and holdout splits; chosen: %s):\n%s", chosen, arms_table_text(arms))

    if not is_main_process():
        return {}  # torchrun: every collective is behind us; rank 0 alone writes the outputs
    parity_texts = val_split.texts[:PARITY_BATCH]
    with atomic_dir(out_dir) as tmp:
        saved_encoder, final_encoder = chosen_encoder, chosen_encoder
        if chosen_init == "random":
            # The adapter sits on random weights that exist nowhere else: saved beside it.
            saved_encoder, final_encoder = tmp / ENCODER_DIR, Path(out_dir).resolve() / ENCODER_DIR
            _save_random_encoder(cfg, chosen_encoder, labels, tokenizer, saved_encoder)
        checks = _save_outputs(
            tmp,
            result.model,
            tokenizer,
            cfg=cfg,
            method=cfg.method,
            encoder=saved_encoder,
            labels=labels,
            parity_texts=parity_texts,
            max_length=stats["max_length"],
        )
        (tmp / LABELS_FILE).write_text(json.dumps(labels, indent=2) + "\n")
        info = {
            "method": cfg.method,
            "mergeable": (tmp / MERGED_DIR).is_dir(),
            # what `load_base` loads for the adapter: the pipeline's encoder or its base
            "encoder": str(final_encoder),
            "encoder_fingerprint": fingerprint({}, model_files(saved_encoder)),
            "arm": chosen,
            "pretrain_gate": gate["decision"],
            "max_length": stats["max_length"],
            "merge_max_abs_logit_diff": checks["merge"],
            "adapter_reload_max_abs_logit_diff": checks["adapter_reload"],
            "merge_tolerance": cfg.merge_tolerance,
            "num_labels": len(labels),
            "warm_start": str(warm) if warm else None,
            "seed": cfg.seed,
            "trainable_params": stats["trainable_params"],
            "total_params": stats["total_params"],
            "best_val_macro_f1": stats["best_val_macro_f1"],
            "method_params": getattr(cfg, cfg.method).model_dump(mode="json"),
            # What the model has learnt from: evaluate scores later models on newer data only.
            "data_origins": trained_origins(data_dir, warm),
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        write_arms(tmp, report)
    log.info(
        "wrote %s (%s, %s arm; merge diff %s, adapter reload diff %s)",
        out_dir,
        cfg.method,
        chosen,
        checks["merge"],
        checks["adapter_reload"],
    )

    metrics: dict[str, Any] = {
        **{k: v for k, v in stats.items() if k != "resumed_from"},
        "resumed": stats["resumed_from"] is not None,
        "world_size": world_size(),  # training processes (torchrun), as pretrain records it
        "merge_max_abs_logit_diff": checks["merge"],
        "adapter_reload_max_abs_logit_diff": checks["adapter_reload"],
        "train_rows": len(train_split),
        "val_rows": len(val_split),
        **flat_summary(report),
    }
    # Finished and written: this resume point has served its purpose, and the others (of params
    # since abandoned) would only pile up.
    dropped = drop_resume_points(checkpoint_dir.parent)
    if len(dropped) > 1:
        log.info("removed %d resume points of earlier params", len(dropped) - 1)
    return metrics


def _base_skipped(cfg: FinetuneConfig, base: BaseArm | None, warm: Path | None) -> str | None:
    """Why there is no base arm (None: there is one)."""
    if not cfg.ablations.enabled:
        return "finetune.ablations.enabled is false (main arm only)"
    if base is None:
        return "no pretrain stage input given"
    if base.skipped:
        return base.skipped
    if warm is not None:
        return "finetune.warm_start continues a previous adapter (no fresh comparison)"
    return None


def _arm_row(
    result: Any,
    stats: dict[str, Any],
    encoder: Path,
    init: str,
    tokenizer: Any,
    scored: list[Split],
    cfg: FinetuneConfig,
) -> dict[str, Any]:
    return arm_record(
        method=stats["method"],
        encoder=encoder,
        init=init,
        scores=score_model(result.model, tokenizer, scored, cfg, stats["max_length"]),
        best_val_macro_f1=stats["best_val_macro_f1"],
        train_seconds=stats["train_seconds"],
        trainable_params=stats["trainable_params"],
        total_params=stats["total_params"],
        epochs=stats["epochs"],
    )


def _reference_arms(
    cfg: FinetuneConfig,
    *,
    encoder: Path,
    init: str,
    tokenizer: Any,
    labels: list[str],
    train_split: Split,
    val_split: Split,
    scored: list[Split],
    chosen_row: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """probe and full on the chosen encoder (full: the chosen arm itself when method is full)."""
    log.info("arm probe: frozen %s encoder + logistic regression", init)
    arms = {
        "probe": probe_arm(
            cfg,
            encoder=encoder,
            init=init,
            tokenizer=tokenizer,
            labels=labels,
            train_split=train_split,
            val_split=val_split,
            scored=scored,
        )
    }
    if cfg.method == "full":
        arms["full"] = chosen_row
        return arms
    log.info("arm full: full fine-tuning of the chosen encoder (%s epochs)", cfg.epochs)
    result, stats = _train_variant(
        cfg,
        method="full",
        init=init,
        encoder=encoder,
        tokenizer=tokenizer,
        labels=labels,
        train_split=train_split,
        val_split=val_split,
        arm="full",
    )
    arms["full"] = _arm_row(result, stats, encoder, init, tokenizer, scored, cfg)
    return arms


def _save_random_encoder(
    cfg: FinetuneConfig, encoder: Path, labels: list[str], tokenizer: Any, dest: Path
) -> None:
    """The random weights the base arm started from (same seed: the same weights), as a model dir."""
    model, _ = load_base(encoder, labels, init="random", seed=cfg.seed)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


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
        from tunery.models import resolve_model_ref as resolve_base

        ref = pretrain.base
        local = root / ref
        return BaseArm(encoder=Path(resolve_base(str(local) if local.is_dir() else ref)).resolve())
    return BaseArm(encoder=encoder_path(params, root), init="random")


def _config(params: Params, root: Path) -> FinetuneConfig:
    cfg = params.finetune
    if cfg.warm_start == "champion":
        from tunery.registration import champion_finetune_dir

        champion = champion_finetune_dir(root, params)
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
    tracking_run.log_artifact(root / cfg.out_dir / INFO_FILE, "finetune")
    if plot_dir.is_dir():
        tracking_run.log_artifact(plot_dir, "finetune/curves")
    tracking_run.log_artifact(root / cfg.out_dir / ARMS_FILE, "finetune")
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
    from tunery.stage import stage_main
    from tunery.training import shutdown_distributed

    if is_main_process():
        stage_main("finetune", _stage, argv)
    else:
        worker_main("tasks.finetune", _rank_stage, argv)
    shutdown_distributed()


if __name__ == "__main__":
    main()
