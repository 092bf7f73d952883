"""What SimCLR pretraining buys a ViT on Fashion-MNIST, in one run, side by side.

One run: a ViT from scratch, its initial weights kept (`random`); SimCLR pretraining on the
unlabelled pool (train images outside the labelled subsets) for a step/wall-clock budget,
throughput in images/s (each image encoded twice); then, for each label fraction of the training
split (class-balanced, `fashion_mnist.labelled_subset`, nested), with SimCLR vs random weights:
a linear probe (logistic regression on frozen mean-pooled embeddings) and a fine-tune (same
steps, schedule, seed and classifier initialisation; only the encoder weights differ), all scored
on a class-balanced subset of the test split, plus logistic regression on raw pixels as the
floor. Nothing is tuned on the test split: settings are fixed before the run.

    # smoke (the defaults: ~4 min on 2 shared cores)
    PYTHONPATH=. python bench/simclr_value.py --out /tmp/simclr_value.json
    # the recorded CPU run (bench/results/simclr_value-cpu.json: ~11 min niced on 2 shared cores)
    PYTHONPATH=. nice -n 15 python bench/simclr_value.py --patch 7 --pool 20000 --batch 256 \\
        --pretrain-steps 200 --pretrain-minutes 5 --finetune-steps 150 --test 5000 \\
        --out bench/results/simclr_value-cpu.json
    # "full" settings (not run yet; a GPU, or many hours on CPU): SimCLR's usual regime is
    # hundreds of epochs with big batches; 20,000 steps x 512 is ~175 epochs of the 58k pool
    PYTHONPATH=. python bench/simclr_value.py --pool 58000 --batch 512 --pretrain-steps 20000 \\
        --hidden 192 --layers 6 --heads 3 --finetune-steps 1000 --test 10000 --methods full,lora \\
        --out bench/results/simclr_value-full.json

Needs Debian's `dataset-fashion-mnist` (`--data` for another folder with the four idx files).

Recipes mode (`--encoder`): no pretraining; fine-tune recipes side by side on encoders the image
pipeline's pretrain stage already wrote, on that pipeline's prepared splits, scored on val and
test only (the holdout is never read: choose a default here, then report the holdout from a
pipeline run). Each recipe is a JSON object of `FinetuneSettings` fields (plus `probe: true` for
the frozen-encoder logistic regression); every recipe runs with the same seed on every encoder:

    PYTHONPATH=. nice python bench/simclr_value.py --project vision \
        --encoder s600=vision/models/encoder/model --encoder init=vision/models/encoder/init \
        --recipes '{"lora": {"method": "lora", "learning_rate": 2e-3, "lora_r": 8,
                    "lora_alpha": 16, "max_steps": 300}, "probe": {"probe": true}}' \
        --out bench/results/simclr_value-recipes.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TRAIN_PER_CLASS = 6000  # Fashion-MNIST's training split: 6,000 images of each of 10 classes


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    p.add_argument("--fractions", default="0.01,0.05", help="label shares of the train split")
    p.add_argument("--pool", type=int, default=2000, help="unlabelled images for SimCLR")
    p.add_argument("--test", type=int, default=1000, help="test images (class-balanced)")
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=256, help="SimCLR batch (2x views per step)")
    p.add_argument("--lr", type=float, default=1.0e-3)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--blur", type=float, default=0.0, help="probability of a gaussian blur")
    p.add_argument("--pretrain-steps", type=int, default=20)
    p.add_argument("--pretrain-minutes", type=float, default=None)
    p.add_argument("--methods", default="full", help="fine-tune methods: full, lora or both")
    p.add_argument("--finetune-steps", type=int, default=20)
    p.add_argument("--finetune-batch", type=int, default=64)
    p.add_argument("--finetune-lr", type=float, default=5.0e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="the GPU's dense bf16 peak for MFU (989: H100/H200 SXM); unused on CPU",
    )
    p.add_argument("--out", type=Path, default=Path("bench/results/simclr_value.json"))
    p.add_argument(
        "--encoder",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="recipes mode: a pretrained encoder folder (repeat for several)",
    )
    p.add_argument("--project", type=Path, default=Path("vision"), help="recipes mode: vision/")
    p.add_argument("--recipes", default="{}", help="recipes mode: {name: FinetuneSettings fields}")
    return p.parse_args(argv)


def recipe_data(project: Path) -> tuple[list[str], dict[str, Any]]:
    """The image pipeline's prepared train/val/test splits (never the holdout), as pixels."""
    from tunery.vision import splits
    from tunery.vision.params import load_vision_params

    params = load_vision_params(project / "params.yaml")
    data_dir = project / params.prepare.out_dir
    labels = splits.labels(data_dir)
    data = {
        name: splits.load(data_dir, name, project, params.processor, labels)[1:]
        for name in ("train", "val", "test")
    }
    return labels, {"processor": params.processor, "finetune": params.finetune, **data}


def recipe_scores(predict: Any, data: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    from tunery.vision.arms import scores

    return {
        split: scores(predict(data[split][0]), data[split][1], labels) for split in ("val", "test")
    }


def run_recipe(recipe: dict[str, Any], encoder: Path, labels: list[str], data: dict) -> dict:
    """One recipe on one encoder: val and test macro-F1 / accuracy, seconds."""
    from tunery.vision.arms import probe_arm
    from tunery.vision.augment import AugmentConfig
    from tunery.vision.finetune import FinetuneSettings, finetune, logits
    from tunery.vision.vit import build_classifier

    if recipe.get("probe"):
        r = probe_arm(encoder, labels, {**data, "holdout": data["test"]})
        return {split: r[split] for split in ("val", "test")} | {"seconds": r["train_seconds"]}
    fields = dict(recipe)
    if fields.get("augment") is not None:
        fields["augment"] = AugmentConfig(**fields["augment"])
    settings = FinetuneSettings(**{"seed": 0, **fields})
    model = build_classifier(data["processor"], labels, base_dir=encoder, seed=settings.seed)
    with tempfile.TemporaryDirectory(prefix="simclr_value-ft-") as work:
        r = finetune(
            model,
            *data["train"],
            *data["val"],
            settings,
            out_dir=Path(work),
            processor=data["processor"],
        )
    out = recipe_scores(lambda x: logits(r["model"], x).argmax(-1).numpy(), data, labels)
    return out | {"seconds": r["seconds"], "trainable_share": r["trainable_share"]}


def recipes_main(args: argparse.Namespace) -> dict[str, Any]:
    """Recipes mode: every recipe on every encoder, plus the raw-pixel floor."""
    from tunery.vision.probe import pixel_baseline

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    labels, data = recipe_data(args.project)
    recipes = json.loads(args.recipes)
    train_x, train_y = data["train"]
    pixels = {
        split: {"accuracy": pixel_baseline(train_x, train_y, *data[split])}
        for split in ("val", "test")
    }
    results: dict[str, Any] = {}
    for spec in args.encoder:
        name, folder = spec.split("=", 1)
        for recipe_name, recipe in recipes.items():
            key = f"{recipe_name}@{name}"
            results[key] = run_recipe(recipe, Path(folder), labels, data)
            print(key, json.dumps(results[key]), flush=True)
    payload = {
        "bench": "simclr_value-recipes",
        "project": str(args.project),
        "encoders": args.encoder,
        "recipes": recipes,
        "sizes": {split: len(data[split][1]) for split in ("train", "val", "test")},
        "pixel_logreg": pixels,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    return payload


def load_data(args: argparse.Namespace, processor: Any) -> dict[str, Any]:
    """pixel_values and labels of the labelled subsets, the unlabelled pool and the test subset,
    through the processor (PIL images, as a user's files would go)."""
    import numpy as np
    from PIL import Image

    from tunery.data import fashion_mnist as fm
    from tunery.vision.processor import process

    train_x, train_y = fm.load("train", args.data)
    test_x, test_y = fm.load("test", args.data)
    fractions = sorted(float(f) for f in args.fractions.split(","))
    per_class = {f: max(1, round(f * TRAIN_PER_CLASS)) for f in fractions}
    largest = fm.labelled_subset(train_y, per_class[fractions[-1]])
    pool = fm.unlabelled_pool(len(train_x), largest, limit=args.pool)
    test_idx = fm.labelled_subset(test_y, max(1, args.test // 10), salt="fashion-mnist-test")

    def pixels(images: np.ndarray, idx: np.ndarray) -> Any:
        return process([Image.fromarray(images[i]) for i in idx], processor)

    labelled = {f: fm.labelled_subset(train_y, n) for f, n in per_class.items()}
    return {
        "pool": pixels(train_x, pool),
        "test": (pixels(test_x, test_idx), test_y[test_idx].tolist()),
        "labelled": {
            f: (pixels(train_x, idx), train_y[idx].tolist()) for f, idx in labelled.items()
        },
    }


def pretrain_arm(args: argparse.Namespace, processor: Any, data: dict, work: Path) -> dict:
    """Save the initial weights (the `random` arm), pretrain, save the SimCLR weights."""
    from tunery.vision.augment import AugmentConfig
    from tunery.vision.simclr import SimCLRSettings, build_simclr, pretrain
    from tunery.vision.vit import VitSpec

    spec = VitSpec(
        patch_size=args.patch, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads
    )
    settings = SimCLRSettings(
        batch_size=args.batch,
        learning_rate=args.lr,
        max_steps=args.pretrain_steps,
        max_minutes=args.pretrain_minutes,
        temperature=args.temperature,
        logging_steps=max(1, args.pretrain_steps // 20),
        seed=args.seed,
    )
    model = build_simclr(processor, settings, spec=spec)
    model.save_pretrained(work / "random")
    result = pretrain(
        model,
        data["pool"],
        settings,
        processor=processor,
        augment_cfg=AugmentConfig(blur=args.blur),
        out_dir=work / "simclr",
    )
    result["params"] = sum(p.numel() for p in model.vit.parameters())
    result["utilisation"] = utilisation(
        result, sum(p.numel() for p in model.parameters()), args, processor.size
    )
    return {"model": model, "result": result, "spec": spec.model_dump(), **settings.model_dump()}


def utilisation(result: dict, params: int, args: argparse.Namespace, size: int) -> dict:
    """Model-FLOPs utilisation of the SimCLR step on a GPU: 6 x all parameters (ViT + projection
    head) x tokens per view (patches + CLS) x 2 views x images/s over `--peak-tflops`; the
    attention's score FLOPs (~2 % at 17 tokens) are left out, as in bench/pretrain.py's `mfu`.
    On CPU the FLOP rate is given and MFU is null (no peak to hold it to)."""
    import torch

    tokens = (size // args.patch) ** 2 + 1
    flops_per_image = 6 * params * tokens * 2
    rate = flops_per_image * result.get("images_per_s", 0.0)
    cuda = torch.cuda.is_available()
    return {
        "flops_formula": "6 * N_all_params * (patches + 1) * 2 views per image",
        "model_flops_per_image": flops_per_image,
        "model_gflops_per_s": round(rate / 1e9, 3),
        "peak_tflops": args.peak_tflops if cuda else None,
        "mfu": round(rate / (args.peak_tflops * 1e12), 4) if cuda else None,
    }


def probe_arms(processor: Any, data: dict, work: Path) -> dict[str, dict[str, float]]:
    """Per fraction: probe accuracy of SimCLR and random encoders, and raw-pixel logreg."""
    from tunery.vision.probe import embed, logreg_accuracy, pixel_baseline
    from tunery.vision.simclr import ViTForSimCLR

    test_pv, test_y = data["test"]
    out: dict[str, dict[str, float]] = {}
    encoders = {
        name: ViTForSimCLR.from_pretrained(work / folder)
        for name, folder in (("simclr", "simclr/model"), ("random", "random"))
    }
    test_emb = {name: embed(m, test_pv) for name, m in encoders.items()}
    for f, (pv, y) in data["labelled"].items():
        row = {
            name: logreg_accuracy(embed(m, pv), y, test_emb[name], test_y)
            for name, m in encoders.items()
        }
        row["pixels"] = pixel_baseline(pv, y, test_pv, test_y)
        out[str(f)] = row
    return out


def finetune_arms(args: argparse.Namespace, processor: Any, data: dict, work: Path) -> dict:
    """Per method and fraction: test accuracy fine-tuned from SimCLR and from random weights."""
    from tunery.data.fashion_mnist import CLASSES
    from tunery.vision.finetune import FinetuneSettings, finetune
    from tunery.vision.vit import build_classifier

    test_pv, test_y = data["test"]
    out: dict[str, Any] = {}
    for method in args.methods.split(","):
        settings = FinetuneSettings(
            method=method,
            batch_size=args.finetune_batch,
            learning_rate=args.finetune_lr,
            max_steps=args.finetune_steps,
            seed=args.seed,
        )
        for f, (pv, y) in data["labelled"].items():
            row = {}
            for name, folder in (("simclr", "simclr/model"), ("random", "random")):
                model = build_classifier(processor, CLASSES, base_dir=work / folder, seed=args.seed)
                r = finetune(model, pv, y, test_pv, test_y, settings, out_dir=work / "ft")
                row[name] = {k: v for k, v in r.items() if k != "model"}
            out[f"{method}@{f}"] = row
    return out


def compare(probe: dict, tuned: dict) -> dict[str, Any]:
    """SimCLR minus random (percentage points) and SimCLR / random, per table row."""
    rows = {f"probe@{f}": (r["simclr"], r["random"]) for f, r in probe.items()}
    rows |= {
        f"finetune_{k}": (r["simclr"]["test_accuracy"], r["random"]["test_accuracy"])
        for k, r in tuned.items()
    }
    return {
        k: {
            "simclr": a,
            "random": b,
            "diff_pt": round(100 * (a - b), 2),
            "ratio": round(a / b, 4) if b else None,
        }
        for k, (a, b) in rows.items()
    }


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The whole comparison; returns the JSON payload."""
    import torch

    from tunery.vision.processor import ProcessorConfig, contract

    if args.threads:
        torch.set_num_threads(args.threads)
    processor = ProcessorConfig()
    t0 = time.perf_counter()
    data = load_data(args, processor)
    load_s = time.perf_counter() - t0
    pre = pretrain_arm(args, processor, data, work)
    pre.pop("model")
    probe = probe_arms(processor, data, work)
    tuned = finetune_arms(args, processor, data, work)
    result = pre.pop("result")
    return {
        "bench": "simclr_value",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "host": {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "input_contract": contract(processor),
        "sizes": {
            "pool": len(data["pool"]),
            "test": len(data["test"][1]),
            "labelled": {str(f): len(y) for f, (_, y) in data["labelled"].items()},
        },
        "load_seconds": round(load_s, 2),
        "pretrain": {**pre, **result},
        "probe": probe,
        "finetune": tuned,
        "simclr_vs_random": compare(probe, tuned),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.encoder:
        return recipes_main(args)
    with tempfile.TemporaryDirectory(prefix="simclr_value-") as tmp:
        payload = run(args, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload["simclr_vs_random"], indent=2))
    print(f"images/s {payload['pretrain']['images_per_s']}; wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
