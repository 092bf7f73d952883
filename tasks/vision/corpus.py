"""corpus (images): the SimCLR pool's own versioned snapshot, moved only when the policy says so.

Inputs:  `<ingest.out_dir>/unlabelled.parquet`, `<prepare.out_dir>/{train,val}.parquet` and
         `labels.json`; the current snapshot (a persistent output).
Outputs: `<out_dir>/` the same four files (tunery/vision/corpus.py) — what `pretrain` reads: the
         pool (the unlabelled images and the train split's) and the probe's splits — and
         `metrics/corpus.json` (the change measured and the decision).

The text pipeline's corpus stage with image content hashes as the keys (tunery/data/snapshot.py
owns the policy): a labelled drop changes the train split, so the pool, a little; with
`pretrain_policy: on_corpus_change` the snapshot (and so the SimCLR encoder) only moves when more
than `change_threshold` of the pool's images were added or removed. DVC sees an unchanged snapshot
and skips `pretrain`; `dvc.lock` records which pool the encoder was trained on. A kept snapshot
whose image files are gone (a withdrawn drop) moves whatever the policy: it could not be trained
on again.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from tunery.config import CorpusConfig
from tunery.data.snapshot import refresh
from tunery.vision import corpus
from tunery.vision.params import VisionParams


def run(
    cfg: CorpusConfig, *, root: Path, raw_dir: Path, data_dir: Path, out_dir: Path
) -> dict[str, Any]:
    return refresh(
        cfg,
        sources=corpus.sources(raw_dir, data_dir),
        out_dir=out_dir,
        keys=corpus.pool_keys,
        unit="images",
        unusable=partial(corpus.missing_images, root=root),
    )


def _stage(params: VisionParams, root: Path, tracking_run: Any) -> dict[str, Any]:
    metrics = run(
        params.corpus,
        root=root,
        raw_dir=root / params.ingest.out_dir,
        data_dir=root / params.prepare.out_dir,
        out_dir=root / params.corpus.out_dir,
    )
    tracking_run.set_tags({"corpus.moved": metrics["moved"], "corpus.reason": metrics["reason"]})
    return metrics


def main(argv: list[str] | None = None) -> None:
    from tunery.stage import stage_main
    from tunery.vision.params import load_vision_params

    stage_main("corpus", _stage, argv, loader=load_vision_params)


if __name__ == "__main__":
    main()
