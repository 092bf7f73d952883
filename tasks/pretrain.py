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
import math
import time
from pathlib import Path
from typing import Any

from tunery.config import Params, PretrainConfig
from tunery.errors import DataValidationError
from tunery.io import atomic_dir, file_md5, write_json
from tunery.progress import trainer_callback

log = logging.getLogger("tunery.pretrain")


# --------------------------------------------------------------------------- inputs
def load_corpus(path: Path) -> list[str]:
    import pandas as pd

    if not path.is_file():
        raise DataValidationError(
            path, "missing_file", "corpus not found; run the prepare stage first"
        )
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataValidationError(
            path, "unreadable_file", f"not a readable Parquet file ({exc})"
        ) from None
    if "text" not in df.columns:
        raise DataValidationError(path, "missing_column", "the corpus needs a `text` column")
    texts = [t for t in df["text"].dropna().astype(str) if t.strip()]
    if not texts:
        raise DataValidationError(path, "empty_corpus", "the corpus has no non-empty text")
    return texts


def load_labelled(path: Path) -> tuple[list[str], list[str]]:
    import pandas as pd

    if not path.is_file():
        raise DataValidationError(
            path, "missing_file", "labelled split not found; run prepare first"
        )
    df = pd.read_parquet(path, columns=["text", "label"])
    return df["text"].astype(str).tolist(), df["label"].astype(str).tolist()


def split_heldout(texts: list[str], cfg: PretrainConfig) -> tuple[list[str], list[str]]:
    import random

    n_held = min(cfg.train.heldout_max, max(1, int(len(texts) * cfg.train.heldout_fraction)))
    if len(texts) < 2:
        return texts, []
    order = list(range(len(texts)))
    random.Random(cfg.train.seed).shuffle(order)
    held = set(order[:n_held])
    return [t for i, t in enumerate(texts) if i not in held], [texts[i] for i in sorted(held)]


def resume_fingerprint(cfg: PretrainConfig, corpus_md5: str) -> str:
    """What a checkpoint must share with this run to be resumed: the knobs that shape training."""
    from tunery.training import fingerprint

    shaping = cfg.model_dump(mode="json", exclude={"out_dir", "checkpoint_dir", "probe"})
    for key in (
        "max_minutes",
        "save_steps",
        "save_total_limit",
        "logging_steps",
        "compile",
        "compile_mode",
        "threads",
    ):
        shaping["train"].pop(key, None)
    return fingerprint(shaping, corpus_md5)


# --------------------------------------------------------------------------- model
def build_tokenizer(cfg: PretrainConfig, texts: list[str], folder: Path, *, main: bool) -> Any:
    """Scratch: the corpus WordPiece, trained once and kept beside the checkpoints; base: its own."""
    from tunery import models

    if cfg.init == "base":
        return None
    saved = folder / "tokenizer"
    if (saved / "tokenizer.json").is_file():
        return models.load_tokenizer(str(saved), max_length=cfg.scratch.max_length)
    s = cfg.scratch
    tok = models.train_wordpiece(
        texts, vocab_size=s.vocab_size, max_length=s.max_length, lowercase=s.lowercase
    )
    if main:
        with atomic_dir(saved) as tmp:
            tok.save_pretrained(tmp)
    return tok


def build_model(cfg: PretrainConfig, tok: Any, *, head: str) -> tuple[Any, Any, dict[str, Any]]:
    """(model with `head`, tokenizer, info) for the configured initialisation."""
    from transformers import AutoModel, AutoModelForMaskedLM, set_seed

    from tunery import models

    set_seed(cfg.train.seed)
    if cfg.init == "base":
        model, tok, info = models.load_encoder(
            cfg.base, head=head, max_length=cfg.max_length, attn_implementation="sdpa"
        )
        if head == "mlm" and info["new_weights"]:
            check_fresh_head(cfg, info["new_weights"])
            log.warning(
                "base %s has no (complete) MLM head: %d head tensor(s) freshly initialised; "
                "the encoder is frozen for the first %d step(s) while it trains",
                cfg.base,
                len(info["new_weights"]),
                cfg.mlm.head_warmup_steps,
            )
        return model, tok, info
    config = scratch_model_config(cfg, tok)
    auto = AutoModelForMaskedLM if head == "mlm" else AutoModel
    kwargs = {} if head == "mlm" else {"add_pooling_layer": False}
    model = auto.from_config(config, attn_implementation="sdpa", **kwargs)
    return model, tok, {"source": "scratch", "new_weights": []}


def check_fresh_head(cfg: PretrainConfig, new_weights: list[str]) -> None:
    """MLM through a random head with the encoder trained from step 0 only damages the base."""
    from tunery.models import ModelError

    if cfg.mlm.head_warmup_steps == 0:
        raise ModelError(
            cfg.base,
            "no_mlm_head",
            f"objective mlm needs an MLM head and this base has none ({len(new_weights)} head "
            "tensor(s) would be random); set pretrain.mlm.head_warmup_steps > 0 to train a fresh "
            "head with the encoder frozen first, or use pretrain.objective: simcse",
        )


def scratch_model_config(cfg: PretrainConfig, tok: Any) -> Any:
    from tunery import models

    s = cfg.scratch
    return models.scratch_config(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        layers=s.layers,
        hidden=s.hidden,
        heads=s.heads,
        intermediate=s.intermediate,
        max_length=s.max_length,
        dropout=s.dropout,
    )


def random_twin(model: Any, *, head: str, seed: int) -> Any:
    """The same architecture with freshly initialised weights: the probe's reference."""
    from transformers import AutoModel, AutoModelForMaskedLM, set_seed

    set_seed(seed + 1)
    auto = AutoModelForMaskedLM if head == "mlm" else AutoModel
    twin = auto.from_config(model.config, attn_implementation="sdpa")
    return twin.to(next(model.parameters()).device)


# --------------------------------------------------------------------------- the stage
def run(
    cfg: PretrainConfig,
    *,
    data_dir: Path,
    out_dir: Path,
    checkpoint_dir: Path,
    plots_dir: Path,
) -> dict[str, Any]:
    from transformers import PrinterCallback, Trainer

    from tunery import pretraining as pt
    from tunery import training

    t0 = time.perf_counter()
    main = training.is_main_process()
    if cfg.train.threads:
        import torch

        torch.set_num_threads(cfg.train.threads)
    corpus_path = data_dir / "corpus.parquet"
    texts = load_corpus(corpus_path)
    train_texts, held_texts = split_heldout(texts, cfg)
    per_step = cfg.train.batch_size * training.world_size()
    if len(train_texts) < per_step:
        raise DataValidationError(
            corpus_path,
            "corpus_too_small",
            f"{len(train_texts)} training texts are fewer than one batch "
            f"({cfg.train.batch_size} x {training.world_size()} process(es)); add text or lower "
            "pretrain.train.batch_size",
        )
    probe_train = load_labelled(data_dir / "train.parquet")
    probe_val = load_labelled(data_dir / "val.parquet")
    if not probe_val[0]:
        raise DataValidationError(
            data_dir / "val.parquet",
            "empty_split",
            "the probe needs a val split (prepare.fractions.val > 0)",
        )
    head = "mlm" if cfg.objective == "mlm" else "none"
    if cfg.init == "base":
        # A bad base, or one the objective cannot run on, fails before any checkpoint housekeeping.
        model, tok, info = build_model(cfg, None, head=head)
    t = cfg.train
    args = training.training_args(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        max_steps=t.max_steps or -1,
        num_train_epochs=t.epochs,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup,
        lr_scheduler_type="linear",
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        seed=t.seed,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        **training.device_args(
            device=t.device, precision=t.precision, compile=t.compile, compile_mode=t.compile_mode
        ),
    )
    fp = resume_fingerprint(cfg, file_md5(corpus_path))
    with args.main_process_first(desc="checkpoint housekeeping"):
        resume = training.resume_point(checkpoint_dir, fp, main=main)
        if cfg.init == "scratch":
            tok = build_tokenizer(cfg, train_texts, checkpoint_dir, main=main)
    if cfg.init == "scratch":
        model, tok, info = build_model(cfg, tok, head=head)
    pt.use_objective(
        model,
        cfg.objective,
        sparse_mlm=cfg.mlm.sparse_head,
        temperature=cfg.simcse.temperature,
        pooling=cfg.simcse.pooling,
    )
    whole_word = cfg.objective == "mlm" and cfg.mlm.whole_word
    features = pt.tokenize(tok, train_texts, max_length=cfg.max_length, offsets=whole_word)
    if cfg.objective == "mlm":
        collate = pt.mlm_collator(tok, cfg.mlm)
    else:
        collate = pt.simcse_collator(tok, deletion=cfg.simcse.deletion)
    callbacks = [
        *training.trainer_callbacks(max_minutes=t.max_minutes),
        trainer_callback(f"pretrain {cfg.objective}"),
    ]
    if cfg.objective == "mlm" and cfg.mlm.head_warmup_steps:
        callbacks.append(pt.head_warmup(model, cfg.mlm.head_warmup_steps))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=features,
        data_collator=collate,
        processing_class=tok,
        callbacks=callbacks,
    )
    # the loss goes to the journal (loss_history) and the plot; our callback prints progress
    trainer.remove_callback(PrinterCallback)
    train_start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    train_seconds = time.perf_counter() - train_start
    if not main:
        return {}

    model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    history = training.loss_history(trainer.state.log_history)
    budget = next((c for c in callbacks if hasattr(c, "stopped_at")), None)
    steps_done = trainer.state.global_step - (int(resume.name.split("-")[-1]) if resume else 0)

    # Held-out loss: the pretrained model against its random-weights twin, on the same masks.
    held = pt.tokenize(tok, held_texts, max_length=cfg.max_length, offsets=whole_word)
    twin = random_twin(pt.plain_class(model), head=head, seed=t.seed)
    heldout: dict[str, float] = {"texts": len(held_texts)}
    if held and cfg.objective == "mlm":
        pt.use_objective(model, "mlm", sparse_mlm=cfg.mlm.sparse_head)
        heldout["mlm_loss"] = round(pt.heldout_mlm_loss(model, tok, held, cfg.mlm), 4)
        heldout["random_mlm_loss"] = round(pt.heldout_mlm_loss(twin, tok, held, cfg.mlm), 4)
        heldout["perplexity"] = round(math.exp(heldout["mlm_loss"]), 2)
    elif len(held) >= 2:
        pt.use_objective(
            model, "simcse", temperature=cfg.simcse.temperature, pooling=cfg.simcse.pooling
        )
        heldout["simcse_loss"] = round(
            pt.heldout_simcse_loss(
                model, tok, held, batch_size=t.batch_size, deletion=cfg.simcse.deletion
            ),
            4,
        )
    pt.plain_class(model)

    # Probe: frozen embeddings, pretrained vs the same architecture with random weights.
    p = cfg.probe
    x_train, y_train = probe_train[0][: p.max_train], probe_train[1][: p.max_train]

    def score(m: Any) -> dict[str, float]:
        emb = lambda xs: pt.embed(m, tok, xs, max_length=cfg.max_length, batch_size=p.batch_size)  # noqa: E731
        return pt.probe(
            emb(x_train), y_train, emb(probe_val[0]), probe_val[1], methods=p.methods, k=p.knn_k
        )

    probe = {"pretrained": score(model), "random": score(twin)}
    if cfg.init == "base":
        initial, _, _ = build_model(cfg, tok, head="none")
        probe["initial"] = score(initial.to(next(model.parameters()).device))
    probe["margin"] = {m: round(probe["pretrained"][m] - probe["random"][m], 4) for m in p.methods}
    del twin

    # The output: written beside its destination, reloaded and checked, then moved into place.
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        check_output(tmp, model, tok, texts=probe_val[0][:8], max_length=cfg.max_length)
        if cfg.init == "base":
            from tunery.models import carry_base_tensors

            carried = carry_base_tensors(tmp, cfg.base, f"{model.base_model_prefix}.")
            if carried:
                log.info("kept the base's %s (the %s head has none)", carried, cfg.objective)

    plots_dir.mkdir(parents=True, exist_ok=True)
    write_json(plots_dir / "loss.json", history)
    pt.plot_loss(history, plots_dir / "loss.png", title=f"pretrain ({cfg.init}, {cfg.objective})")

    tokens_seen = trainer.state.num_input_tokens_seen or None
    metrics: dict[str, Any] = {
        "init": cfg.init,
        "objective": cfg.objective,
        "source": info["source"],
        "fresh_head_tensors": len(info["new_weights"]),
        "parameters": sum(x.numel() for x in model.parameters()),
        "steps": trainer.state.global_step,
        "steps_this_run": steps_done,
        "resumed_from_step": int(resume.name.split("-")[-1]) if resume else 0,
        # A cached output must not depend on the machine's speed: a wall-clock stop is recorded.
        "max_steps": trainer.state.max_steps,
        "max_minutes": t.max_minutes,
        "stopped_by_budget": bool(budget and budget.stopped_at is not None),
        "stopped_at_step": budget.stopped_at if budget else None,
        "train_loss": round(float(result.training_loss), 4) if steps_done else None,
        "final_loss": history[-1]["loss"] if history else None,
        "train_seconds": round(train_seconds, 2),
        "samples_per_second": round(steps_done * per_step * t.grad_accum / train_seconds, 1)
        if train_seconds > 0
        else 0.0,
        "heldout": heldout,
        "probe": probe,
        "world_size": training.world_size(),
        "device": str(args.device),
        "bf16": bool(args.bf16),
        "compiled": bool(args.torch_compile),
        "compile_mode": (args.torch_compile_mode or "default") if args.torch_compile else None,
        "total_seconds": round(time.perf_counter() - t0, 2),
    }
    if tokens_seen:
        metrics["tokens_seen"] = int(tokens_seen)
    log.info(
        "pretrained %d steps in %.1f s; probe %s vs random %s",
        trainer.state.global_step,
        train_seconds,
        probe["pretrained"],
        probe["random"],
    )
    return metrics


def check_output(folder: Path, model: Any, tok: Any, *, texts: list[str], max_length: int) -> None:
    """The written encoder must reload and reproduce the in-memory embeddings."""
    import numpy as np
    from transformers import AutoModel, AutoTokenizer

    from tunery import pretraining as pt
    from tunery.models import ModelError

    reloaded = AutoModel.from_pretrained(folder).to(next(model.parameters()).device)
    rtok = AutoTokenizer.from_pretrained(folder)
    if "token_type_ids" not in rtok("x"):
        raise ModelError(
            folder, "tokenizer_contract", "the saved tokenizer returns no token_type_ids"
        )
    if not texts:
        return
    a = pt.embed(model, tok, texts, max_length=max_length)
    b = pt.embed(reloaded, rtok, texts, max_length=max_length)
    diff = float(np.abs(a - b).max())
    if diff > 1e-3:
        raise ModelError(folder, "reload_mismatch", f"reloaded encoder differs by {diff:.2e}")


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
    from tunery import training

    if training.is_main_process():
        from tunery.stage import stage_main

        stage_main("pretrain", _stage, argv)
    else:
        _worker(argv)
    training.shutdown_distributed()


def _worker(argv: list[str] | None) -> None:
    """A DDP rank other than 0: trains its share; rank 0 evaluates, writes and logs."""
    import argparse
    import sys

    from tunery import env, training
    from tunery.config import load_params
    from tunery.errors import TuneryError
    from tunery.stage import setup_logging

    parser = argparse.ArgumentParser(prog="python -m tasks.pretrain")
    parser.add_argument("-p", "--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    root = env.configure()
    try:
        _stage(load_params(root / args.params, args.set), root, None)
    except TuneryError as exc:
        print(f"tunery pretrain (rank {training.rank()}): error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
