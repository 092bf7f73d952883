"""The image pipeline's raw dataset: the configured source plus the drops taken in, as two tables.

The image counterpart of `tunery.data.dataset`: `build` reads the source named in the vision
`ingest.source` (Fashion-MNIST from Debian's package, a folder per class, or a manifest) and every
drop in `ingest.incoming`, checks every image (`tunery.data.images`: named rules), drops
byte-identical copies, and returns

  labelled    image, root, label, origin, sha256, row, width, height, mode (one row per image)
  unlabelled  image, root, origin, sha256, ... : the pretraining pool, without any image that is
              also labelled (by bytes), de-duplicated

The demo's Fashion-MNIST images are written as PNGs under `<images_dir>/labelled` (with a
manifest) and `<images_dir>/unlabelled` first (`tunery.data.fashion_mnist.materialise`), then
read back through the manifest and folder sources like a user's files.

A drop (this module names, reads and checks its format) is a folder in `ingest.incoming` (or, before
it is taken in, in `retrain.landing`), in one of the source kinds the ingest reads: a folder per
class (`<drop>/<label>/*.png`) or a manifest (one CSV/JSONL/Parquet file at the drop's top, with
`image` and `label` columns, paths relative to the drop) beside its images. Its rows have the
origin `incoming:<drop name>`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tunery.data import fashion_mnist as fm
from tunery.data import files, images
from tunery.errors import DataValidationError
from tunery.io import atomic_dir

LABELLED_DIR, UNLABELLED_DIR = "labelled", "unlabelled"


@dataclass
class ImageDataset:
    labelled: pd.DataFrame
    unlabelled: pd.DataFrame
    stats: dict[str, Any] = field(default_factory=dict)


def _rooted(df: pd.DataFrame, final_root: Path) -> pd.DataFrame:
    """The frame with `root` set to where its images will live (read from a temporary folder)."""
    out = df.copy()
    out["root"] = str(final_root)
    return out


@contextlib.contextmanager
def fashion_mnist_images(source: Any, images_dir: Path) -> Iterator[tuple[Path, Path]]:
    """Write the demo's labelled subset (manifest) and unlabelled pool (PNGs) into a temporary
    folder that replaces `images_dir` when the block succeeds; yields (manifest, pool folder)."""
    train_x, train_y = fm.load("train", Path(source.path))
    chosen = fm.labelled_subset(train_y, source.per_class)
    pool = fm.unlabelled_pool(len(train_x), chosen, limit=source.unlabelled_max)
    with atomic_dir(images_dir) as tmp:
        manifest = fm.materialise(tmp / LABELLED_DIR, train_x, chosen, train_y)
        folder = fm.materialise(tmp / UNLABELLED_DIR, train_x, pool)
        yield manifest, folder


def _read_labelled(source: Any, checks: images.ImageChecks, root: Path) -> pd.DataFrame:
    path = root / source.path
    if source.kind == "folder":
        return images.read_folder(path, checks)
    return images.read_manifest(path, checks, source.image_column, source.label_column)


def list_drops(folder: Path) -> list[Path]:
    """The drops in `folder` (its non-hidden sub-folders, sorted); none when it does not exist."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_drop(drop: Path, checks: images.ImageChecks) -> pd.DataFrame:
    """One drop, every image checked (the ingest's rules), with its `incoming:<name>` origin."""
    drop = Path(drop)
    origin = f"incoming:{drop.name}"
    manifests = files.list_files(drop, images.MANIFEST_SUFFIXES) if drop.is_dir() else []
    if len(manifests) > 1:
        raise DataValidationError(
            drop,
            "file_type",
            f"a drop holds at most one manifest, found {[m.name for m in manifests]}",
        )
    if manifests:
        return images.read_manifest(manifests[0], checks, origin=origin)
    return images.read_folder(drop, checks, origin=origin)


def _project_relative(df: pd.DataFrame, root: Path) -> pd.DataFrame:
    """`df` with its `root` column as the project names it (relative to `root` when inside it)."""
    df = df.copy()
    df["root"] = [
        str(Path(r).relative_to(root)) if Path(r).is_relative_to(root) else r for r in df["root"]
    ]
    return df


def _source_tables(cfg: Any, root: Path, images_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The configured source's labelled table and unlabelled pool."""
    source, checks = cfg.source, cfg.checks
    if source.kind == "fashion_mnist":
        rel = images_dir.relative_to(root) if images_dir.is_relative_to(root) else images_dir
        with fashion_mnist_images(source, images_dir) as (manifest, folder):
            labelled = _rooted(images.read_manifest(manifest, checks), rel / LABELLED_DIR)
            pool = _rooted(images.read_unlabelled(folder, checks), rel / UNLABELLED_DIR)
        origin = f"source:fashion-mnist-{source.per_class}-per-class"
        labelled["origin"] = origin
        pool["origin"] = origin
        return labelled, pool
    images_dir.mkdir(parents=True, exist_ok=True)  # the DVC output exists for every source
    labelled = _read_labelled(source, checks, root)
    pool = (
        images.read_unlabelled(root / source.unlabelled_path, checks)
        if source.unlabelled_path
        else labelled.iloc[0:0].drop(columns=["label"])
    )
    return _project_relative(labelled, root), _project_relative(pool, root)


def _check_candidates(
    candidates: dict[Path, pd.DataFrame], known: set[str], checks: images.ImageChecks
) -> None:
    """A drop may not bring a class the data does not have (unless the classes are declared)."""
    for drop, df in candidates.items():
        new = sorted(set(df["label"]) - known)
        if new and checks.labels is None:
            raise DataValidationError(
                drop,
                "unknown_label",
                f"label(s) {new[:5]} are not in the data yet (known: {sorted(known)[:12]}); fix "
                "the label, or declare the classes in ingest.checks.labels to add one",
                df.loc[df["label"].isin(new), "row"].astype(int).tolist(),
            )


def build(
    cfg: Any,
    root: Path,
    images_dir: Path,
    candidates: dict[Path, pd.DataFrame] | None = None,
) -> ImageDataset:
    """The labelled and unlabelled tables of `cfg` (a `VisionIngestConfig`): the source, then the
    drops in `cfg.incoming`, then `candidates` (drops read with `read_drop`, not yet taken in: the
    dataset as it will be after them). Paths in the tables are as the project sees them (relative
    to `root` when the config's are). A candidate none of whose images is new is refused."""
    checks, candidates = cfg.checks, candidates or {}
    labelled, pool = _source_tables(cfg, root, images_dir)
    incoming = [
        _project_relative(read_drop(d, checks), root) for d in list_drops(root / cfg.incoming)
    ]
    _check_candidates(candidates, set(pd.concat([labelled, *incoming])["label"]), checks)
    frames = [labelled, *incoming, *(_project_relative(df, root) for df in candidates.values())]
    data, stats = images.combine(frames, checks, cfg.source.path)
    for drop, df in candidates.items():
        if not (data["origin"] == df["origin"].iloc[0]).any():
            raise DataValidationError(
                drop,
                "nothing_new",
                f"none of its {len(df)} images is new: all are byte-identical to images the "
                "data already has",
            )
    stats["incoming_drops"] = len(incoming)
    known = set(data["sha256"])
    unlabelled = pool[~pool["sha256"].isin(known)].drop_duplicates("sha256").reset_index(drop=True)
    stats["unlabelled_dropped"] = len(pool) - len(unlabelled)
    return ImageDataset(data, unlabelled, stats)
