"""prepare (images): hash-stable train/val/test/holdout splits of the labelled images.

Inputs:  `<ingest.out_dir>/labelled.parquet`.
Outputs: `<out_dir>/{train,val,test,holdout}.parquet` and `<out_dir>/labels.json`
         (tunery/vision/splits.py); `metrics/prepare.json`.

The split of an image is a salted hash of its bytes (`prepare.split_salt`), so it never moves when
images are added, and a byte-identical copy shares it; with `freeze_holdout` only the first data
version populates the holdout. In the demo's low-label setting the train split is the labelled
share fine-tuning sees (e.g. 800 of Fashion-MNIST's 60,000 training images: 1.3 %).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from tunery.config import PrepareConfig
from tunery.data import images
from tunery.errors import DataValidationError
from tunery.vision import splits
from tunery.vision.params import VisionParams

log = logging.getLogger("tunery.prepare")


def run(cfg: PrepareConfig, *, raw_dir: Path, out_dir: Path) -> dict[str, Any]:
    data = pd.read_parquet(raw_dir / "labelled.parquet")
    data["split"] = images.assign_splits(data, cfg)
    frames = {name: data[data["split"] == name] for name in splits.SPLITS}
    labels = sorted(data["label"].unique())
    missing = sorted(set(labels) - set(frames["train"]["label"]))
    if missing:
        raise DataValidationError(
            raw_dir / "labelled.parquet",
            "too_few_examples",
            f"class(es) {missing[:5]} have no image in the train split; add images or lower "
            "prepare.fractions",
        )
    splits.write(out_dir, frames, labels)
    sizes = {name: len(f) for name, f in frames.items()}
    log.info("splits: %s", ", ".join(f"{k} {v}" for k, v in sizes.items()))
    return {
        "rows": {"total": len(data), **sizes},
        "classes": len(labels),
        "train_share": round(sizes["train"] / max(1, len(data)), 4),
    }


def _stage(params: VisionParams, root: Path, tracking_run: Any) -> dict[str, Any]:
    return run(
        params.prepare,
        raw_dir=root / params.ingest.out_dir,
        out_dir=root / params.prepare.out_dir,
    )


def main(argv: list[str] | None = None) -> None:
    from tunery.stage import stage_main
    from tunery.vision.params import load_vision_params

    stage_main("prepare", _stage, argv, loader=load_vision_params)


if __name__ == "__main__":
    main()
