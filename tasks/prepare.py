"""prepare: split the raw dataset into train/val/test and a frozen holdout; build the corpus.

Inputs:  `<ingest.out_dir>/labelled.parquet`, `<ingest.out_dir>/unlabelled.parquet`.
Outputs: `<out_dir>/{train,val,test,holdout}.parquet` (text, label, origin), `<out_dir>/corpus.parquet`
         (unlabelled pretraining text: every text except test and holdout, plus the extra unlabelled
         texts), `<out_dir>/labels.json` (the label set, sorted); the data card:
         `metrics/prepare.json` (counts per split and class, length statistics) and
         `plots/prepare/lengths.png`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from tunery.config import Params, PrepareConfig
from tunery.data import split as splitting
from tunery.data.text import normalize
from tunery.errors import DataValidationError
from tunery.io import atomic_dir, atomic_path

log = logging.getLogger("tunery.prepare")


def _length_stats(texts: pd.Series) -> dict[str, float]:
    words = texts.str.split().str.len()
    return {
        "mean_words": round(float(words.mean()), 2) if len(words) else 0.0,
        "p50_words": float(words.quantile(0.5)) if len(words) else 0.0,
        "p95_words": float(words.quantile(0.95)) if len(words) else 0.0,
        "max_words": int(words.max()) if len(words) else 0,
        "max_chars": int(texts.str.len().max()) if len(texts) else 0,
    }


def plot_lengths(parts: dict[str, pd.DataFrame], corpus: pd.DataFrame, dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    series = {name: df["text"].str.split().str.len() for name, df in parts.items() if len(df)}
    series["corpus"] = corpus["text"].str.split().str.len()
    top = max(int(s.quantile(0.99)) for s in series.values()) + 1
    bins = range(0, top + 2)
    for name, lengths in series.items():
        ax.hist(
            lengths.clip(upper=top),
            bins=bins,
            histtype="step",
            density=True,
            label=f"{name} (n={len(lengths)})",
        )
    ax.set(
        xlabel="length (words, clipped at p99)",
        ylabel="share of texts",
        title="Text length by split",
    )
    ax.legend()
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def run(cfg: PrepareConfig, *, raw_dir: Path, out_dir: Path, plot_path: Path) -> dict[str, Any]:
    labelled_path = raw_dir / "labelled.parquet"
    if not labelled_path.is_file():
        raise DataValidationError(
            labelled_path, "missing_file", "raw dataset not found; run the ingest stage first"
        )
    data = pd.read_parquet(labelled_path)
    unlabelled = pd.read_parquet(raw_dir / "unlabelled.parquet")
    data["split"] = splitting.assign(data, cfg)
    parts = {
        name: data[data["split"] == name].drop(columns="split").reset_index(drop=True)
        for name in splitting.SPLITS
    }
    for name in ("train", "test", "holdout"):
        if parts[name].empty:
            raise DataValidationError(
                labelled_path,
                "empty_split",
                f"the {name} split is empty; add data or change prepare.fractions",
            )
    labels = sorted(data["label"].unique())
    missing = [label for label in labels if label not in set(parts["train"]["label"])]
    if missing:
        raise DataValidationError(
            labelled_path,
            "class_missing_from_train",
            f"no training example for {missing}; add data",
        )

    # Pretraining may see every text except those we score on.
    scored = set(pd.concat([parts["test"]["text"], parts["holdout"]["text"]]).map(normalize))
    corpus_texts = pd.concat(
        [parts["train"]["text"], parts["val"]["text"], unlabelled["text"]], ignore_index=True
    )
    corpus = pd.DataFrame(
        {"text": corpus_texts[~corpus_texts.map(normalize).isin(scored)].drop_duplicates()}
    )

    with atomic_dir(out_dir) as tmp:
        for name, df in parts.items():
            df.to_parquet(tmp / f"{name}.parquet", index=False)
        corpus.reset_index(drop=True).to_parquet(tmp / "corpus.parquet", index=False)
        (tmp / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    plot_lengths(parts, corpus, plot_path)

    card = {
        "rows": {name: len(df) for name, df in parts.items()} | {"corpus": len(corpus)},
        "classes": len(labels),
        # The class balance and text lengths of what is trained on and pretrained on; the other
        # splits follow the same stratified draw (their lengths are in the plot).
        "per_class": {
            "train": {
                str(k): int(v)
                for k, v in parts["train"]["label"].value_counts().sort_index().items()
            }
        },
        "lengths": {
            "train": _length_stats(parts["train"]["text"]),
            "corpus": _length_stats(corpus["text"]),
        },
        "corpus_words": int(corpus["text"].str.split().str.len().sum()),
    }
    log.info(
        "splits %s; corpus %d texts (%d words)", card["rows"], len(corpus), card["corpus_words"]
    )
    return card


def _stage(params: Params, root: Path, tracking_run: Any) -> dict[str, Any]:
    plot = root / "plots" / "prepare" / "lengths.png"
    metrics = run(
        params.prepare,
        raw_dir=root / params.ingest.out_dir,
        out_dir=root / params.prepare.out_dir,
        plot_path=plot,
    )
    tracking_run.log_artifact(plot, "data_card")
    tracking_run.log_dict(metrics, "data_card/prepare.json")
    return metrics


def main(argv: list[str] | None = None) -> None:
    from tunery.stage import stage_main

    stage_main("prepare", _stage, argv)


if __name__ == "__main__":
    main()
