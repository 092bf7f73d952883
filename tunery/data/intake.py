"""Adding labelled data: validate a file against the dataset it will join, then place it in the
incoming folder for `ingest`."""

from __future__ import annotations

import shutil
from pathlib import Path

from tunery import metrics_files
from tunery.config import IngestConfig
from tunery.data import dataset, files
from tunery.errors import DataValidationError, TuneryError
from tunery.io import atomic_path, file_md5


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


def withdraw(name: str, cfg: IngestConfig, *, root: Path, reason: str) -> dict[str, object]:
    """Take a file that was taken in back out of the dataset, and record it.

    The file leaves `cfg.incoming` (with its DVC tracking, by the caller: `dvc remove`), so the
    next ingest writes a new data version without it. The record keeps what it was (md5, rows)
    and the data version it was part of, so that version stays explainable.
    """
    import json
    import time

    folder = root / cfg.incoming
    file = folder / Path(name).name
    if not file.is_file():
        present = sorted(p.name for p in files.list_files(folder, files.LABELLED_SUFFIXES))
        raise TuneryError(f"{file}: no such incoming file (taken in: {present or 'none'})")
    if not reason.strip():
        raise TuneryError("withdrawing a file needs --reason (it is recorded)")
    version = (metrics_files.read(root, "ingest") or {}).get("data_version")
    record = {
        "file": file.name,
        "md5": file_md5(file),
        "rows": len(files.read_table(file)),
        "reason": reason,
        "in_data_version": version,
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    log_path = folder.parent / WITHDRAWN_LOG
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    return {**record, "path": file, "dvc_file": file.with_name(file.name + ".dvc")}
