"""The image pipeline's raw dataset: the configured source (plus nothing else yet) as two tables.

The image counterpart of `tunery.data.dataset`: `build` reads the source named in the vision
`ingest.source` (Fashion-MNIST from Debian's package, a folder per class, or a manifest), checks
every image (`tunery.data.images`: named rules), drops byte-identical copies, and returns

  labelled    image, root, label, origin, sha256, row, width, height, mode (one row per image)
  unlabelled  image, root, origin, sha256, ... : the pretraining pool, without any image that is
              also labelled (by bytes), de-duplicated

The demo's Fashion-MNIST images are written as PNGs under `<images_dir>/labelled` (with a
manifest) and `<images_dir>/unlabelled` first (`tunery.data.fashion_mnist.materialise`), then
read back through the manifest and folder sources like a user's files.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tunery.data import fashion_mnist as fm
from tunery.data import images
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


def build(cfg: Any, root: Path, images_dir: Path) -> ImageDataset:
    """The labelled and unlabelled tables of `cfg` (a `VisionIngestConfig`); paths in the tables
    are as the project sees them (relative to `root` when the config's are)."""
    source, checks = cfg.source, cfg.checks
    if source.kind == "fashion_mnist":
        rel = images_dir.relative_to(root) if images_dir.is_relative_to(root) else images_dir
        with fashion_mnist_images(source, images_dir) as (manifest, folder):
            labelled = _rooted(images.read_manifest(manifest, checks), rel / LABELLED_DIR)
            pool = _rooted(images.read_unlabelled(folder, checks), rel / UNLABELLED_DIR)
        origin = f"source:fashion-mnist-{source.per_class}-per-class"
        labelled["origin"] = origin
        pool["origin"] = origin
    else:
        images_dir.mkdir(parents=True, exist_ok=True)  # the DVC output exists for every source
        labelled = _read_labelled(source, checks, root)
        pool = (
            images.read_unlabelled(root / source.unlabelled_path, checks)
            if source.unlabelled_path
            else labelled.iloc[0:0].drop(columns=["label"])
        )
        for df in (labelled, pool):  # as the project names them, not as resolved here
            df["root"] = [
                str(Path(r).relative_to(root)) if Path(r).is_relative_to(root) else r
                for r in df["root"]
            ]
    data, stats = images.combine([labelled], checks, source.path)
    known = set(data["sha256"])
    unlabelled = pool[~pool["sha256"].isin(known)].drop_duplicates("sha256").reset_index(drop=True)
    stats["unlabelled_dropped"] = len(pool) - len(unlabelled)
    return ImageDataset(data, unlabelled, stats)
