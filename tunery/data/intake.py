"""Adding labelled data: validate a file, then place it in the incoming folder for `ingest`."""

from __future__ import annotations

import shutil
from pathlib import Path

from tunery.config import FilesSource, IngestConfig
from tunery.data import files, validate
from tunery.errors import DataValidationError, TuneryError
from tunery.io import atomic_path, file_md5


def columns(cfg: IngestConfig) -> tuple[str, str]:
    if isinstance(cfg.source, FilesSource):
        return cfg.source.text_column, cfg.source.label_column
    return "text", "label"


def add_file(path: Path, cfg: IngestConfig, *, root: Path) -> Path:
    """Validate `path` with the ingest rules and copy it into `cfg.incoming`; return the copy."""
    [file] = files.list_files(path, files.LABELLED_SUFFIXES) if path.is_file() else [path]
    if not file.is_file():
        raise DataValidationError(path, "missing_file", "expected one CSV, JSONL or Parquet file")
    text_col, label_col = columns(cfg)
    validate.check_rows(
        files.read_labelled(file, text_col, label_col, origin=f"incoming:{file.name}"),
        cfg,
        str(file),
    )
    dest = root / cfg.incoming / file.name
    if dest.exists():
        if file_md5(dest) == file_md5(file):
            raise TuneryError(f"{file}: already added as {dest.relative_to(root)}")
        raise TuneryError(
            f"{dest.relative_to(root)} already exists with other content; rename {file} and add it again"
        )
    with atomic_path(dest) as tmp:
        shutil.copyfile(file, tmp)
    return dest
