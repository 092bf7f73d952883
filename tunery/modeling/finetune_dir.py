"""The finetune output folder: the one module that names, writes, checks and reads it.

    adapter/         peft adapter + head (safetensors) and the tokenizer; the full model for `full`
    merged/          a plain AutoModelForSequenceClassification + tokenizer (mergeable methods)
    labels.json      the sorted label list (index = class id)
    finetune.json    how it was made: method, encoder (+ fingerprint), max_length, data origins...
    arms.json        the arms table and the pretrain gate (`write_arms` / `read_arms`)
    encoder/         only when the chosen arm fine-tuned random weights (they exist nowhere else)

Written by the finetune stage (`write`), read by export, evaluate, warm starts and the registry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunery.data.labelled import LABELS_FILE, read_labels
from tunery.errors import FinetuneError

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
INFO_FILE = "finetune.json"
ARMS_FILE = "arms.json"
ENCODER_DIR = "encoder"
ARM_ORDER = ("probe", "base", "pipeline", "full")
# What a warm start needs of a fine-tune (the registry keeps these as the adapter LoggedModel).
WARM_START_FILES = (ADAPTER_DIR, LABELS_FILE, INFO_FILE)

__all__ = [
    "ADAPTER_DIR",
    "ARMS_FILE",
    "ARM_ORDER",
    "ENCODER_DIR",
    "INFO_FILE",
    "LABELS_FILE",
    "MERGED_DIR",
    "WARM_START_FILES",
    "check",
    "data_origins",
    "is_finetune_dir",
    "labels",
    "read_arms",
    "read_info",
    "resolve",
    "write",
    "write_arms",
]


def is_finetune_dir(folder: Path | None) -> bool:
    return folder is not None and (Path(folder) / INFO_FILE).is_file()


def check(folder: Path) -> Path:
    """`folder` if it is a finetune output, else a FinetuneError naming it."""
    if not is_finetune_dir(folder):
        raise FinetuneError(f"{folder}: not a finetune output (no {INFO_FILE}); run finetune")
    return Path(folder)


def resolve(ref: str | None, root: Path) -> Path | None:
    """A finetune output named in params (`finetune.warm_start`, relative to `root`), checked.

    Registry references (`models:/...`, `champion`) are resolved by the registry first."""
    if ref is None:
        return None
    if ref.startswith("models:/"):
        raise FinetuneError(
            f"{ref}: registry references are resolved by the registry; pass a model directory"
        )
    path = Path(ref) if Path(ref).is_absolute() else root / ref
    if not is_finetune_dir(path):
        raise FinetuneError(f"{path}: not a finetune output (no {INFO_FILE})")
    return path


def read_info(folder: Path) -> dict[str, Any]:
    return json.loads((check(folder) / INFO_FILE).read_text())


def labels(folder: Path) -> list[str]:
    return read_labels(Path(folder) / LABELS_FILE)


def data_origins(folder: Path | None) -> list[str]:
    """The data origins a fine-tune recorded (none when it is not one, or recorded none)."""
    if not is_finetune_dir(folder):
        return []
    return list(read_info(folder).get("data_origins") or [])


def write(folder: Path, *, labels: list[str], info: Mapping[str, Any], arms: Mapping) -> None:
    """The files beside the weights (`adapter/`, `merged/` are written by `modeling.save`)."""
    folder = Path(folder)
    (folder / LABELS_FILE).write_text(json.dumps(labels, indent=2) + "\n")
    (folder / INFO_FILE).write_text(json.dumps(dict(info), indent=2) + "\n")
    write_arms(folder, arms)


def write_arms(finetune_dir: Path, report: Mapping[str, Any]) -> Path:
    """Write `arms.json`: `chosen`, `pretrain_gate` and `arms` (in `ARM_ORDER`)."""
    arms = report["arms"]
    unknown = set(arms) - set(ARM_ORDER)
    if unknown or report["chosen"] not in arms:
        raise FinetuneError(f"arms table: unknown arms {sorted(unknown)} or chosen not among them")
    ordered = {
        "chosen": report["chosen"],
        "pretrain_gate": dict(report["pretrain_gate"]),
        "arms": {name: arms[name] for name in ARM_ORDER if name in arms},
    }
    path = Path(finetune_dir) / ARMS_FILE
    path.write_text(json.dumps(ordered, indent=2) + "\n")
    return path


def read_arms(finetune_dir: Path) -> dict[str, Any]:
    """The arms table of a finetune output (see `write_arms`)."""
    path = Path(finetune_dir) / ARMS_FILE
    if not path.is_file():
        raise FinetuneError(f"{finetune_dir}: no {ARMS_FILE}; run finetune")
    report = json.loads(path.read_text())
    if (
        not {"chosen", "pretrain_gate", "arms"} <= set(report)
        or report["chosen"] not in report["arms"]
    ):
        raise FinetuneError(f"{path}: not an arms table (chosen, pretrain_gate, arms)")
    return report
