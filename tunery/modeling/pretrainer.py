"""The pretraining loop: the corpus in, `transformers.Trainer` on an objective (MLM or SimCSE), the
held-out loss and the probe out. The stage (`tasks/pretrain.py`) wires these; the encoder is
built and written by `tunery.modeling.encoder`, the objectives live in `tunery.modeling.objectives`.

It runs unchanged under `torchrun` (DDP; rank 0 evaluates, writes and logs).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunery.data.tokens import unpadded
from tunery.errors import DataValidationError
from tunery.io import file_md5
from tunery.modeling.encoder import build_encoder, build_tokenizer, random_twin

if TYPE_CHECKING:
    from tunery.config import PretrainConfig

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
    from tunery.modeling.training import fingerprint

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


@dataclass(frozen=True)
class Inputs:
    """The corpus (split into training and held-out texts) and the probe's labelled splits."""

    corpus_path: Path
    texts: list[str]
    train_texts: list[str]
    held_texts: list[str]
    probe_train: tuple[list[str], list[str]]
    probe_val: tuple[list[str], list[str]]


def load_inputs(cfg: PretrainConfig, data_dir: Path) -> Inputs:
    """Read and check the corpus (at least one batch) and the probe's train/val splits."""
    from tunery.modeling import training

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
    return Inputs(corpus_path, texts, train_texts, held_texts, probe_train, probe_val)


# --------------------------------------------------------------------------- training
@dataclass
class Trained:
    """A finished (or budget-stopped) pretraining run."""

    trainer: Any
    args: Any
    model: Any  # unwrapped (rank 0 only)
    tok: Any
    info: dict[str, Any]
    result: Any
    resume: Path | None
    callbacks: list[Any]
    train_seconds: float

    @property
    def resumed_step(self) -> int:
        return int(self.resume.name.split("-")[-1]) if self.resume else 0


def head_of(cfg: PretrainConfig) -> str:
    return "mlm" if cfg.objective == "mlm" else "none"


def trainer_args(cfg: PretrainConfig, checkpoint_dir: Path) -> Any:
    from tunery.modeling import training

    t = cfg.train
    return training.training_args(
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


def _model_and_resume(
    cfg: PretrainConfig, inputs: Inputs, args: Any, checkpoint_dir: Path, *, main: bool
) -> tuple[Any, Any, dict[str, Any], Path | None]:
    from tunery.modeling import training

    head = head_of(cfg)
    if cfg.init == "base":
        # A bad base, or one the objective cannot run on, fails before any checkpoint housekeeping.
        model, tok, info = build_encoder(cfg, None, head=head)
    fp = resume_fingerprint(cfg, file_md5(inputs.corpus_path))
    with args.main_process_first(desc="checkpoint housekeeping"):
        resume = training.resume_point(checkpoint_dir, fp, main=main)
        if cfg.init == "scratch":
            tok = build_tokenizer(cfg, inputs.train_texts, checkpoint_dir, main=main)
    if cfg.init == "scratch":
        model, tok, info = build_encoder(cfg, tok, head=head)
    return model, tok, info, resume


def _data(cfg: PretrainConfig, tok: Any, texts: list[str]) -> tuple[Any, Any]:
    """The tokenized training texts and the objective's collator."""
    from tunery.modeling import objectives as pt

    whole_word = cfg.objective == "mlm" and cfg.mlm.whole_word
    features = unpadded(
        tok, texts, max_length=cfg.max_length, special_tokens_mask=True, offsets=whole_word
    )
    if cfg.objective == "mlm":
        return features, pt.mlm_collator(tok, cfg.mlm)
    return features, pt.simcse_collator(tok, deletion=cfg.simcse.deletion)


def train(cfg: PretrainConfig, inputs: Inputs, *, checkpoint_dir: Path, main: bool) -> Trained:
    """Build (or resume) and train; every rank calls this, rank 0 gets the unwrapped model."""
    from transformers import PrinterCallback, Trainer

    from tunery.modeling import objectives as pt
    from tunery.modeling.callbacks import StepProgress, trainer_callbacks

    args = trainer_args(cfg, checkpoint_dir)
    model, tok, info, resume = _model_and_resume(cfg, inputs, args, checkpoint_dir, main=main)
    pt.use_objective(
        model,
        cfg.objective,
        sparse_mlm=cfg.mlm.sparse_head,
        temperature=cfg.simcse.temperature,
        pooling=cfg.simcse.pooling,
    )
    features, collate = _data(cfg, tok, inputs.train_texts)
    callbacks = [
        *trainer_callbacks(max_minutes=cfg.train.max_minutes),
        StepProgress(f"pretrain {cfg.objective}"),
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
    if main:
        model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    return Trained(trainer, args, model, tok, info, result, resume, callbacks, train_seconds)


# --------------------------------------------------------------------------- what it bought
def heldout_losses(cfg: PretrainConfig, run: Trained, twin: Any, held_texts: list[str]) -> dict:
    """Held-out loss: the pretrained model against its random-weights twin, on the same masks."""
    from tunery.modeling import objectives as pt

    model, tok = run.model, run.tok
    whole_word = cfg.objective == "mlm" and cfg.mlm.whole_word
    held = unpadded(
        tok, held_texts, max_length=cfg.max_length, special_tokens_mask=True, offsets=whole_word
    )
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
                model, tok, held, batch_size=cfg.train.batch_size, deletion=cfg.simcse.deletion
            ),
            4,
        )
    pt.plain_class(model)
    return heldout


def probe_score(cfg: PretrainConfig, model: Any, tok: Any, inputs: Inputs) -> dict[str, float]:
    """Frozen embeddings of `model`: a probe fit on train, scored on val."""
    from tunery.modeling import objectives as pt

    p = cfg.probe
    x_train, y_train = inputs.probe_train[0][: p.max_train], inputs.probe_train[1][: p.max_train]
    x_val, y_val = inputs.probe_val
    size = dict(max_length=cfg.max_length, batch_size=p.batch_size)
    return pt.probe(
        pt.embed(model, tok, x_train, **size),
        y_train,
        pt.embed(model, tok, x_val, **size),
        y_val,
        methods=p.methods,
        k=p.knn_k,
    )


def probes(cfg: PretrainConfig, run: Trained, twin: Any, inputs: Inputs) -> dict[str, Any]:
    """Probe: frozen embeddings, pretrained vs the same architecture with random weights."""
    model, tok = run.model, run.tok
    probe = {
        "pretrained": probe_score(cfg, model, tok, inputs),
        "random": probe_score(cfg, twin, tok, inputs),
    }
    if cfg.init == "base":
        initial, _, _ = build_encoder(cfg, tok, head="none")
        initial = initial.to(next(model.parameters()).device)
        probe["initial"] = probe_score(cfg, initial, tok, inputs)
    methods = cfg.probe.methods
    probe["margin"] = {m: round(probe["pretrained"][m] - probe["random"][m], 4) for m in methods}
    return probe


def twin_of(cfg: PretrainConfig, run: Trained) -> Any:
    from tunery.modeling import objectives as pt

    return random_twin(pt.plain_class(run.model), head=head_of(cfg), seed=cfg.train.seed)


def metrics(
    cfg: PretrainConfig,
    run: Trained,
    *,
    history: list[dict[str, float]],
    heldout: dict[str, Any],
    probe: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """metrics/pretrain.json."""
    from tunery.modeling import training

    t, state, args = cfg.train, run.trainer.state, run.args
    steps_done = state.global_step - run.resumed_step
    per_step = t.batch_size * training.world_size()
    budget = next((c for c in run.callbacks if hasattr(c, "stopped_at")), None)
    secs = run.train_seconds
    out: dict[str, Any] = {
        "init": cfg.init,
        "objective": cfg.objective,
        "source": run.info["source"],
        "fresh_head_tensors": len(run.info["new_weights"]),
        "parameters": sum(x.numel() for x in run.model.parameters()),
        "steps": state.global_step,
        "steps_this_run": steps_done,
        "resumed_from_step": run.resumed_step,
        # A cached output must not depend on the machine's speed: a wall-clock stop is recorded.
        "max_steps": state.max_steps,
        "max_minutes": t.max_minutes,
        "stopped_by_budget": bool(budget and budget.stopped_at is not None),
        "stopped_at_step": budget.stopped_at if budget else None,
        "train_loss": round(float(run.result.training_loss), 4) if steps_done else None,
        "final_loss": history[-1]["loss"] if history else None,
        "train_seconds": round(secs, 2),
        "samples_per_second": round(steps_done * per_step * t.grad_accum / secs, 1)
        if secs > 0
        else 0.0,
        "heldout": heldout,
        "probe": probe,
        "world_size": training.world_size(),
        "device": str(args.device),
        "bf16": bool(args.bf16),
        "compiled": bool(args.torch_compile),
        "compile_mode": (args.torch_compile_mode or "default") if args.torch_compile else None,
        "total_seconds": round(time.perf_counter() - started, 2),
    }
    tokens_seen = state.num_input_tokens_seen or None
    if tokens_seen:
        out["tokens_seen"] = int(tokens_seen)
    return out
