"""The `TrainerCallback`s the training loops share: checkpoint completion, a wall-clock budget,
the MLM head warm-up, step progress. transformers is imported at module level here: import this module inside
the functions that build a Trainer (it stays off the import path of the light modules).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tunery.modeling.training import any_rank, barrier, dist_ready, write_marker
from tunery.progress import Progress

log = logging.getLogger("tunery.training")


class CompletionMarker(TrainerCallback):
    """Mark a checkpoint complete once every process has finished writing it."""

    def on_save(self, args, state, control, **kwargs):
        barrier()
        if state.is_world_process_zero:
            write_marker(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        barrier()


class WallClockBudget(TrainerCallback):
    """Stop after `max_minutes` (this run's wall clock), saving a checkpoint first."""

    def __init__(self, minutes: float) -> None:
        self.seconds = minutes * 60.0
        self.start = time.monotonic()
        self.stopped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        over = time.monotonic() - self.start > self.seconds
        # Every rank must stop on the same step, or the others hang in the next all-reduce:
        # under DDP the ranks agree every few steps (one tiny all-reduce).
        if dist_ready():
            if state.global_step % 5:
                return control
            over = any_rank(over, args.device)
        if over:
            control.should_training_stop = True
            control.should_save = args.save_strategy != "no"  # a run that keeps no checkpoints
            self.stopped_at = state.global_step
            log.warning(
                "wall-clock budget of %.1f min spent at step %d of %d: stopping",
                self.seconds / 60,
                state.global_step,
                state.max_steps,
            )
        return control


def trainer_callbacks(*, max_minutes: float | None) -> list[Any]:
    """`CompletionMarker` always; `WallClockBudget` when a budget is set."""
    cbs: list[Any] = [CompletionMarker()]
    if max_minutes:
        cbs.append(WallClockBudget(max_minutes))
    return cbs


class HeadWarmup(TrainerCallback):
    """Freezes the encoder (the MLM head trains alone) until `steps`.

    The optimizer is built with every parameter; frozen ones get no gradient, so AdamW leaves
    them (and their moments) untouched. The step is read from the trainer state, so a resumed
    run freezes exactly when the uninterrupted one would have.
    """

    def __init__(self, model: Any, steps: int) -> None:
        self.encoder = getattr(model, model.base_model_prefix)
        self.steps = steps
        self.frozen: bool | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        freeze = state.global_step < self.steps
        if freeze != self.frozen:
            for p in self.encoder.parameters():
                p.requires_grad_(not freeze)
            log.info("step %d: encoder %s", state.global_step, "frozen" if freeze else "trained")
            self.frozen = freeze
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for p in self.encoder.parameters():
            p.requires_grad_(True)
        return control


class StepProgress(TrainerCallback):
    """Logs the training steps with `Progress`, with the latest training loss (resumes count from
    the checkpoint's step)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.progress: Progress | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress = Progress(self.what, state.max_steps, unit="step", start=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is not None and logs and "loss" in logs:
            self.progress.note = f"loss {float(logs['loss']):.4g}"

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(state.global_step)
