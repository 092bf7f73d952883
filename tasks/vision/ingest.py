"""ingest (images): the configured image source as the raw dataset.

Inputs:  `ingest.source`: Fashion-MNIST from Debian's `dataset-fashion-mnist` (the demo: a
         class-balanced labelled subset of its training split, the other training images as the
         unlabelled pool), a folder per class, or a CSV/JSONL/Parquet manifest (plus an optional
         folder of unlabelled images).
Outputs: `<out_dir>/labelled.parquet` (image, root, label, origin, sha256, ...),
         `<out_dir>/unlabelled.parquet` (the pretraining pool), `<out_dir>/images/` (the demo's
         PNGs; empty for your own data, which stays where it is); `metrics/ingest.json`. The data
         version is the md5 of `labelled.parquet` (what DVC records).

Every image is decoded and checked (tunery/data/images.py's named rules); one bad image stops the
stage with the file and the rule, and nothing is written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tunery.data import image_dataset
from tunery.io import atomic_path, file_md5
from tunery.vision.params import VisionIngestConfig, VisionParams

log = logging.getLogger("tunery.ingest")

LABELLED = "labelled.parquet"
UNLABELLED = "unlabelled.parquet"
IMAGES = "images"


def run(cfg: VisionIngestConfig, *, root: Path, out_dir: Path) -> dict[str, Any]:
    built = image_dataset.build(cfg, root, out_dir / IMAGES)
    data, pool = built.labelled, built.unlabelled
    with atomic_path(out_dir / LABELLED) as tmp:
        data.to_parquet(tmp, index=False)
    with atomic_path(out_dir / UNLABELLED) as tmp:
        pool.to_parquet(tmp, index=False)
    version = file_md5(out_dir / LABELLED)
    counts = data["label"].value_counts().sort_index()
    log.info(
        "raw image dataset: %d labelled images in %d classes, %d unlabelled, version %s",
        len(data),
        counts.size,
        len(pool),
        version[:8],
    )
    return {
        "data_version": version,
        "rows": len(data),
        "classes": int(counts.size),
        "unlabelled_images": len(pool),
        **built.stats,
        "per_class": {str(k): int(v) for k, v in counts.items()},
    }


def _stage(params: VisionParams, root: Path, tracking_run: Any) -> dict[str, Any]:
    cfg = params.ingest
    metrics = run(cfg, root=root, out_dir=root / cfg.out_dir)
    tracking_run.set_tags({"data_version": metrics["data_version"], "modality": "image"})
    tracking_run.log_dataset(
        name="raw-images",
        digest=metrics["data_version"],
        source=f"{cfg.out_dir}/{LABELLED}",
        context="training",
        profile={"rows": metrics["rows"], "classes": metrics["classes"]},
    )
    return metrics


def main(argv: list[str] | None = None) -> None:
    from tunery.stage import stage_main
    from tunery.vision.params import load_vision_params

    stage_main("ingest", _stage, argv, loader=load_vision_params)


if __name__ == "__main__":
    main()
