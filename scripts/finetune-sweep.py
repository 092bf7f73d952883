"""Compare fine-tuning settings on one data set in one process: how the finetune defaults were chosen.

    python scripts/finetune-sweep.py --data DIR_OR_CSV --encoder DIR --out results.jsonl \\
        --run 'full:{"method": "full", "epochs": 2.0}' \\
        --run 'lora:{"method": "lora", "lora": {"learning_rate": 2.0e-3}}'

Each `--run NAME:JSON` is a set of overrides of params.yaml's finetune section (deep-merged), trained
with the library (build_model + train, no checkpoints) and scored on every split there is. One JSON
line per run: data set, name, overrides, epochs, steps, val/test/holdout macro-F1, train seconds,
trainable share. `--data` is a prepared dir ({train,val,test,holdout}.parquet + labels.json) or a
CSV with text,label columns, split here by the pipeline's own hash split (params.prepare).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from tunery.config import FinetuneConfig, load_params
from tunery.data.labelled import SPLIT_FILES, load_split, read_labels
from tunery.modeling.methods import build_model, effective_max_length, trainable_parameters
from tunery.modeling.trainer import train


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def prepared_dir(data: Path, params: Any) -> Path:
    if data.is_dir():
        return data
    from tunery.data.split import assign

    df = pd.read_csv(data)
    df["text"], df["label"] = df["text"].astype(str), df["label"].astype(str)
    df["origin"] = "source:" + data.name
    dest = Path(tempfile.mkdtemp(prefix="sweep-data-"))
    part = assign(df, params.prepare)
    for name in SPLIT_FILES:
        df[part == name].reset_index(drop=True).to_parquet(dest / f"{name}.parquet", index=False)
    (dest / "labels.json").write_text(json.dumps(sorted(df["label"].unique())))
    return dest


def score(model: Any, tokenizer: Any, split: Any, max_length: int) -> float:
    from sklearn.metrics import f1_score

    from tunery.modeling.predict import predict_proba

    pred = predict_proba(model, tokenizer, split.texts, max_length=max_length).argmax(-1)
    return round(float(f1_score(split.labels, pred, average="macro")), 4)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--encoder", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--run", action="append", required=True, help="NAME:JSON overrides")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    params = load_params("params.yaml")
    data = prepared_dir(args.data, params)
    labels = read_labels(data / "labels.json")
    splits = {n: load_split(data / f"{n}.parquet", labels) for n in SPLIT_FILES}
    tokenizer = AutoTokenizer.from_pretrained(args.encoder)
    base = params.finetune.model_dump(mode="json")
    for spec in args.run:
        name, _, over = spec.partition(":")
        cfg = FinetuneConfig(**deep_merge(base, json.loads(over or "{}")))
        method = cfg.method
        steps = -(-len(splits["train"]) // cfg.batch_size) * cfg.epochs
        model = build_model(
            cfg, method=method, encoder=args.encoder, labels=labels, total_steps=int(steps)
        )
        trainable, total = trainable_parameters(model)
        max_length = effective_max_length(cfg, method, model.config)
        result = train(
            model,
            tokenizer,
            cfg,
            method=method,
            train_split=splits["train"],
            val_split=splits["val"],
            checkpoint_dir=None,
            max_length=max_length,
        )
        row = {
            "data": str(args.data),
            "name": name,
            "overrides": json.loads(over or "{}"),
            "epochs": round(result.epochs, 2),
            "steps": result.steps,
            "best_val_macro_f1": round(result.best_val_macro_f1, 4),
            **{
                f"{n}_macro_f1": score(result.model, tokenizer, splits[n], max_length)
                for n in ("test", "holdout")
            },
            "train_seconds": result.train_seconds,
            "trainable_share": round(trainable / total, 5),
            "rows": {n: len(s) for n, s in splits.items()},
        }
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
