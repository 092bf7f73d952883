"""Re-fine-tuning on new data: find it, take it in as a new data version, and say what is stale.

No Prefect here: `flows/retrain.py` turns these steps into a flow. New labelled files land in
`retrain.landing`; each is validated with the ingest rules (all of them before any is moved), copied
into `ingest.incoming`, versioned with `dvc add` and pushed to the default remote.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunery.config import Params, WordnetSource
from tunery.data import files, intake
from tunery.errors import TuneryError
from tunery.io import atomic_path
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


def landing_files(root: Path, params: Params) -> list[Path]:
    folder = root / params.retrain.landing
    if not folder.is_dir():
        return []
    return files.list_files(folder, files.LABELLED_SUFFIXES)


def check_landed(root: Path, params: Params, new: list[Path]) -> list[str]:
    """Validate every landed file, alone and with the dataset it joins (all before any moves, as
    ingest will build it); return their texts."""
    checked = intake.check_new(new, params.ingest, root=root)  # all or nothing
    return [t for rows in checked.values() for t in rows["text"].astype(str)]


def measure_drift(root: Path, params: Params, texts: list[str]) -> dict[str, Any] | None:
    """Drift of the landed texts vs the training split, with the encoder fine-tuning starts from;
    None (said in the log) when it is off or there is no trained encoder or training split yet."""
    import pandas as pd

    cfg = params.retrain.drift
    encoder = root / (params.finetune.encoder or params.pretrain.out_dir)
    train = root / params.prepare.out_dir / "train.parquet"
    if not cfg.enabled:
        return None
    if not (encoder / "config.json").is_file() or not train.is_file():
        log.info("drift not measured: no encoder (%s) or training split yet", encoder)
        return None
    from tunery.evaluation import drift

    reference = pd.read_parquet(train)["text"].astype(str).tolist()
    result = drift.measure(
        encoder, texts, reference, reference_rows=cfg.reference_rows, seed=params.finetune.seed
    )
    result["min_auc"] = cfg.min_auc
    result["triggered"] = cfg.min_auc is None or result["auc"] >= cfg.min_auc
    log.info(
        "drift of %d new texts vs %d training texts: AUC %.3f, centroid distance %.4f%s",
        result["new_rows"],
        result["reference_rows"],
        result["auc"],
        result["centroid_distance"],
        "" if cfg.min_auc is None else f" (trigger at AUC >= {cfg.min_auc})",
    )
    return result


def take_in(root: Path, params: Params, new: list[Path]) -> list[Path]:
    """Validate every landed file, then move each into the dataset as a DVC-tracked file."""
    check_landed(root, params, new)
    added = []
    for file in new:
        dest = intake.add_file(file, params.ingest, root=root, checked=True)
        pipeline.dvc_command(
            root, "add", str(dest.relative_to(root)), on_line=lambda line: log.debug(line.rstrip())
        )
        file.unlink()
        added.append(dest)
        log.info("took in %s as %s", file.name, dest.relative_to(root))
    if params.retrain.push and added:
        pipeline.dvc_command(root, "push", on_line=lambda line: log.debug(line.rstrip()))
    return added


def stale_stages(root: Path) -> list[str]:
    """Stages DVC considers out of date (changed code, params or data)."""
    out = pipeline.dvc_command(root, "status", "--json", on_line=lambda line: None)
    start = out.find("{")
    status = json.loads(out[start:]) if start != -1 else {}
    return [name for name in status if not name.endswith(".dvc")]


def release_demo_shard(root: Path, params: Params, per_class: int) -> Path:
    """Write the next WordNet demo shard into the landing folder (for the re-fine-tune demo)."""
    from tunery.data import wordnet

    source = params.ingest.source
    if not isinstance(source, WordnetSource):
        raise TuneryError(
            "demo shards come from the WordNet demo source; ingest.source.kind is not wordnet"
        )
    taken = [
        p
        for folder in (root / params.ingest.incoming, root / params.retrain.landing)
        if folder.is_dir()
        for p in folder.glob("wordnet-shard-*.csv")
    ]
    index = len({p.name for p in taken})
    df = wordnet.shard(source, index, per_class)
    if df.empty:
        raise TuneryError(f"WordNet has no glosses left for shard {index}; lower --per-class")
    dest = root / params.retrain.landing / f"wordnet-shard-{index:03d}.csv"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        df.to_csv(tmp, index=False)
    return dest
