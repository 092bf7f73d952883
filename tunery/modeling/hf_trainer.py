"""The `transformers.Trainer` pieces a fine-tune needs: the Trainer subclass, its step callback and
the class-weighted loss. transformers and torch are imported at module level here, so only
`tunery.modeling.trainer.train` imports this module (inside the function).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

log = logging.getLogger("tunery.finetuning")

RANK_PATTERN_FILE = "adalora_rank_pattern.json"


class TokenCounter:
    """Counts real and padded tokens of training batches (device tensors: no sync per step)."""

    def __init__(self) -> None:
        self.real: list[Any] = []  # per step
        self.padded: list[int] = []
        self.samples: list[int] = []

    def add(self, mask: Any) -> None:
        self.real.append(mask.sum())
        self.padded.append(int(mask.numel()))
        self.samples.append(int(mask.shape[0]))


class WeightedLoss:
    """Cross-entropy with class weights ('balanced'), as the Trainer's `compute_loss_func`."""

    def __init__(self, weights: Sequence[float]) -> None:
        self.weights = torch.tensor(list(weights))

    def __call__(self, outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
        logits = outputs["logits"].float()
        loss = torch.nn.functional.cross_entropy(
            logits, labels, weight=self.weights.to(logits.device), reduction="sum"
        )
        return loss / (num_items_in_batch or labels.numel())


class StepHooks(TrainerCallback):
    """Step timing (training only), AdaLoRA rank budgeting, and live metric logging."""

    def __init__(
        self,
        *,
        method: str,
        cuda: bool,
        on_log: Callable[[dict[str, float], int], None] | None = None,
    ) -> None:
        self.method, self.cuda, self.on_log_fn = method, cuda, on_log
        self.step_seconds: list[float] = []
        self._t0: Any = 0.0
        self._pairs: list[tuple[Any, Any]] = []  # CUDA: (start, end) events per step

    # Training time = the sum of epoch-begin/step-end intervals: batches and steps included,
    # evaluation and checkpointing (after an epoch's last step) excluded. On CUDA the marks
    # are CUDA events read after training: no host synchronisation per step, and an interval
    # ends when the GPU has finished the step (or at the mark, when the GPU waits on the host).
    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def collect(self) -> None:
        if self._pairs:
            self._pairs[-1][1].synchronize()
            self.step_seconds = [a.elapsed_time(b) / 1e3 for a, b in self._pairs]

    def on_epoch_begin(self, args, state, control, **kw):
        self._t0 = self._mark()

    def on_optimizer_step(self, args, state, control, model=None, **kw):
        if self.method == "adalora":
            # Needs the gradients, so between optimizer.step() and zero_grad().
            peft_model = model.module if hasattr(model, "module") else model
            peft_model.base_model.update_and_allocate(state.global_step)

    def on_step_end(self, args, state, control, **kw):
        now = self._mark()
        if self.cuda:
            self._pairs.append((self._t0, now))
        else:
            self.step_seconds.append(now - self._t0)
        self._t0 = now

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "eval_macro_f1" in logs:
            log.info(
                "epoch %.0f: val macro-F1 %.4f, val loss %.4f",
                state.epoch or 0,
                logs["eval_macro_f1"],
                logs.get("eval_loss", float("nan")),
            )
        if self.on_log_fn and logs:
            self.on_log_fn(
                {k: v for k, v in logs.items() if isinstance(v, (int, float))},
                state.global_step,
            )


class TuneryTrainer(Trainer):
    """Counts training tokens; keeps AdaLoRA checkpoints at full rank (see below)."""

    def __init__(self, *args: Any, method: str, cuda: bool, counter: TokenCounter, **kw: Any):
        self._method, self._cuda, self._counter = method, cuda, counter
        # On CUDA the step is host-bound (see `trainer.cuda_settings`); the Trainer walks all
        # ~500 modules of a peft model several times per step. Two of those walks give per-step
        # constants: the parameter count (FLOP estimate) and the parameters that can have
        # gradients (the frozen ones never do, and clipping skips parameters without one).
        self._params_count: int | None = None
        self._grad_params: list[Any] | None = None
        super().__init__(*args, **kw)

    def compute_loss(self, model, inputs, *a, **kw):
        if model.training:
            self._counter.add(inputs["attention_mask"])
        return super().compute_loss(model, inputs, *a, **kw)

    def floating_point_ops(self, inputs):
        if not self._cuda:
            return super().floating_point_ops(inputs)
        if self._params_count is None:
            self._params_count = (
                self.model.num_parameters(exclude_embeddings=True)
                if hasattr(self.model, "num_parameters")
                else -1
            )
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or self._params_count < 0:
            return 0
        return 6 * inputs[main_input].numel() * self._params_count

    def _clip_grad_norm(self, model):
        if not self._cuda or self.accelerator.distributed_type != "NO" or self.args.fp16:
            return super()._clip_grad_norm(model)
        if self._grad_params is None:
            self._grad_params = [p for p in model.parameters() if p.requires_grad]
        return torch.nn.utils.clip_grad_norm_(self._grad_params, self.args.max_grad_norm)

    # AdaLoRA's rank pattern changes while it trains, and peft saves the adapter resized to
    # the current pattern, so checkpoints from different steps have different shapes and the
    # Trainer cannot load the best one or resume. Checkpoints are saved at full rank instead
    # (pruned ranks are zeros), with the pattern beside them, and put back after loading.
    def save_model(self, output_dir=None, _internal_call=False):
        if self._method != "adalora" or not _internal_call:
            return super().save_model(output_dir, _internal_call)
        cfg_ = self.model.peft_config["default"]
        pattern, cfg_.rank_pattern = cfg_.rank_pattern, None
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            cfg_.rank_pattern = pattern
        Path(output_dir, RANK_PATTERN_FILE).write_text(json.dumps(pattern))

    def _with_full_rank(self, load, checkpoint):
        if self._method != "adalora":
            return load()
        cfg_ = self.model.peft_config["default"]
        cfg_.rank_pattern = None
        load()
        saved = Path(checkpoint or "", RANK_PATTERN_FILE)
        cfg_.rank_pattern = json.loads(saved.read_text()) if saved.is_file() else None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        parent = super()._load_from_checkpoint
        self._with_full_rank(lambda: parent(resume_from_checkpoint, model), resume_from_checkpoint)

    def _load_best_model(self):
        self._with_full_rank(super()._load_best_model, self.state.best_model_checkpoint)
