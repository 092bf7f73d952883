"""What the pretrain stage buys downstream: fine-tune from its output vs from its base.

One run: the pretrain stage (`tasks.pretrain.run`, params.yaml's `pretrain:` section with
`--set` overrides) on the prepared corpus (all unlabelled text, every arm), then for each share of
the labelled train split (stratified, seeded) two fine-tunes with the same method, schedule and
seed: from the stage's output (`pretrained`) and from the stage's input, the base encoder
(`base`). Reported per share: best val macro-F1 (what the finetune stage's gate compares), test
macro-F1 and accuracy of the best checkpoint, seconds, and the gain (pretrained - base).

    # CPU, small (minutes on 2 cores): full fine-tuning at lr 1e-4, 1 epoch (small shares: more
    # epochs, up to --min-steps steps), early stopping on val macro-F1 as in the stage
    PYTHONPATH=. python bench/pretrain_value.py --data data/prepared \\
        --out bench/results/pretrain_value-cpu.json
    # another objective, more labelled shares, LoRA at the stage's defaults
    PYTHONPATH=. python bench/pretrain_value.py --set pretrain.objective=simcse \\
        --fractions 0.05,0.2,0.5,1.0 --method lora --epochs 3 --out /tmp/v.json

Needs the prepared splits (`train/val/test.parquet`, `labels.json`) and `corpus.parquet` in
`--data`; the base must be an `init: base` model (the comparison needs one).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def subsample(split: Any, fraction: float, *, seed: int) -> Any:
    """A stratified `fraction` of `split` (at least one row per class), order kept."""
    import random

    from tunery.data.labelled import Split

    if fraction >= 1.0:
        return split
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(split.labels):
        by_class.setdefault(y, []).append(i)
    keep: list[int] = []
    for rows in by_class.values():
        rng.shuffle(rows)
        keep += rows[: max(1, round(len(rows) * fraction))]
    keep.sort()
    return Split(split.name, [split.texts[i] for i in keep], [split.labels[i] for i in keep])


def finetune_arm(
    cfg: Any, *, encoder: Path, labels: list[str], train: Any, val: Any, test: Any
) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoTokenizer

    from tunery.modeling.methods import build_model, effective_max_length
    from tunery.modeling.predict import predict_proba
    from tunery.modeling.trainer import train as train_model

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    model = build_model(cfg, method=cfg.method, encoder=encoder, labels=labels)
    max_length = effective_max_length(cfg, cfg.method, model.config)
    result = train_model(
        model,
        tokenizer,
        cfg,
        method=cfg.method,
        train_split=train,
        val_split=val,
        checkpoint_dir=None,
        max_length=max_length,
    )
    model = getattr(result.model, "_orig_mod", result.model)
    probs = predict_proba(
        model, tokenizer, test.texts, max_length=max_length, batch_size=cfg.eval_batch_size
    )
    pred = probs.argmax(-1)
    return {
        "best_val_macro_f1": round(result.best_val_macro_f1, 4),
        "test_macro_f1": round(float(f1_score(test.labels, pred, average="macro")), 4),
        "test_accuracy": round(float(accuracy_score(test.labels, pred)), 4),
        "epochs": round(result.epochs, 2),
        "steps": result.steps,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default="data/prepared", help="prepared splits + corpus.parquet")
    p.add_argument("-p", "--params", default=str(REPO / "params.yaml"))
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="params override, e.g. pretrain.train.max_steps=40 (repeatable)",
    )
    p.add_argument("--fractions", default="0.05,0.2,1.0", help="shares of the labelled train split")
    p.add_argument("--method", default="full", help="fine-tune method (finetune.method)")
    p.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="fine-tune learning rate (default: params.yaml's for the method; full: 1e-4)",
    )
    p.add_argument("--epochs", type=float, default=1.0, help="fine-tune epochs (at most)")
    p.add_argument(
        "--min-steps",
        type=int,
        default=30,
        help="small shares train for more epochs, up to this many steps (same in both arms)",
    )
    p.add_argument("--seed", type=int, default=42, help="fine-tune seed, every arm")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument(
        "--encoder",
        default=None,
        help="an existing pretrain output to evaluate instead of running the stage",
    )
    p.add_argument("--keep", default=None, help="keep the stage's output in this folder")
    p.add_argument("--out", required=True, help="JSON result path")
    a = p.parse_args(argv)

    import torch

    from tasks.pretrain import run as pretrain_run
    from tunery.config import load_params
    from tunery.data.labelled import load_split, read_labels
    from tunery.modeling.factory import resolve_model_ref

    if a.threads:
        torch.set_num_threads(a.threads)
    params = load_params(Path(a.params), a.set)
    pcfg = params.pretrain
    if pcfg.init != "base":
        raise SystemExit("pretrain.init must be base: the comparison is against the stage's base")
    data = Path(a.data)
    base = resolve_model_ref(pcfg.base)
    method_lr = {"learning_rate": a.learning_rate} if a.learning_rate else {}
    fcfg = params.finetune.model_copy(
        update={
            "method": a.method,
            "epochs": a.epochs,
            "seed": a.seed,
            "threads": a.threads,
            a.method: getattr(params.finetune, a.method).model_copy(update=method_lr),
        }
    )
    labels = read_labels(data / "labels.json")
    train = load_split(data / "train.parquet", labels)
    val = load_split(data / "val.parquet", labels)
    test = load_split(data / "test.parquet", labels)

    work = Path(tempfile.mkdtemp(prefix="pretrain_value-"))
    try:
        pretrain: dict[str, Any]
        if a.encoder:
            encoder = Path(a.encoder)
            pretrain = {"encoder": str(encoder), "ran": False}
        else:
            encoder = Path(a.keep) if a.keep else work / "encoder"
            if encoder.exists():
                shutil.rmtree(encoder)
            t0 = time.perf_counter()
            m = pretrain_run(
                pcfg,
                data_dir=data,
                out_dir=encoder,
                checkpoint_dir=work / "ckpt",
                plots_dir=work / "plots",
            )
            pretrain = {
                "ran": True,
                "seconds": round(time.perf_counter() - t0, 1),
                **{
                    k: m.get(k)
                    for k in (
                        "objective",
                        "steps",
                        "stopped_by_budget",
                        "train_seconds",
                        "final_loss",
                        "heldout",
                        "probe",
                    )
                },
            }
        rows = []
        for share in [float(x) for x in a.fractions.split(",")]:
            part = subsample(train, share, seed=a.seed)
            epochs = max(a.epochs, a.min_steps * fcfg.batch_size / len(part))
            cfg = fcfg.model_copy(update={"epochs": round(epochs, 2)})
            row: dict[str, Any] = {
                "fraction": share,
                "train_rows": len(part),
                "epochs_max": cfg.epochs,
            }
            for arm, folder in (("base", base), ("pretrained", encoder)):
                row[arm] = finetune_arm(
                    cfg, encoder=folder, labels=labels, train=part, val=val, test=test
                )
                print(f"{share:>5} {arm:>10} {row[arm]}", flush=True)
            row["gain"] = {
                k: round(row["pretrained"][k] - row["base"][k], 4)
                for k in ("best_val_macro_f1", "test_macro_f1", "test_accuracy")
            }
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "bench": "pretrain_value",
        "command": " ".join(
            ["bench/pretrain_value.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "data": str(data),
        "base": pcfg.base,
        "pretrain_params": pcfg.model_dump(mode="json", exclude={"out_dir", "checkpoint_dir"}),
        "finetune": {
            "method": fcfg.method,
            "learning_rate": getattr(fcfg, fcfg.method).learning_rate,
            "epochs": fcfg.epochs,
            "min_steps": a.min_steps,
            "batch_size": fcfg.batch_size,
            "seed": fcfg.seed,
            "early_stopping_patience": fcfg.early_stopping_patience,
        },
        "pretrain": pretrain,
        "rows": rows,
        "host": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"rows": [{"fraction": r["fraction"], **r["gain"]} for r in rows]}))
    return result


if __name__ == "__main__":
    main()
