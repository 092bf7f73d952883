"""The image pretrain stage's output folder: the one module that names, writes and reads it.

    init/          the ViT (a `ViTForSimCLR`: with SimCLR's projection head) as pretraining
                   started: the "no pretraining" weights the base fine-tune arm starts from
                   (same architecture, same seed), whichever the objective
    model/         the same model after pretraining (safetensors, `from_pretrained` folder); after
                   MAE its encoder weights are MAE's and the projection head is init's, unused
    pretrain.json  what the run did: the objective, steps, images/s, the loss history, the probe

Both weight folders load into `ViTForImageClassification` (`vit.build_classifier(base_dir=...)`):
the encoder sits under `vit`, the projection head is dropped. Readers that embed (the probe arm,
the LP-FT head, drift) use `ViTForSimCLR.embed`, pooled as its config's `simclr_pooling` says.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunery.errors import TuneryError

INIT, MODEL, INFO = "init", "model", "pretrain.json"
OBJECTIVES = {"simclr": "SimCLR", "mae": "MAE"}  # pretrain.objective -> how reports name it


def objective_name(objective: str) -> str:
    return OBJECTIVES.get(objective, objective)


def objective(folder: Path) -> str:
    """The objective that made the encoder in `folder` (older folders: SimCLR's)."""
    return read_info(folder).get("objective", "simclr")


def init_dir(folder: Path) -> Path:
    return _need(Path(folder) / INIT)


def model_dir(folder: Path) -> Path:
    return _need(Path(folder) / MODEL)


def _need(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise TuneryError(f"{path}: no encoder here (did the pretrain stage run?)")
    return path


def write_info(folder: Path, info: dict[str, Any]) -> None:
    (Path(folder) / INFO).write_text(json.dumps(info, indent=2) + "\n")


def read_info(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(folder) / INFO).read_text())
    except (OSError, ValueError):
        return {}
