"""Adding labelled data: validate a file against the dataset it will join, then place it in the
incoming folder for `ingest`; withdrawing what was taken in (a text file, or an image drop folder:
the image pipeline's adding is `tunery.vision.retrain.add_drop`), recorded in `withdrawn.jsonl`.
`TEXT_INTAKE` is the text pipeline's retrain intake (the `tunery.modality.Intake` that
tunery/runner/landing.py runs)."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunery import metrics_files
from tunery.config import IngestConfig, Params, WordnetSource
from tunery.data import dataset, files
from tunery.errors import DataValidationError, TuneryError
from tunery.io import atomic_path, file_md5

log = logging.getLogger("tunery.retrain")


def check_new(paths: list[Path], cfg: IngestConfig, *, root: Path) -> dict[Path, object]:
    """Every candidate row-checked, then the dataset as ingest will build it with all of them:
    a file that would stop a later ingest is refused now, naming it, and nothing moves."""
    candidates = {p: dataset.read_drop(p, cfg) for p in paths}
    dataset.build(cfg, root, candidates)
    return candidates


def add_file(path: Path, cfg: IngestConfig, *, root: Path, checked: bool = False) -> Path:
    """Validate `path` (unless `checked` already) and copy it into `cfg.incoming`."""
    [file] = files.list_files(path, files.LABELLED_SUFFIXES) if path.is_file() else [path]
    if not file.is_file():
        raise DataValidationError(path, "missing_file", "expected one CSV, JSONL or Parquet file")
    dest = root / cfg.incoming / file.name
    if dest.exists():
        if file_md5(dest) == file_md5(file):
            raise TuneryError(f"{file}: already added as {dest.relative_to(root)}")
        raise TuneryError(
            f"{dest.relative_to(root)} already exists with other content; rename {file} and add it again"
        )
    if not checked:
        check_new([file], cfg, root=root)
    with atomic_path(dest) as tmp:
        shutil.copyfile(file, tmp)
    return dest


WITHDRAWN_LOG = "withdrawn.jsonl"  # beside the incoming folder: never read as a labelled file


def _taken_in(folder: Path, drops: bool) -> list[Path]:
    """What was taken in: labelled files (text) or drop folders (images)."""
    if drops:
        from tunery.data.image_dataset import list_drops

        return list_drops(folder)
    return files.list_files(folder, files.LABELLED_SUFFIXES) if folder.is_dir() else []


def _describe(item: Path, drops: bool) -> tuple[str, int]:
    """(md5, rows) of a taken-in item: a file's md5 (DVC's) and rows; for a drop folder, the md5 of
    its sorted `<path> <md5>` lines and its image files (one row each in ingest's table)."""
    if not drops:
        return file_md5(item), len(files.read_table(item))
    import hashlib

    from tunery.data.images import IMAGE_SUFFIXES

    found = sorted(p for p in item.rglob("*") if p.is_file() and not p.name.startswith("."))
    lines = "".join(f"{p.relative_to(item).as_posix()} {file_md5(p)}\n" for p in found)
    count = sum(p.suffix.lower() in IMAGE_SUFFIXES for p in found)
    return hashlib.md5(lines.encode()).hexdigest(), count


def withdraw(
    name: str, cfg: Any, *, root: Path, reason: str, drops: bool = False
) -> dict[str, object]:
    """Take a file (text) or a drop folder (`drops`: images) that was taken in back out of the
    dataset, and record it.

    It leaves `cfg.incoming` (with its DVC tracking, by the caller: `dvc remove`), so the next
    ingest writes a new data version without it. The record keeps what it was (md5, rows: images
    for a drop) and the data version it was part of, so that version stays explainable.
    """
    import json
    import time

    folder = root / cfg.incoming
    item = folder / Path(name).name
    taken = _taken_in(folder, drops)
    if item not in taken:
        what = "drop" if drops else "file"
        present = [p.name for p in taken]
        raise TuneryError(f"{item}: no such incoming {what} (taken in: {present or 'none'})")
    if not reason.strip():
        raise TuneryError("withdrawing data needs --reason (it is recorded)")
    md5, rows = _describe(item, drops)
    version = (metrics_files.read(root, "ingest") or {}).get("data_version")
    record = {
        "file": item.name,
        "md5": md5,
        "rows": rows,
        "reason": reason,
        "in_data_version": version,
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    log_path = folder.parent / WITHDRAWN_LOG
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    return {**record, "path": item, "dvc_file": item.with_name(item.name + ".dvc")}


@dataclass(frozen=True)
class TextIntake:
    """Labelled text files (CSV/JSONL/Parquet) in the landing folder, checked by the text ingest's
    rules, embedded with the text encoder."""

    name: str = "text"

    def landed(self, root: Path, params: Params) -> list[Path]:
        folder = root / params.retrain.landing
        if not folder.is_dir():
            return []
        return files.list_files(folder, files.LABELLED_SUFFIXES)

    def check(self, root: Path, params: Params, new: list[Path]) -> list[str]:
        checked = check_new(new, params.ingest, root=root)  # all or nothing
        return [t for rows in checked.values() for t in rows["text"].astype(str)]

    def add(self, root: Path, params: Params, item: Path) -> Path:
        return add_file(item, params.ingest, root=root, checked=True)

    def drift(self, root: Path, params: Params, items: list[str]) -> dict[str, Any] | None:
        import pandas as pd

        encoder = root / (params.finetune.encoder or params.pretrain.out_dir)
        train = root / params.prepare.out_dir / "train.parquet"
        if not (encoder / "config.json").is_file() or not train.is_file():
            log.info("drift not measured: no encoder (%s) or training split yet", encoder)
            return None
        from tunery.evaluation import drift

        reference = pd.read_parquet(train)["text"].astype(str).tolist()
        cfg = params.retrain.drift
        return drift.measure(
            encoder, items, reference, reference_rows=cfg.reference_rows, seed=params.finetune.seed
        )

    def demo_drop(self, root: Path, params: Params, per_class: int) -> Path:
        return wordnet_shard(root, params, per_class)


def wordnet_shard(root: Path, params: Params, per_class: int) -> Path:
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


TEXT_INTAKE = TextIntake()
