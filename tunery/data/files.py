"""User data: CSV, JSONL or Parquet files (or a folder of them), and plain-text unlabelled files.

Reading checks what can only be checked per file: it exists and is readable, is UTF-8, is not
empty, parses, and has the configured columns. Row rules live in `tunery.data.validate`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd

from tunery.errors import DataValidationError

LABELLED_SUFFIXES = (".csv", ".jsonl", ".parquet")
TEXT_SUFFIXES = (".txt",)


def list_files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The data files at `path`: the file itself, or the matching files of a folder (sorted)."""
    if not path.exists():
        raise DataValidationError(path, "missing_file", "no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
        return files
    if path.suffix.lower() not in suffixes:
        raise DataValidationError(
            path, "file_type", f"unsupported file type; expected one of {', '.join(suffixes)}"
        )
    return [path]


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataValidationError(path, "unreadable_file", f"cannot read: {exc.strerror}") from None
    if not raw.strip():
        raise DataValidationError(path, "empty_file", "the file is empty")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataValidationError(
            path,
            "bad_encoding",
            f"not valid UTF-8 (byte {exc.start}, line {line}); re-save the file as UTF-8",
        ) from None


def _read_jsonl(path: Path, text: str) -> pd.DataFrame:
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataValidationError(path, "bad_json", f"line {lineno}: {exc.msg}") from None
        if not isinstance(obj, dict):
            raise DataValidationError(
                path, "bad_json", f"line {lineno}: each line must be a JSON object"
            )
        records.append(obj)
    return pd.DataFrame.from_records(records)


def read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            df = pd.read_parquet(path)
        except OSError as exc:
            raise DataValidationError(path, "unreadable_file", f"cannot read: {exc}") from None
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise DataValidationError(
                path, "bad_parquet", f"not a readable Parquet file: {exc}"
            ) from None
    else:
        text = _read_text(path)
        if suffix == ".jsonl":
            df = _read_jsonl(path, text)
        else:
            try:
                # Everything as strings: a label column of numbers stays "1", not 1.0.
                df = pd.read_csv(
                    io.StringIO(text), dtype=str, keep_default_na=False, na_values=[""]
                )
            except pd.errors.ParserError as exc:
                raise DataValidationError(path, "bad_csv", f"cannot parse CSV: {exc}") from None
    if df.empty:
        raise DataValidationError(path, "empty_file", "the file has no records")
    return df


def read_labelled(path: Path, text_column: str, label_column: str, origin: str) -> pd.DataFrame:
    """One labelled file as (text, label, origin, row); `row` is 1-based, header excluded."""
    df = read_table(path)
    missing = [c for c in (text_column, label_column) if c not in df.columns]
    if missing:
        raise DataValidationError(
            path,
            "missing_column",
            f"missing column(s) {missing}; found {list(df.columns)} "
            "(set ingest.source.text_column / label_column)",
        )
    out = pd.DataFrame({"text": df[text_column], "label": df[label_column]})
    out["origin"] = origin
    out["row"] = range(1, len(out) + 1)
    out.attrs["file"] = str(path)
    return out


def read_unlabelled(path: Path) -> list[str]:
    texts: list[str] = []
    for file in list_files(path, TEXT_SUFFIXES):
        texts += [line.strip() for line in _read_text(file).splitlines() if line.strip()]
    return texts
