"""Labelled splits as the models read them: texts and label indices against a sorted label list.

The prepare stage writes `<prepare.out_dir>/{train,val,test,holdout}.parquet` and `labels.json`;
this module is their one reader (fine-tuning, the arms, evaluation and the benchmarks use it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tunery.errors import DataValidationError

SPLIT_FILES = ("train", "val", "test", "holdout")
LABELS_FILE = "labels.json"


@dataclass(frozen=True)
class Split:
    name: str
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


def read_labels(path: Path) -> list[str]:
    try:
        labels = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataValidationError(path, "missing_file", "label list not found") from None
    if not isinstance(labels, list) or len(labels) < 2 or labels != sorted(set(labels)):
        raise DataValidationError(
            path, "bad_labels", "expected a sorted list of >= 2 unique labels"
        )
    return [str(x) for x in labels]


def load_split(path: Path, labels: Sequence[str], *, allow_empty: bool = False) -> Split:
    """Read a prepared split; every label must be one the model knows (index in `labels`)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataValidationError(path, "missing_file", "split not found; run the prepare stage")
    df = pd.read_parquet(path)
    missing = {"text", "label"} - set(df.columns)
    if missing:
        raise DataValidationError(path, "missing_column", f"columns {sorted(missing)} are missing")
    if df.empty and not allow_empty:
        raise DataValidationError(
            path, "empty_split", f"the {path.stem} split is empty; add data or change the fractions"
        )
    index = {label: i for i, label in enumerate(labels)}
    unknown_mask = ~df["label"].astype(str).isin(index)
    if unknown_mask.any():
        unknown = sorted(df.loc[unknown_mask, "label"].astype(str).unique())
        rows = [int(i) + 1 for i in df.index[unknown_mask]]
        raise DataValidationError(
            path,
            "unknown_label",
            f"labels {unknown} are not among the model's {len(labels)} labels {list(labels)}",
            rows=rows,
        )
    return Split(
        name=path.stem,
        texts=df["text"].astype(str).tolist(),
        labels=[index[str(x)] for x in df["label"]],
    )


def data_labels(data_dir: Path) -> list[str]:
    """The label set of a prepared data folder."""
    return read_labels(Path(data_dir) / LABELS_FILE)


def load_splits(data_dir: Path, labels: Sequence[str], names: Sequence[str]) -> list[Split]:
    return [load_split(Path(data_dir) / f"{name}.parquet", labels) for name in names]
