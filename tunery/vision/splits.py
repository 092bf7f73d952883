"""The image pipeline's prepared splits: the one module that names, writes and reads them.

`<prepare.out_dir>/` holds `train|val|test|holdout.parquet` (the ingest table's columns plus
`split`; pixels stay in the image files) and `labels.json` (the class names in label-id order,
sorted). A stage turns a split into model inputs with `pixels` (through the processor, the
contract the ONNX graph is exported with) and `label_ids`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tunery.errors import TuneryError
from tunery.io import atomic_path

SPLITS = ("train", "val", "test", "holdout")
LABELS_FILE = "labels.json"


def write(out_dir: Path, frames: dict[str, pd.DataFrame], labels: Sequence[str]) -> None:
    """Each split's table and the label list, file by file (DVC keeps a .gitignore there)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        with atomic_path(out_dir / f"{name}.parquet") as tmp:
            frames[name].reset_index(drop=True).to_parquet(tmp, index=False)
    with atomic_path(out_dir / LABELS_FILE) as tmp:
        tmp.write_text(json.dumps(list(labels), indent=2) + "\n")


def read(data_dir: Path, name: str) -> pd.DataFrame:
    path = Path(data_dir) / f"{name}.parquet"
    if not path.is_file():
        raise TuneryError(f"{path}: no such split (did the prepare stage run?)")
    return pd.read_parquet(path)


def labels(data_dir: Path) -> list[str]:
    path = Path(data_dir) / LABELS_FILE
    try:
        return list(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise TuneryError(f"{path}: unreadable label list ({exc})") from None


def paths(df: pd.DataFrame, root: Path) -> list[Path]:
    """Every image's file, `root` joined with the table's (project-relative) root and path."""
    return [Path(root) / r / i for r, i in zip(df["root"], df["image"], strict=True)]


def pixels(df: pd.DataFrame, root: Path, processor: Any) -> Any:
    """`pixel_values` of the split's images (float32 `[N, C, size, size]`)."""
    from tunery.vision.processor import process_paths

    return process_paths(paths(df, root), processor)


def label_ids(df: pd.DataFrame, names: Sequence[str], source: Path | str = "split") -> np.ndarray:
    """Label ids of the split's rows in `names`' order; an unknown label is an error."""
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(df["label"]) - set(index))
    if unknown:
        raise TuneryError(f"{source}: labels {unknown[:5]} not in {LABELS_FILE}")
    return df["label"].map(index).to_numpy(dtype=np.int64, copy=True)


def load(data_dir: Path, name: str, root: Path, processor: Any, names: Sequence[str]) -> tuple:
    """(frame, pixel_values, label ids) of one split."""
    df = read(data_dir, name)
    return df, pixels(df, root, processor), label_ids(df, names, Path(data_dir) / f"{name}.parquet")
