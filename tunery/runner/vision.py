"""`tunery run` in the image pipeline's folder (`vision/`): its DVC stages, then the end of the run.

The text pipeline's `tunery run` drives its stages from a Prefect flow and registers afterwards;
the image pipeline keeps registration as its last DVC stage (`register`), so here `tunery run` is
`dvc repro` in the folder, streamed, plus the same end of run: the stages that ran, the
stage-value table and the registry's decision. The Prefect retrain flow (flows/retrain.py) runs
the same `run` after taking new image drops in; the pipeline flow does not run image stages.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tunery.config import load_raw

RAN = re.compile(r"Running stage '(?:[^']*:)?([^']+)'")


def is_vision_params(path: Path) -> bool:
    """Whether `path` is an image pipeline's params file (`modality: image`)."""
    from tunery.vision.params import is_vision

    return Path(path).is_file() and is_vision(load_raw(Path(path)))


def run(
    root: Path, stages: Sequence[str], *, force: bool, on_line: Callable[[str], None]
) -> dict[str, Any]:
    """`dvc repro [-f] [STAGES]` in `root`; the stages run, the table and the registry step."""
    from tunery import metrics_files
    from tunery.evaluation import stage_value
    from tunery.runner.steps import dvc_command
    from tunery.vision.params import load_vision_params

    params = load_vision_params(root / "params.yaml")
    out = dvc_command(root, "repro", *(["--force"] if force else []), *stages, on_line=on_line)
    return {
        "stages_ran": RAN.findall(out),
        "stage_value": stage_value.read(root / params.evaluate.report_dir),
        "registry": metrics_files.read(root, "register"),
    }


def end_lines(result: dict[str, Any]) -> str:
    """The plain-text end of the run."""
    from tunery.evaluation import stage_value

    lines = [
        f"image pipeline: stages run: {', '.join(result['stages_ran']) or 'none (up to date)'}"
    ]
    if result.get("stage_value"):
        lines.append(stage_value.terminal(result["stage_value"]))
    if result.get("registry"):
        lines.append(f"registry: {result['registry'].get('summary', '')}")
    return "\n".join(lines)
