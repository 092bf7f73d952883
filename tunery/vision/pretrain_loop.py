"""The image pretraining objectives' one training loop: `transformers.Trainer` on a model whose
`forward` returns its own self-supervised loss (SimCLR's NT-Xent, MAE's reconstruction).

Each objective supplies its model and a collator that makes its inputs (SimCLR's two views, MAE's
masking noise), seeded by the batch's dataset indices, so a resumed run sees what the
uninterrupted one would have. The loop brings what both need: the schedule
(`PretrainSchedule`: warmup then cosine), checkpoints marked complete once every process has
written them and resumed by fingerprint (`tunery.modeling.training.resume_point`, the text
loops'), a wall-clock budget, and DDP under `torchrun` with `batch_size` the global batch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tunery.vision.settings import PretrainSchedule


def per_process_batch(batch_size: int, processes: int) -> int:
    """`batch_size` is the global batch (as `finetune.batch_size` on the text side): under
    torchrun each of the processes takes its share (SimCLR's NT-Xent gathers the views of all),
    so the negatives, the steps and the schedule do not depend on the number of processes."""
    if batch_size % processes:
        from tunery.errors import ConfigError

        raise ConfigError(
            f"pretrain batch_size {batch_size} is the global batch and must divide evenly among "
            f"the {processes} training processes"
        )
    return batch_size // processes


def training_args(settings: PretrainSchedule, out_dir: Path) -> Any:
    import torch
    from transformers import TrainingArguments

    from tunery.modeling.training import world_size

    cuda = torch.cuda.is_available()
    processes = world_size()
    ddp = {"ddp_backend": "nccl" if cuda else "gloo"} if processes > 1 else {}
    return TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=per_process_batch(settings.batch_size, processes),
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, int(settings.warmup_share * settings.max_steps)),
        max_steps=settings.max_steps,
        logging_steps=settings.logging_steps,
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or settings.max_steps,
        save_total_limit=2,
        report_to="none",
        remove_unused_columns=False,
        dataloader_drop_last=True,  # NT-Xent's negatives: every step the same batch size
        seed=settings.seed,
        data_seed=settings.seed,
        disable_tqdm=True,
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        **ddp,
    )


def fit(
    model: Any,
    dataset: Any,
    collator: Any,
    settings: PretrainSchedule,
    *,
    out_dir: Path,
    resume: str | None = None,
    what: str = "pretrain",
) -> dict[str, Any]:
    """Train `model` on `dataset` batched by `collator`; save it (safetensors) to `out_dir/model`.
    Progress (steps, loss, rate, ETA) is logged as `what`.

    Checkpoints (`save_steps`) go to `out_dir/checkpoint-<step>`, each marked complete once
    written (the text loops' `CompletionMarker`). `resume`, a fingerprint of what shapes the
    training, continues from the newest complete checkpoint made with the same fingerprint
    (`tunery.modeling.training.resume_point`: a half-written one is skipped and removed, another
    fingerprint's folder is cleared); None starts fresh. Returns the run's numbers: steps, images
    seen (the global count), seconds, images/s, first and last logged loss, the loss history.
    Under torchrun rank 0 writes `out_dir/model`; the others wait for it.
    """
    from transformers import PrinterCallback

    from tunery.modeling.callbacks import StepProgress, WallClockBudget, trainer_callbacks
    from tunery.modeling.training import resume_point
    from tunery.vision.trainer import VisionTrainer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = training_args(settings, out_dir)
    callbacks = trainer_callbacks(max_minutes=settings.max_minutes)
    budget = next((c for c in callbacks if isinstance(c, WallClockBudget)), None)
    trainer = VisionTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[*callbacks, StepProgress(what)],
    )
    trainer.remove_callback(PrinterCallback)  # the raw log dicts: StepProgress says it readably
    checkpoint = None
    if resume is not None:  # under torchrun: rank 0 tidies the folder, then the others look
        with args.main_process_first(desc="checkpoint housekeeping"):
            checkpoint = resume_point(out_dir, resume, main=trainer.is_world_process_zero())
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - t0
    if trainer.is_world_process_zero():
        model.save_pretrained(out_dir / "model")
    trainer.accelerator.wait_for_everyone()
    history = [
        {"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h
    ]
    steps = trainer.state.global_step - _step_of(checkpoint)
    images = steps * settings.batch_size * args.gradient_accumulation_steps  # the global batch
    return {
        "steps": trainer.state.global_step,
        "resumed_from_step": _step_of(checkpoint),  # 0: a fresh start
        "images": images,
        "seconds": round(seconds, 2),
        "images_per_s": round(images / seconds, 1) if seconds else 0.0,
        "loss_first": history[0]["loss"] if history else None,
        "loss_last": history[-1]["loss"] if history else None,
        "stopped_by_budget": bool(budget and budget.stopped_at is not None),
        "world_size": args.world_size,  # training processes (torchrun); images: the global count
        "history": history,
    }


def _step_of(checkpoint: Path | None) -> int:
    return int(checkpoint.name.rsplit("-", 1)[-1]) if checkpoint else 0
