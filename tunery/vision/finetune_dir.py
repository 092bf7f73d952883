"""The image fine-tune stage's output folder: the one module that names, writes and reads it.

model/         the shipped arm's classifier (`ViTForImageClassification`, LoRA merged in)
labels.json    the class names in label-id order
finetune.json  method, the arm shipped and the encoder it started from, the settings
arms.json      every arm's scores on val/test/holdout and the pretrain gate's decision
               (`tunery.evaluation.stage_value` builds its table from it)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunery.errors import TuneryError

MODEL, LABELS, INFO, ARMS = "model", "labels.json", "finetune.json", "arms.json"


def write(folder: Path, model: Any, labels: list[str], info: dict, arms: dict) -> None:
    folder = Path(folder)
    model.save_pretrained(folder / MODEL)
    (folder / LABELS).write_text(json.dumps(labels, indent=2) + "\n")
    (folder / INFO).write_text(json.dumps(info, indent=2) + "\n")
    (folder / ARMS).write_text(json.dumps(arms, indent=2) + "\n")


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TuneryError(f"{path}: unreadable ({exc}); did the finetune stage run?") from None


def read(folder: Path) -> dict[str, Any]:
    """labels, info and arms of a fine-tune folder (the model is loaded by `load_model`)."""
    folder = Path(folder)
    return {
        "labels": list(_json(folder / LABELS)),
        "info": _json(folder / INFO),
        "arms": _json(folder / ARMS),
    }


def load_model(folder: Path) -> Any:
    """The shipped classifier, in eval mode."""
    from transformers import ViTForImageClassification

    path = Path(folder) / MODEL
    if not (path / "config.json").is_file():
        raise TuneryError(f"{path}: no fine-tuned model (did the finetune stage run?)")
    model = ViTForImageClassification.from_pretrained(
        path, local_files_only=True, attn_implementation="eager"
    )
    return model.eval()
