"""The `Trainer` the vision models train with: transformers' own, with a resume that keeps weights.

Why a subclass: transformers 5 renamed ViT's modules (`attention.attention.query` became
`attention.q_proj`) and `save_pretrained` writes the old names for compatibility, but
`Trainer._load_from_checkpoint` loads the checkpoint's raw state dict non-strictly, so a resumed
ViT silently restarts from its initial encoder weights (seen with 5.23: "unexpected keys in the
checkpoint"). Here a full-model checkpoint is read back through `from_pretrained` (which renames)
and loaded strictly; adapters (peft) keep the Trainer's own path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, Trainer


class VisionTrainer(Trainer):
    """`Trainer` whose resume loads ViT checkpoints under their current names, strictly."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        model = self.model if model is None else model
        if not isinstance(model, PreTrainedModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        loaded = type(model).from_pretrained(
            Path(resume_from_checkpoint), local_files_only=True, attn_implementation="eager"
        )
        model.load_state_dict(loaded.state_dict(), strict=True)
        return None
