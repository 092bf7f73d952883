"""MLM pretraining throughput: the pretrain stage's training path vs a plain `Trainer` baseline.

Same model (BERT-base from `BertConfig()` defaults, random weights, or `--model tiny` for a CPU
smoke run), same data (synthetic token ids at full length `--seq`, so no padding: the numbers are
compute, not padding), same batch. Variants, each a fresh model and a fresh `Trainer`:

- `baseline`: `BertForMaskedLM` + `DataCollatorForLanguageModeling`, `TrainingArguments` left at
  the HF defaults (fp32, the default AdamW) but for batch, steps and no saving/logging.
- `baseline_bf16`: the same with `bf16=True` (what most people switch on first).
- `tunery_eager`: the stage's own path: `tunery.modeling.training.device_args` (bf16, tf32, fused AdamW)
  and `tunery.modeling.objectives.use_objective` (MLM head only at masked positions), dataloader workers.
- `tunery`: the same with `torch.compile` (the stage's default on CUDA).

Measured: tokens/s over the timed steps (from the end of the warm-up steps to the end of the last
step, data loading included; on CUDA by events recorded after each step and read after training,
so the timed window has no host synchronisation, as in the stage), peak GPU memory, and model-FLOPs
utilisation against `--peak-tflops` (989: H100 SXM dense bf16). FLOP formulas (per token):

- `mfu` (the usual "6·N·T"): 6 × N with N = every parameter of BertForMaskedLM counted once
  (tied decoder/embedding once), the same work credited to every variant;
- `mfu_performed`: the FLOPs each variant actually performs: 6 × (encoder matmul params) +
  12 × layers × seq × hidden (attention scores and weighted sum) + 6 × (head params) × the share
  of positions the head runs on (1 for the full head, the masked share for the sparse head).

Run: `PYTHONPATH=. python bench/pretrain.py --out results.json` (GPU), or
`--model tiny --steps 6 --warmup 2` on CPU as a smoke test. Imports no mlflow/prefect/dvc.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

VOCAB_SPECIALS = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}


def make_tokenizer(vocab_size: int, max_length: int) -> Any:
    """A WordPiece tokenizer with BERT's special-token ids and `vocab_size` entries."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {VOCAB_SPECIALS.get(i, f"t{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def synthetic_features(n: int, seq: int, vocab_size: int, seed: int) -> list[dict[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    body = torch.randint(1000, vocab_size, (n, seq - 2), generator=g)
    ids = torch.cat([torch.full((n, 1), 101), body, torch.full((n, 1), 102)], dim=1).tolist()
    special = [1] + [0] * (seq - 2) + [1]
    return [
        {
            "input_ids": row,
            "token_type_ids": [0] * seq,
            "attention_mask": [1] * seq,
            "special_tokens_mask": special,
        }
        for row in ids
    ]


def model_config(name: str, seq: int, dropout: float = 0.1) -> Any:
    from transformers import BertConfig

    drop = {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    if name == "bert-base":
        return BertConfig(max_position_embeddings=max(512, seq), **drop)
    return BertConfig(
        **drop,
        vocab_size=2000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=max(64, seq),
    )


def flops_per_token(cfg: Any, n_params: int, seq: int, head_share: float) -> dict[str, float]:
    h, L, v, i = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.intermediate_size
    encoder_matmul = L * (4 * h * h + 2 * h * i)
    head = h * h + h * v
    attention = 12 * L * seq * h
    return {
        "model_6n": 6.0 * n_params,
        "performed": 6.0 * encoder_matmul + attention + 6.0 * head * head_share,
    }


def _kernel_kind(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("fmha", "flash", "attention", "efficient", "cutlassf")):
        return "attention"
    if any(k in n for k in ("gemm", "xmma", "nvjet", "cutlass", "cublas", "matmul", "wgmma")):
        return "matmul"
    if "adam" in n or "multi_tensor" in n or "foreach" in n:
        return "optimizer"
    if n.startswith("triton"):
        return "triton (fused elementwise/norm)"
    return "other"


def Profile(start_after: int, steps: int) -> Any:
    """A callback profiling `steps` optimizer steps after step `start_after` (GPU kernel time)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class _Profile(TrainerCallback):
        def __init__(self) -> None:
            self.prof: Any = None
            self.wall = 0.0

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == start_after:
                torch.cuda.synchronize()
                self.prof = profile(activities=[ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.t0 = time.perf_counter()
            elif state.global_step == start_after + steps and self.prof is not None:
                torch.cuda.synchronize()
                self.wall = time.perf_counter() - self.t0
                self.prof.__exit__(None, None, None)

        def summary(self) -> dict[str, Any]:
            if self.prof is None:
                return {}
            kinds: dict[str, float] = {}
            top = []
            for e in self.prof.key_averages():
                t = (getattr(e, "device_time_total", 0) or 0) / 1e3 / steps  # ms per step
                if t <= 0:
                    continue
                kinds[_kernel_kind(e.key)] = kinds.get(_kernel_kind(e.key), 0.0) + t
                top.append((t, e.count // steps, e.key[:100]))
            top.sort(reverse=True)
            busy = sum(kinds.values())
            return {
                "wall_ms_per_step": round(1000 * self.wall / steps, 2),
                "gpu_kernel_ms_per_step": round(busy, 2),
                "by_kind_ms": {
                    k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda x: -x[1])
                },
                "top": [{"ms": round(t, 3), "calls": c, "kernel": k} for t, c, k in top[:12]],
            }

    return _Profile()


def run_variant(name: str, a: argparse.Namespace, device: str) -> dict[str, Any]:
    import torch
    from transformers import (
        BertForMaskedLM,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        set_seed,
    )

    from tunery.modeling import objectives as pretraining
    from tunery.modeling import training

    cuda = device == "cuda"
    cfg = model_config(a.model, a.seq, a.dropout)
    tok = make_tokenizer(cfg.vocab_size, a.seq)
    total_steps = a.warmup + a.steps
    profile_steps = 3 if (a.profile and cuda and name.startswith("tunery")) else 0
    features = synthetic_features(
        (total_steps + profile_steps) * a.batch, a.seq, cfg.vocab_size, seed=0
    )
    set_seed(0)
    model = BertForMaskedLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())

    common = {
        "output_dir": tempfile.mkdtemp(prefix=f"bench-{name}-"),
        "per_device_train_batch_size": a.batch,
        "max_steps": total_steps + profile_steps,
        "save_strategy": "no",
        "logging_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "remove_unused_columns": False,
        "use_cpu": not cuda,
    }
    if name.startswith("baseline"):
        settings = dict(common, bf16=name == "baseline_bf16")
        collate = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
        sparse = False
    else:
        dev = training.device_args(
            device=device,
            precision="auto",
            compile=name == "tunery" and cuda,
            compile_mode=a.compile_mode,
        )
        settings = dict(
            common,
            **dev,
            dataloader_num_workers=a.workers,
            dataloader_pin_memory=cuda,
            dataloader_persistent_workers=a.workers > 0,
        )
        pretraining.use_objective(model, "mlm", sparse_mlm=True)
        mlm = SimpleNamespace(
            probability=0.15, mask_replace=0.8, random_replace=0.1, whole_word=False
        )
        collate = pretraining.mlm_collator(tok, mlm)
        sparse = True
    args = training.training_args(**settings)

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: dict[int, float] = {}

        # CUDA: an event per step (no host synchronisation inside the timed window, as in the
        # stage), read after training: the interval between two marks is GPU-timeline wall time.
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step > total_steps:
                return
            if state.global_step in (a.warmup, total_steps) or state.global_step > a.warmup:
                if cuda:
                    event = torch.cuda.Event(enable_timing=True)
                    event.record()
                    self.marks[state.global_step] = event
                else:
                    self.marks[state.global_step] = time.perf_counter()

        def seconds(self) -> dict[int, float]:
            if not cuda:
                return dict(self.marks)
            first = self.marks[a.warmup]
            self.marks[total_steps].synchronize()
            return {s: first.elapsed_time(e) / 1e3 for s, e in self.marks.items()}

    clock = Clock()
    prof = Profile(total_steps, profile_steps) if profile_steps else None
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=features,
        data_collator=collate,
        callbacks=[clock] + ([prof] if prof else []),
    )
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    marks = clock.seconds()
    elapsed = marks[total_steps] - marks[a.warmup]
    steps = sorted(marks)
    per_step = [marks[s] - marks[p] for p, s in itertools.pairwise(steps)]
    tokens = a.steps * a.batch * a.seq
    tps = tokens / elapsed
    share = 0.15 if sparse else 1.0  # the sparse head runs on the ~15 % masked positions
    fpt = flops_per_token(cfg, n_params, a.seq, share)
    peak = a.peak_tflops * 1e12
    out = {
        "variant": name,
        "bf16": bool(args.bf16),
        "torch_compile": bool(args.torch_compile),
        "torch_compile_mode": args.torch_compile_mode,
        "batch": a.batch,
        "optim": str(args.optim),
        "sparse_mlm_head": sparse,
        "dataloader_workers": int(args.dataloader_num_workers),
        "params": n_params,
        "timed_steps": a.steps,
        "timed_seconds": round(elapsed, 3),
        "median_step_ms": round(1000 * statistics.median(per_step), 2) if per_step else None,
        "tokens_per_s": round(tps),
        "samples_per_s": round(tps / a.seq, 1),
        "mfu": round(fpt["model_6n"] * tps / peak, 4),
        "mfu_performed": round(fpt["performed"] * tps / peak, 4),
        "wall_seconds_incl_warmup": round(wall, 1),
    }
    if cuda:
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if prof is not None:
        out["kernel_profile"] = prof.summary()
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["bert-base", "tiny"], default="bert-base")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=40, help="timed steps")
    p.add_argument(
        "--warmup", type=int, default=10, help="untimed steps first (compile happens here)"
    )
    p.add_argument(
        "--workers", type=int, default=4, help="dataloader workers of the tunery variants"
    )
    p.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode of the tunery variant (default: torch's)",
    )
    p.add_argument(
        "--profile", action="store_true", help="GPU kernel-time breakdown (3 extra steps)"
    )
    p.add_argument(
        "--dropout",
        type=float,
        default=0.1,
        help="hidden and attention dropout of the model, every variant (BERT: 0.1; the stage's "
        "scratch encoder takes it from pretrain.scratch.dropout)",
    )
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16")
    p.add_argument(
        "--variants", default="baseline,baseline_bf16,tunery_eager,tunery", help="comma-separated"
    )
    p.add_argument("--out", required=True, help="JSON result path")
    a = p.parse_args(argv)

    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for name in a.variants.split(","):
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        results.append(run_variant(name.strip(), a, device))
        print(f"[bench] {json.dumps(results[-1])}", file=sys.stderr, flush=True)
    by = {r["variant"]: r for r in results}
    ratios = {}
    if "baseline" in by:
        base = by["baseline"]["tokens_per_s"]
        ratios = {f"{k}_vs_baseline": round(r["tokens_per_s"] / base, 2) for k, r in by.items()}
    if "baseline_bf16" in by and "tunery" in by:
        ratios["tunery_vs_baseline_bf16"] = round(
            by["tunery"]["tokens_per_s"] / by["baseline_bf16"]["tokens_per_s"], 2
        )
    report = {
        "bench": "pretrain-mlm",
        "model": a.model,
        "seq": a.seq,
        "batch": a.batch,
        "dropout": a.dropout,
        "timed_steps": a.steps,
        "warmup_steps": a.warmup,
        "peak_tflops": a.peak_tflops,
        "flops_formula": {
            "mfu": "6 * N_all_params * tokens/s / peak (N counts tied embedding/decoder once)",
            "mfu_performed": "(6*L*(4h^2+2hi) + 12*L*seq*h + 6*(h^2+h*V)*head_share) * tokens/s / peak; "
            "head_share 1.0 full head, 0.15 sparse head",
        },
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else platform.processor() or "cpu",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "results": results,
        "ratios": ratios,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["ratios"]))


if __name__ == "__main__":
    main()
