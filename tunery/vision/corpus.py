"""The image pretraining snapshot: the one module that names its files and reads SimCLR's pool.

`<corpus.out_dir>/` (the vision `corpus` stage's output, what `pretrain` reads) holds copies of
ingest's `unlabelled.parquet` and prepare's `train.parquet`, `val.parquet` and `labels.json`, moved
by tunery/data/snapshot.py when `corpus.pretrain_policy` says so. The pool SimCLR learns from is
the unlabelled images plus the train split's images (labels unused; never val, test or holdout),
each image once by its bytes; its keys are the images' sha256, so the change the policy measures is
the share of image contents added to or removed from the pool. The tables name image files (the
pixels stay on disk), so a kept snapshot is only usable while its files exist.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from tunery.vision import splits

UNLABELLED = "unlabelled.parquet"
TRAIN, VAL = "train.parquet", "val.parquet"
FILES = (UNLABELLED, TRAIN, VAL, splits.LABELS_FILE)


def sources(raw_dir: Path, data_dir: Path) -> dict[str, Path]:
    """The snapshot's files where ingest (`raw_dir`) and prepare (`data_dir`) write them."""
    return {
        name: (Path(raw_dir) if name == UNLABELLED else Path(data_dir)) / name for name in FILES
    }


def _pool(unlabelled: Path, train: Path) -> pd.DataFrame:
    both = pd.concat(
        [
            pd.read_parquet(unlabelled),
            pd.read_parquet(train).drop(columns=["label", "split"], errors="ignore"),
        ],
        ignore_index=True,
    )
    return both.drop_duplicates("sha256").reset_index(drop=True)


def pool_frame(raw_dir: Path, data_dir: Path) -> pd.DataFrame:
    """The unlabelled pool and the train split's images, each image once (by bytes); `raw_dir`
    and `data_dir` are the snapshot folder for both in the pipeline."""
    return _pool(Path(raw_dir) / UNLABELLED, Path(data_dir) / TRAIN)


def pool_keys(files: Mapping[str, Path]) -> set[str]:
    """The pool's keys (image content hashes) of a set of snapshot files."""
    return set(_pool(files[UNLABELLED], files[TRAIN])["sha256"])


def missing_images(files: Mapping[str, Path], root: Path) -> str | None:
    """Why a snapshot's pool cannot be trained on again (some of its image files are gone, e.g. a
    withdrawn drop), or None."""
    gone = [
        p for p in splits.paths(_pool(files[UNLABELLED], files[TRAIN]), root) if not p.is_file()
    ]
    if not gone:
        return None
    return f"{len(gone)} of the snapshot's images are gone (e.g. {gone[0]})"
