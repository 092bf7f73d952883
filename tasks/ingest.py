"""ingest: normalise the configured source (plus any incoming files) into the raw dataset.

Inputs:  the source in `ingest.source` (WordNet from `wordnet-base`, or CSV/JSONL/Parquet files),
         labelled files in `ingest.incoming` (appended after the source).
Outputs: `<out_dir>/labelled.parquet` (text, label, origin) and `<out_dir>/unlabelled.parquet`
         (text), both DVC-tracked; `metrics/ingest.json`. The data version is the DVC hash (md5) of
         `labelled.parquet`, logged to MLflow as the run's dataset input.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from tunery.config import IngestConfig, Params
from tunery.data import dataset
from tunery.data.text import normalize
from tunery.io import atomic_path, file_md5

log = logging.getLogger("tunery.ingest")

LABELLED = "labelled.parquet"
UNLABELLED = "unlabelled.parquet"


def run(cfg: IngestConfig, *, root: Path, out_dir: Path) -> dict[str, Any]:
    built = dataset.build(cfg, root)
    data, unlabelled, incoming, dup_stats = (
        built.data,
        built.unlabelled,
        built.incoming,
        built.stats,
    )
    if incoming:
        log.info("appended %d incoming file(s) from %s", len(incoming), cfg.incoming)

    labelled_keys = set(data["text"].map(normalize))
    corpus = pd.DataFrame(
        {"text": [t for t in dict.fromkeys(unlabelled) if normalize(t) not in labelled_keys]}
    )

    # File by file (not the folder): DVC keeps a .gitignore in out_dir.
    with atomic_path(out_dir / LABELLED) as tmp:
        data[["text", "label", "origin"]].to_parquet(tmp, index=False)
    with atomic_path(out_dir / UNLABELLED) as tmp:
        corpus.to_parquet(tmp, index=False)
    version = file_md5(out_dir / LABELLED)
    counts = data["label"].value_counts().sort_index()
    log.info(
        "raw dataset: %d labelled rows in %d classes, %d unlabelled texts, version %s",
        len(data),
        counts.size,
        len(corpus),
        version[:8],
    )
    return {
        "data_version": version,
        "rows": len(data),
        "classes": int(counts.size),
        "unlabelled_texts": len(corpus),
        "incoming_files": len(incoming),
        "incoming_rows": int(sum(len(f) for f in incoming)),
        **dup_stats,
        "per_class": {str(k): int(v) for k, v in counts.items()},
    }


def _stage(params: Params, root: Path, tracking_run: Any) -> dict[str, Any]:
    cfg = params.ingest
    out_dir = root / cfg.out_dir
    metrics = run(cfg, root=root, out_dir=out_dir)
    tracking_run.set_tags({"data_version": metrics["data_version"]})
    tracking_run.log_dataset(
        name="raw",
        digest=metrics["data_version"],
        source=f"{cfg.out_dir}/{LABELLED}",
        context="training",
        profile={"rows": metrics["rows"], "classes": metrics["classes"]},
    )
    return metrics


def main(argv: list[str] | None = None) -> None:
    from tunery.stage import stage_main

    stage_main("ingest", _stage, argv)


if __name__ == "__main__":
    main()
