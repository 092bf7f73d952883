"""The training loop: `transformers.Trainer` set up for a fine-tune, with early stopping on
validation macro-F1, the best model kept, resumable checkpoints and per-step measurements.

The Trainer subclass, its callback and the weighted loss live in `tunery.modeling.hf_trainer`
(which imports transformers at module level); this module stays cheap to import.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunery.data.labelled import Split
from tunery.data.tokens import unpadded
from tunery.errors import FinetuneError
from tunery.modeling.devices import PeakMemory, resolve_device, resolve_precision
from tunery.modeling.training import (
    is_main_process,
    last_complete_checkpoint,
    training_args,
    world_size,
)

if TYPE_CHECKING:
    from tunery.config import FinetuneConfig

log = logging.getLogger("tunery.finetuning")


@dataclass
class TrainResult:
    model: Any
    best_val_macro_f1: float
    epochs: float
    steps: int
    train_seconds: float  # training steps only (no evaluation)
    samples_per_s: float
    tokens_per_s: float  # real (non-padding) tokens
    padding_share: float
    peak_memory_mb: float
    memory_delta_mb: float
    resumed_from: str | None
    history: list[dict[str, float]] = field(default_factory=list)
    # Per optimizer step (this process's steps; a resumed run lacks the earlier ones).
    step_seconds: list[float] = field(default_factory=list)
    step_samples: list[int] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)
    step_padded: list[int] = field(default_factory=list)
    # The fast-path settings this run used (pad multiple, compile mode, loader workers).
    settings: dict[str, Any] = field(default_factory=dict)


def labelled_features(tokenizer: Any, split: Split, max_length: int) -> list[dict[str, Any]]:
    """The split's unpadded token features (tunery/data/tokens.py), each with its label."""
    features = unpadded(tokenizer, split.texts, max_length=max_length)
    return [{**f, "labels": label} for f, label in zip(features, split.labels, strict=True)]


def class_weight_vector(labels: Sequence[int], n_classes: int) -> list[float]:
    """'balanced' weights: n / (k * count), so a balanced set gets all ones."""
    counts = [0] * n_classes
    for y in labels:
        counts[y] += 1
    n = len(labels)
    return [n / (n_classes * c) if c else 0.0 for c in counts]


def macro_f1_from_logits(eval_pred: Any) -> dict[str, float]:
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score

    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    pred = np.asarray(logits).argmax(-1)
    return {
        "macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(labels, pred)),
    }


def cuda_settings(
    cfg: FinetuneConfig, method: str, device: str, use_compile: bool
) -> dict[str, Any]:
    """The GPU fast path's settings; on CPU exactly what the stage always did (no extra settings).

    With short texts (the demo's glosses are ~20 tokens) a step is bound by kernel launches and
    host work, not by the GPU's arithmetic: so on CUDA, lengths padded to a multiple of 32 (few
    shapes), torch.compile with CUDA graphs ("reduce-overhead") for the methods tested with it,
    batches collated in worker processes and copied from pinned memory without blocking, and no
    per-step host synchronisation (the Trainer's NaN/Inf loss filter reads the loss every step;
    off on CUDA: a NaN loss shows in the logged average instead of being skipped).
    """
    cuda = device == "cuda"
    pad = getattr(cfg, "pad_to_multiple_of", None)
    workers = getattr(cfg, "dataloader_workers", None)
    workers = (2 if cuda else 0) if workers is None else workers
    mode = getattr(cfg, "compile_mode", "auto") or "auto"
    if mode == "auto":
        graphs = cuda and method in ("lora", "ia3", "full")
        mode = "reduce-overhead" if graphs else "default"
    trainer: dict[str, Any] = {"dataloader_num_workers": workers}
    if workers:
        trainer["dataloader_persistent_workers"] = True
    if use_compile and mode != "default":
        trainer["torch_compile_mode"] = mode
    if cuda:
        trainer["logging_nan_inf_filter"] = False
        trainer["dataloader_pin_memory"] = True
        trainer["accelerator_config"] = {"non_blocking": True}
    return {
        "pad_to_multiple_of": pad if pad is not None else (32 if cuda else None),
        "compile_mode": mode if use_compile else None,
        "trainer": trainer,
    }


@dataclass(frozen=True)
class _Run:
    """What `train` resolved once: where and how this run trains."""

    device: str
    precision: str
    use_compile: bool
    fast: dict[str, Any]

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def _resolve_run(cfg: FinetuneConfig, method: str) -> _Run:
    import torch

    device = resolve_device(cfg)
    precision = resolve_precision(cfg, device)
    if getattr(cfg, "threads", 0):
        torch.set_num_threads(cfg.threads)
    cuda = device == "cuda"
    # Compiled kernels are chosen by timing, so two compiled CUDA runs can differ (measured on the
    # H100: 6.7e-4 max weight difference, 0 without compile): `deterministic` keeps compile off.
    use_compile = cfg.compile if cfg.compile is not None else cuda and not cfg.deterministic
    if use_compile and cuda and cfg.deterministic:
        log.warning(
            "finetune.deterministic with compile on CUDA: re-runs may still differ slightly"
        )
    fast = cuda_settings(cfg, method, device, use_compile)
    return _Run(device=device, precision=precision, use_compile=use_compile, fast=fast)


def _trainer_settings(
    cfg: FinetuneConfig, method: str, run: _Run, *, out: Path, epochs: float, n_train: int
) -> dict[str, Any]:
    """The TrainingArguments of a fine-tune: evaluation and a checkpoint every epoch."""
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    processes = world_size()
    if cfg.batch_size % processes:
        raise FinetuneError(
            f"finetune.batch_size {cfg.batch_size} is the global batch and must divide evenly "
            f"among the {processes} training processes"
        )
    return dict(
        output_dir=str(out),
        num_train_epochs=epochs,
        # `batch_size` is the global batch: under torchrun each process takes its share, so the
        # steps, the schedule and the metrics do not depend on the number of processes.
        per_device_train_batch_size=cfg.batch_size // processes,
        per_device_eval_batch_size=cfg.eval_batch_size,
        learning_rate=getattr(cfg, method).learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,  # the best and the last
        load_best_model_at_end=True,
        metric_for_best_model="macro_f1",
        greater_is_better=True,
        logging_strategy="steps",
        logging_steps=max(1, steps_per_epoch // 4),
        seed=cfg.seed,
        data_seed=cfg.seed,
        # Deterministic kernels on CPU (cheap there); on CUDA only when asked (they cost speed).
        full_determinism=run.device == "cpu" if cfg.deterministic is None else cfg.deterministic,
        use_cpu=run.device == "cpu",
        bf16=run.precision == "bf16",
        torch_compile=run.use_compile,
        **run.fast["trainer"],
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        label_names=["labels"],
        report_to="none",
        disable_tqdm=True,
        restore_callback_states_from_checkpoint=True,
    )


def _output_dir(checkpoint_dir: Path | None) -> tuple[Path, Path | None, Path | None]:
    """(where the Trainer writes, a temporary folder to remove, the checkpoint to resume from)."""
    if checkpoint_dir is None:
        temp = Path(tempfile.mkdtemp(prefix="tunery-ft-"))
        return temp, temp, None
    out = Path(checkpoint_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Under torchrun the main process alone removes half-written checkpoints.
    resume = last_complete_checkpoint(out, main=is_main_process())
    if resume is not None:
        log.info("resuming from %s", resume)
    return out, None, resume


def train(
    model: Any,
    tokenizer: Any,
    cfg: FinetuneConfig,
    *,
    method: str,
    train_split: Split,
    val_split: Split,
    checkpoint_dir: Path | None,
    max_length: int,
    epochs: float | None = None,
    on_log: Callable[[dict[str, float], int], None] | None = None,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Train with `transformers.Trainer`: early stopping on validation macro-F1, best model kept.

    With `checkpoint_dir`, checkpoints (safetensors weights) are kept there and a run with the
    same folder resumes from the last complete one; without, a temporary folder is used.
    """
    from transformers import DataCollatorWithPadding, EarlyStoppingCallback, PrinterCallback

    from tunery.modeling.callbacks import trainer_callbacks
    from tunery.modeling.hf_trainer import StepHooks, TokenCounter, TuneryTrainer, WeightedLoss

    run = _resolve_run(cfg, method)
    train_features = labelled_features(tokenizer, train_split, max_length)
    out, temp, resume = _output_dir(checkpoint_dir)
    epochs = cfg.epochs if epochs is None else epochs
    settings = _trainer_settings(
        cfg, method, run, out=out, epochs=epochs, n_train=len(train_features)
    )
    hooks, counter = StepHooks(method=method, cuda=run.cuda, on_log=on_log), TokenCounter()
    n_classes = model.config.num_labels
    trainer = TuneryTrainer(
        model=model,
        args=training_args(**settings),  # adapts to the transformers version (the GPU's 5.17)
        train_dataset=train_features,
        eval_dataset=labelled_features(tokenizer, val_split, max_length),
        # On CUDA, lengths rounded up to a multiple of 32: few shapes for compile / CUDA graphs.
        data_collator=DataCollatorWithPadding(
            tokenizer, pad_to_multiple_of=run.fast["pad_to_multiple_of"]
        ),
        processing_class=tokenizer,
        compute_metrics=macro_f1_from_logits,
        compute_loss_func=(
            WeightedLoss(class_weight_vector(train_split.labels, n_classes))
            if cfg.class_weights == "balanced"
            else None
        ),
        callbacks=[
            hooks,
            EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience),
            # marks each checkpoint complete (before any later callback can fail the run)
            *(trainer_callbacks(max_minutes=None) if checkpoint_dir is not None else ()),
            *callbacks,
        ],
        method=method,
        cuda=run.cuda,
        counter=counter,
    )
    trainer.remove_callback(PrinterCallback)  # logs go through `on_log` and our logger instead
    try:
        with PeakMemory(run.device) as mem:
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        hooks.collect()
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    return _result(trainer, hooks, counter, mem, run, resume)


def _result(
    trainer: Any, hooks: Any, counter: Any, mem: PeakMemory, run: _Run, resume
) -> TrainResult:
    """What a finished Trainer measured, as a TrainResult (the best model, in eval mode)."""
    state = trainer.state
    best = state.best_metric if state.best_metric is not None else float("nan")
    model = trainer.model
    model.eval()
    train_seconds = sum(hooks.step_seconds)
    secs = max(train_seconds, 1e-9)
    step_tokens = [int(t) for t in counter.real]
    real_tokens, padded_tokens = sum(step_tokens), sum(counter.padded)
    return TrainResult(
        model=model,
        best_val_macro_f1=float(best),
        epochs=float(state.epoch or 0.0),
        steps=int(state.global_step),
        train_seconds=round(train_seconds, 3),
        samples_per_s=round(sum(counter.samples) / secs, 1),
        tokens_per_s=round(real_tokens / secs, 1),
        padding_share=round(1 - real_tokens / padded_tokens, 4) if padded_tokens else 0.0,
        peak_memory_mb=mem.peak_mb,
        memory_delta_mb=mem.delta_mb,
        resumed_from=str(resume) if resume else None,
        history=[dict(h) for h in state.log_history],
        step_seconds=hooks.step_seconds,
        step_samples=counter.samples,
        step_tokens=step_tokens,
        step_padded=counter.padded,
        settings={
            "pad_to_multiple_of": run.fast["pad_to_multiple_of"],
            "compile_mode": run.fast["compile_mode"],
            "dataloader_workers": run.fast["trainer"]["dataloader_num_workers"],
        },
    )
