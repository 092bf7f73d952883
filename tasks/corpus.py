"""corpus: the pretraining inputs' own versioned snapshot, moved only when the policy says so.

Inputs:  `<prepare.out_dir>/{corpus,train,val}.parquet`; the current snapshot (a persistent output).
Outputs: `<out_dir>/{corpus,train,val}.parquet` — what `pretrain` reads (the unlabelled corpus, and the
         labelled splits its probe uses) — and `metrics/corpus.json` (the change measured and the
         decision).

Why a stage: `pretrain` depends on this snapshot, not on `prepare`. New labelled data changes the
prepared corpus a little; with `pretrain_policy: on_corpus_change` the snapshot (and so the encoder)
only moves when more than `change_threshold` of the texts changed. DVC sees an unchanged snapshot
and skips `pretrain`, and `dvc.lock` still records exactly which corpus the encoder was trained on.
The output is `persist: true` in dvc.yaml, so DVC keeps the previous snapshot for this comparison.
The policy and the copy are tunery/data/snapshot.py's, shared with the image pipeline's corpus stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from tunery.config import CorpusConfig, Params
from tunery.data.snapshot import change_share, refresh

__all__ = ["FILES", "change_share", "run"]

FILES = ("corpus.parquet", "train.parquet", "val.parquet")


def corpus_texts(files: Mapping[str, Path]) -> set[str]:
    """The snapshot's keys: the corpus texts."""
    return set(pd.read_parquet(files["corpus.parquet"])["text"])


def run(cfg: CorpusConfig, *, prepared_dir: Path, out_dir: Path) -> dict[str, Any]:
    sources = {name: prepared_dir / name for name in FILES}
    return refresh(cfg, sources=sources, out_dir=out_dir, keys=corpus_texts, unit="texts")


def _stage(params: Params, root: Path, tracking_run: Any) -> dict[str, Any]:
    metrics = run(
        params.corpus,
        prepared_dir=root / params.prepare.out_dir,
        out_dir=root / params.corpus.out_dir,
    )
    tracking_run.set_tags({"corpus.moved": metrics["moved"], "corpus.reason": metrics["reason"]})
    return metrics


def main(argv: list[str] | None = None) -> None:
    from tunery.stage import stage_main

    stage_main("corpus", _stage, argv)


if __name__ == "__main__":
    main()
