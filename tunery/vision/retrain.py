"""The image pipeline's retrain intake (the `tunery.modality.Intake` of `modality: image`).

A drop is a folder in `retrain.landing`: a folder per class or a manifest beside its images, the
source kinds the image ingest reads (tunery/data/image_dataset.py owns the format). Every image of
every drop is checked with the ingest's rules, and the dataset as the next ingest will build it
(source, drops taken in before, these drops) with the dataset rules, before anything moves; then
tunery/runner/landing.py copies each drop into `ingest.incoming`, `dvc add`s it and pushes.

Drift is the text pipeline's two-sample statistic (`tunery.evaluation.drift.score`: a domain
classifier's out-of-fold AUC, and the centroid distance) on the SimCLR encoder's pooled image
embeddings of the new images vs a sample of the training split's.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunery.data import image_dataset
from tunery.errors import DataValidationError, TuneryError
from tunery.io import atomic_dir

log = logging.getLogger("tunery.retrain")

SHARD_PREFIX = "fashion-mnist-shard-"


def _check_folders(root: Path, params: Any, new: list[Path]) -> None:
    """Each landed item is a drop folder not taken in before."""
    incoming = root / params.ingest.incoming
    for item in new:
        if not item.is_dir():
            raise DataValidationError(
                item,
                "file_type",
                "a drop is a folder (a folder per class, or a manifest beside its images); "
                "move the file into one",
            )
        if (incoming / item.name).exists():
            raise TuneryError(
                f"{item}: a drop named {item.name!r} was already taken in "
                f"({(incoming / item.name).relative_to(root)}); rename the folder"
            )


def check_drops(root: Path, params: Any, new: list[Path]) -> dict[Path, Any]:
    """Every drop's images checked, then the dataset the next ingest builds with them; the drops'
    tables. The source is rebuilt in a temporary folder (the demo's PNGs are rewritten there),
    so nothing of the project changes when a drop is refused."""
    _check_folders(root, params, new)
    cfg = params.ingest
    candidates = {drop: image_dataset.read_drop(drop, cfg.checks) for drop in new}
    with tempfile.TemporaryDirectory(prefix="tunery-intake-") as tmp:
        image_dataset.build(cfg, root, Path(tmp) / "images", candidates)
    return candidates


def add_drop(root: Path, params: Any, path: Path) -> Path:
    """`tunery data add` in the image pipeline: one drop folder (a folder per class, or a manifest
    beside its images) checked as a retrain checks it, then copied into `ingest.incoming`; the
    source folder stays, but one in `retrain.landing` leaves it, as a retrain's (the next retrain
    would find it taken in). A lone manifest file is refused: its images are not inside it."""
    path = Path(path)
    if path.is_file():
        raise DataValidationError(
            path,
            "file_type",
            "an image drop is a folder: a folder per class (<drop>/<label>/*.png) or one manifest "
            "(CSV/JSONL/Parquet, `image` and `label` columns, paths relative to it) beside its "
            f"images; add the folder that holds them (`tunery data add {path.parent}` when it is "
            "that drop), or put the manifest and its images into a folder of their own",
        )
    if not path.is_dir():
        raise DataValidationError(path, "missing_file", "no such folder")
    check_drops(root, params, [path])
    dest = IMAGE_INTAKE.add(root, params, path)
    if path.resolve().parent == (root / params.retrain.landing).resolve():
        shutil.rmtree(path)
    return dest


def _embed(params: Any, paths: list[Path], model: Any) -> Any:
    """Pooled pretrained-encoder embeddings of image files, preprocessed as in training (pooled
    as the encoder folder says: what the probe and the fine-tune's LP-FT head read)."""
    from tunery.vision.probe import embed
    from tunery.vision.processor import process_paths

    pixels = process_paths(paths, params.processor)
    return embed(model, pixels, pooling=model.config.simclr_pooling)


def measure_drift(root: Path, params: Any, new_images: list[Path]) -> dict[str, Any] | None:
    """`drift.score` of the new images vs up to `retrain.drift.reference_rows` training images,
    embedded by the pretrained encoder; None when there is no encoder or training split yet."""
    from tunery.evaluation import drift
    from tunery.vision import encoder_dir, splits

    folder = root / params.pretrain.out_dir
    train = root / params.prepare.out_dir / "train.parquet"
    try:
        model_dir = encoder_dir.model_dir(folder)
    except TuneryError:
        model_dir = None
    if model_dir is None or not train.is_file():
        log.info("drift not measured: no pretrained encoder (%s) or training split yet", folder)
        return None
    from tunery.vision.simclr import ViTForSimCLR

    seed = params.finetune.seed
    reference = splits.paths(splits.read(root / params.prepare.out_dir, "train"), root)
    reference = drift.sample_reference(reference, params.retrain.drift.reference_rows, seed)
    model = ViTForSimCLR.from_pretrained(model_dir, attn_implementation="eager")
    new_x = _embed(params, list(new_images), model)
    ref_x = _embed(params, reference, model)
    return {**drift.score(new_x, ref_x, seed=seed), "encoder": str(model_dir)}


def demo_drop(root: Path, params: Any, per_class: int) -> Path:
    """The next Fashion-MNIST demo drop (a manifest and its PNGs) in the landing folder: training
    images neither in the labelled subset nor in the unlabelled pool the ingest uses, in disjoint
    per-class windows of a fixed ranking (drop k holds window k)."""
    import numpy as np

    from tunery.data import fashion_mnist as fm

    source = params.ingest.source
    if source.kind != "fashion_mnist":
        raise TuneryError(
            "demo drops come from the Fashion-MNIST demo source; ingest.source.kind is "
            f"{source.kind!r}"
        )
    taken = {
        p.name
        for key in (params.ingest.incoming, params.retrain.landing)
        for p in image_dataset.list_drops(root / key)
        if p.name.startswith(SHARD_PREFIX)
    }
    index = len(taken)
    images, labels = fm.load("train", Path(source.path))
    chosen = fm.labelled_subset(labels, source.per_class)
    pool = fm.unlabelled_pool(len(images), chosen, limit=source.unlabelled_max)
    free = labels.astype(np.int64)
    free[np.r_[chosen, pool]] = -1  # used by the ingest: never in a drop
    shard = fm.labelled_subset(free, per_class, offset=index * per_class)
    if len(shard) < per_class * len(fm.CLASSES):
        raise TuneryError(
            f"Fashion-MNIST has too few unused images left for drop {index} "
            f"({len(shard)} of {per_class * len(fm.CLASSES)}); lower --per-class"
        )
    dest = root / params.retrain.landing / f"{SHARD_PREFIX}{index:03d}"
    fm.materialise(dest, images, shard, labels)
    return dest


@dataclass(frozen=True)
class ImageIntake:
    name: str = "image"

    def landed(self, root: Path, params: Any) -> list[Path]:
        folder = root / params.retrain.landing
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))

    def check(self, root: Path, params: Any, new: list[Path]) -> list[Path]:
        tables = check_drops(root, params, new)
        return [
            Path(r) / i
            for df in tables.values()
            for r, i in zip(df["root"], df["image"], strict=True)
        ]

    def add(self, root: Path, params: Any, item: Path) -> Path:
        dest = root / params.ingest.incoming / item.name
        with atomic_dir(dest) as tmp:
            shutil.copytree(item, tmp, dirs_exist_ok=True)
        return dest

    def drift(self, root: Path, params: Any, items: list[Path]) -> dict[str, Any] | None:
        return measure_drift(root, params, items)

    def demo_drop(self, root: Path, params: Any, per_class: int) -> Path:
        return demo_drop(root, params, per_class)


IMAGE_INTAKE = ImageIntake()
