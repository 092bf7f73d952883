"""Row rules for labelled data. Each failure names the file, the rows and the rule.

Per-file rules (row numbers refer to that file): empty text, null label, label outside the declared
set, text over the size limit. Dataset rules: duplicates (dropped and counted, or rejected) and too
few examples of a class.
"""

from __future__ import annotations

import pandas as pd

from tunery.config import IngestConfig
from tunery.data.text import normalize
from tunery.errors import DataValidationError


def _rows(df: pd.DataFrame, mask: pd.Series) -> list[int]:
    return df.loc[mask, "row"].astype(int).tolist()


def check_rows(df: pd.DataFrame, cfg: IngestConfig, file: str) -> pd.DataFrame:
    """Validate one file's records; return them with `text` and `label` as clean strings."""
    null_label = df["label"].isna() | df["label"].astype(str).str.strip().eq("")
    if null_label.any():
        raise DataValidationError(file, "null_label", "label is missing", _rows(df, null_label))
    not_text = df["text"].notna() & ~df["text"].map(lambda v: isinstance(v, str))
    if not_text.any():
        raise DataValidationError(
            file,
            "text_not_string",
            "text must be a string (found numbers or lists)",
            _rows(df, not_text),
        )
    text = df["text"].where(df["text"].notna(), "").astype(str)
    empty = text.str.strip().eq("")
    if empty.any():
        raise DataValidationError(file, "empty_text", "text is empty", _rows(df, empty))
    too_long = text.str.len() > cfg.max_text_chars
    if too_long.any():
        raise DataValidationError(
            file,
            "record_too_large",
            f"text longer than ingest.max_text_chars={cfg.max_text_chars} characters",
            _rows(df, too_long),
        )
    labels = df["label"].astype(str).str.strip()
    if cfg.labels is not None:
        unknown = ~labels.isin(cfg.labels)
        if unknown.any():
            seen = sorted(set(labels[unknown]))[:5]
            raise DataValidationError(
                file,
                "unknown_label",
                f"label(s) {seen} not in the declared set ingest.labels",
                _rows(df, unknown),
            )
    out = df.copy()
    out["text"] = text.str.strip()
    out["label"] = labels
    return out


def deduplicate(df: pd.DataFrame, cfg: IngestConfig) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop (or reject) duplicate texts; a text seen with two different labels is a conflict.

    Duplicates are judged on the normalised text (case and whitespace ignored). The first
    occurrence is kept, so data appended later can never replace an existing example.
    """
    key = df["text"].map(normalize)
    labels_per_key = df.groupby(key)["label"].nunique()
    conflict = key.map(labels_per_key).gt(1)
    duplicate = key.duplicated(keep="first") & ~conflict
    if cfg.duplicates == "reject" and (duplicate.any() or conflict.any()):
        bad = df[duplicate | conflict]
        first = bad.iloc[0]
        raise DataValidationError(
            first["origin"],
            "duplicate",
            f"{int(duplicate.sum())} duplicate and {int(conflict.sum())} conflicting-label record(s) "
            f"(ingest.duplicates=reject); first: row {first['row']} {first['text'][:60]!r}",
        )
    kept = df[~(duplicate | conflict)].reset_index(drop=True)
    return kept, {
        "duplicates_dropped": int(duplicate.sum()),
        "conflicts_dropped": int(conflict.sum()),
    }


def check_classes(df: pd.DataFrame, cfg: IngestConfig, source: str) -> None:
    counts = df["label"].value_counts()
    small = counts[counts < cfg.min_per_class]
    if small.any():
        detail = ", ".join(f"{label!r}: {n}" for label, n in small.items())
        raise DataValidationError(
            source,
            "too_few_examples",
            f"class(es) with fewer than ingest.min_per_class={cfg.min_per_class} examples: {detail}",
        )
    if counts.size < 2:
        raise DataValidationError(
            source, "too_few_classes", f"need at least 2 classes, found {counts.size}"
        )
