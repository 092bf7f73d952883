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
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from tunery.config import CorpusConfig, Params
from tunery.errors import DataValidationError
from tunery.io import atomic_path

log = logging.getLogger("tunery.corpus")

FILES = ("corpus.parquet", "train.parquet", "val.parquet")


def change_share(old: pd.Series, new: pd.Series) -> float:
    """Share of texts added or removed, relative to the old snapshot (symmetric difference)."""
    a, b = set(old), set(new)
    return len(a ^ b) / max(len(a), 1)


def run(cfg: CorpusConfig, *, prepared_dir: Path, out_dir: Path) -> dict[str, Any]:
    for name in FILES:
        if not (prepared_dir / name).is_file():
            raise DataValidationError(
                prepared_dir / name, "missing_file", "run the prepare stage first"
            )
    new_corpus = pd.read_parquet(prepared_dir / "corpus.parquet")["text"]
    has_snapshot = all((out_dir / name).is_file() for name in FILES)
    if not has_snapshot:
        move, change, reason = True, 1.0, "no snapshot yet"
    else:
        change = change_share(pd.read_parquet(out_dir / "corpus.parquet")["text"], new_corpus)
        if cfg.pretrain_policy == "always":
            move, reason = change > 0, "policy always"
        elif cfg.pretrain_policy == "never":
            move, reason = False, "policy never: the first snapshot is kept"
        else:
            move = change > cfg.change_threshold
            cmp = ">" if move else "<="
            reason = f"corpus changed by {change:.1%} {cmp} threshold {cfg.change_threshold:.1%}"
    if move:
        for name in FILES:  # file by file: DVC keeps a .gitignore in out_dir
            with atomic_path(out_dir / name) as tmp:
                shutil.copyfile(prepared_dir / name, tmp)
    log.info(
        "corpus snapshot %s (%s)",
        "moved: pretrain will re-run" if move else "kept: pretrain stays as is",
        reason,
    )
    return {
        "moved": move,
        "change_share": round(change, 6),
        "reason": reason,
        "texts": len(new_corpus),
    }


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
