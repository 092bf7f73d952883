"""Re-fine-tuning on new data: find it, take it in as a new data version, and say what is stale.

No Prefect here: `flows/retrain.py` turns these steps into a flow. New labelled data lands in
`retrain.landing`; each item is validated with the ingest rules (all of them before any is moved),
copied into `ingest.incoming`, versioned with `dvc add` and pushed to the default remote.

One code path for both pipelines: what differs by modality (files of texts vs folders of images,
their checks, their embeddings, the demo data) is the `tunery.modality.Intake` of the params
(`TEXT_INTAKE` in tunery/data/intake.py, `IMAGE_INTAKE` in tunery/vision/retrain.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunery.errors import TuneryError
from tunery.modality import intake_of
from tunery.runner import steps as pipeline

log = logging.getLogger("tunery.retrain")

LOCK_FILE = ".cache/tunery/retrain.lock"


class Busy(TuneryError):
    """Another retrain holds the lock."""


@contextlib.contextmanager
def exclusive(root: Path) -> Iterator[None]:
    """At most one retrain at a time per project: a second one is skipped, not queued."""
    path = root / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"another retrain is running (lock {path}); this one is skipped") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def landing_files(root: Path, params: Any) -> list[Path]:
    """What waits in the landing folder (files for text, drop folders for images)."""
    return intake_of(params).landed(root, params)


def check_landed(root: Path, params: Any, new: list[Path]) -> list[Any]:
    """Validate every landed item, alone and with the dataset it joins (all before any moves, as
    ingest will build it); return the new items (texts, image files)."""
    return intake_of(params).check(root, params, new)


def measure_drift(root: Path, params: Any, items: list[Any]) -> dict[str, Any] | None:
    """Drift of the landed items vs the training split, with the encoder fine-tuning starts from;
    None (said in the log) when it is off or there is no trained encoder or training split yet."""
    cfg = params.retrain.drift
    if not cfg.enabled:
        return None
    result = intake_of(params).drift(root, params, items)
    if result is None:
        return None
    result["min_auc"] = cfg.min_auc
    result["triggered"] = cfg.min_auc is None or result["auc"] >= cfg.min_auc
    log.info(
        "drift of %d new vs %d training items: AUC %.3f, centroid distance %.4f%s",
        result["new_rows"],
        result["reference_rows"],
        result["auc"],
        result["centroid_distance"],
        "" if cfg.min_auc is None else f" (trigger at AUC >= {cfg.min_auc})",
    )
    return result


def take_in(root: Path, params: Any, new: list[Path]) -> list[Path]:
    """Validate every landed item, then move each into the dataset as a DVC-tracked file/folder."""
    kind = intake_of(params)
    kind.check(root, params, new)
    added = []
    for item in new:
        dest = kind.add(root, params, item)
        pipeline.dvc_command(
            root, "add", str(dest.relative_to(root)), on_line=lambda line: log.debug(line.rstrip())
        )
        if item.is_dir():
            shutil.rmtree(item)
        else:
            item.unlink()
        added.append(dest)
        log.info("took in %s as %s", item.name, dest.relative_to(root))
    if params.retrain.push and added:
        pipeline.dvc_command(root, "push", on_line=lambda line: log.debug(line.rstrip()))
    return added


def stale_stages(root: Path) -> list[str]:
    """The project's stages (its own dvc.yaml: not those of another pipeline folder in the same
    DVC repository) that DVC considers out of date (changed code, params or data). A stage whose
    only status is "always changed" (`always_changed: true`, e.g. the image pipeline's register)
    says nothing about new data or code, so it is not counted."""
    out = pipeline.dvc_command(root, "status", "--json", "dvc.yaml", on_line=lambda line: None)
    start = out.find("{")
    status = json.loads(out[start:]) if start != -1 else {}
    return [
        name
        for name, changes in status.items()
        if not name.endswith(".dvc") and changes != ["always changed"]
    ]


def release_demo_shard(root: Path, params: Any, per_class: int) -> Path:
    """Write the next demo shard into the landing folder (for the retrain demo)."""
    return intake_of(params).demo_drop(root, params, per_class)
