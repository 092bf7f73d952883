"""Why the image int8 ONNX is (not) 2x PyTorch eager on CPU: variants and session settings, one run.

    PYTHONPATH=. nice python bench/vision_int8.py --out bench/results/vision_int8-cpu.json
    # the trained demo model (after `dvc repro vision/dvc.yaml`) and the text int8 beside it:
    PYTHONPATH=. nice python bench/vision_int8.py --finetune vision/models/finetune \
        --text models/variants/int8_dynamic --out bench/results/vision_int8-cpu.json

The ViT is the demo's (vision/params.yaml: 96 wide, 4 layers, 7x7 patches), from `--finetune`
or with random weights (timing does not depend on the weights). The variants are built with the
stage's own functions (`tunery.vision.variants.build`): fp32, int8_dynamic (patch-embedding Conv
in float), the int8 graph as the stage built it before (Conv quantized too), int8_static (QDQ),
int8 after onnxruntime's transformer optimizer (model_type "vit") where its attention fusion
is made to match (the export's float->float Cast pair after Softmax removed, the score scale
written as Div; QAttention in int8), and int8 dynamic of pruned copies (`tunery.vision.prune`:
1 or 2 of 4 heads, 1 of 4 layers, and/or half of each FFN removed; no recovery: the timing does
not depend on the weights; `compress.prune` in vision/params.yaml is what the stage builds).

Three measurements, all in this one process, interleaved rounds, medians, ratios to PyTorch:
- wall throughput at batch 64 (the compress stage's bench) at the default threads, onnxruntime
  spinning and not, and with one thread on both sides;
- CPU time per batch with one thread (`time.thread_time`: robust to other jobs on the machine);
- per-operator time of the int8 graph (onnxruntime's profiler), one thread and the default, and
  of the fp32 graph and PyTorch eager (torch.profiler) on one thread.
With `--text`, the text int8 folder's wall throughput spinning vs not (the text stages keep
onnxruntime's default). Writes JSON, prints a table. Numbers for reading, never a test.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the image stages run (threads.py)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

SPIN = "session.intra_op.allow_spinning"


def demo_model(finetune: str | None) -> Any:
    from tunery.vision import finetune_dir
    from tunery.vision.params import load_vision_params
    from tunery.vision.vit import build_classifier

    if finetune:
        return finetune_dir.load_model(Path(finetune))
    p = load_vision_params(REPO / "vision" / "params.yaml")
    import torch

    torch.manual_seed(0)
    labels = [str(i) for i in range(10)]
    return build_classifier(p.processor, labels, spec=p.pretrain.vit).eval()


def fuse_attention(src: Path, dest: Path, heads: int, hidden: int) -> dict[str, int]:
    """onnxruntime's transformer optimizer on the export, made to find its attention pattern."""
    import onnx
    from onnx import TensorProto, numpy_helper
    from onnxruntime.transformers.optimizer import optimize_model

    model = onnx.load(str(src))
    g = model.graph
    casts = {
        n.output[0]: n.input[0]
        for n in g.node
        if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT
    }

    def root(x: str) -> str:
        while x in casts:
            x = casts[x]
        return x

    for n in g.node:
        for i, x in enumerate(n.input):
            n.input[i] = root(x)
    kept = [n for n in g.node if not (n.op_type == "Cast" and n.output[0] in casts)]
    del g.node[:]
    g.node.extend(kept)
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    made = {o: n for n in g.node for o in n.output}
    for n in g.node:  # scores * c -> scores / (1 / c): the fusion's no-mask pattern
        if n.op_type == "Mul" and getattr(made.get(n.input[0]), "op_type", "") == "MatMul":
            c = consts.get(n.input[1])
            if c is not None and numpy_helper.to_array(c.attribute[0].t).size == 1:
                val = numpy_helper.to_array(c.attribute[0].t)
                g.initializer.append(numpy_helper.from_array(1.0 / val, n.input[1] + "_inv"))
                n.op_type, n.input[1] = "Div", n.input[1] + "_inv"
    tmp = dest.with_suffix(".pre.onnx")
    onnx.save(model, str(tmp))
    opt = optimize_model(str(tmp), model_type="vit", num_heads=heads, hidden_size=hidden)
    opt.save_model_to_file(str(dest))
    return {k: v for k, v in opt.get_fused_operator_statistics().items() if v}


def build_variants(model: Any, work: Path, calib: Any) -> tuple[dict[str, Path], dict[str, Any]]:
    from tunery.onnx import compress as comp
    from tunery.vision.export import export_onnx
    from tunery.vision.variants import build

    raw = export_onnx(model, work / "raw.onnx")
    files = {}
    for name in ("fp32", "int8_dynamic", "int8_static"):
        files[name] = work / f"{name}.onnx"
        build(name, raw, files[name], calib, work)
    files["int8_dynamic_conv_quantized"] = work / "int8_conv.onnx"  # the stage's graph before
    comp.quantize_int8_dynamic(
        raw, files["int8_dynamic_conv_quantized"], pack_tokens=False, plain_layer_norm=False
    )
    c = model.config
    fused = fuse_attention(raw, work / "fused.onnx", c.num_attention_heads, c.hidden_size)
    files["int8_fused_attention"] = work / "int8_fused.onnx"
    comp.quantize_int8_dynamic(
        work / "fused.onnx",
        files["int8_fused_attention"],
        pack_tokens=False,
        plain_layer_norm=True,
        float_nodes=["/inner/vit/embeddings/patch_embeddings/projection/Conv"],
    )
    files |= pruned_variants(model, work, calib)
    return files, {"fused_by_the_optimizer": fused}


PRUNED = {  # name: (layers removed, heads removed, FFN share removed)
    "pruned_ffn50_int8": (0, 0, 0.5),
    "pruned_heads3_int8": (0, 1, 0.0),
    "pruned_heads3_ffn50_int8": (0, 1, 0.5),
    "pruned_heads2_ffn50_int8": (0, 2, 0.5),
    "pruned_layers3_int8": (1, 0, 0.0),
    "pruned_layers3_ffn50_int8": (1, 0, 0.5),
}


def pruned_variants(model: Any, work: Path, calib: Any) -> dict[str, Path]:
    """int8 dynamic of pruned copies, as the stage builds pruned_int8_dynamic (no recovery)."""
    from tunery.vision.params import VisionPruneConfig
    from tunery.vision.prune import build_pruned
    from tunery.vision.variants import build

    files = {}
    for name, (layers, heads, ffn) in PRUNED.items():
        cfg = VisionPruneConfig(enabled=True, layers=layers, heads=heads, ffn_fraction=ffn)
        build_pruned(model, [calib[:64], calib[64:]], calib, cfg, work / f"{name}.fp32.onnx")
        files[name] = work / f"{name}.onnx"
        build("pruned_int8_dynamic", work / f"{name}.fp32.onnx", files[name], calib, work)
    return files


def torch_profile(model: Any, x: np.ndarray, runs: int = 20) -> dict[str, Any]:
    """PyTorch eager's own operators on one thread (torch.profiler, self CPU time per batch)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    xt = torch.from_numpy(x)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            model(pixel_values=xt)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(runs):
                    model(pixel_values=xt)
    finally:
        torch.set_num_threads(before)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return {
        "threads": 1,
        "self_cpu_ms_per_batch": round(total / runs / 1e3, 3),
        "ops_ms": {e.key: round(e.self_cpu_time_total / runs / 1e3, 3) for e in rows},
    }


def session(path: Path, threads: int, spin: bool) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    so.add_session_config_entry(SPIN, "1" if spin else "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def torch_call(model: Any, x: np.ndarray, threads: int) -> Any:
    import torch

    xt = torch.from_numpy(x)

    def run() -> None:
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                model(pixel_values=xt)
        finally:
            torch.set_num_threads(before)

    return run


def ort_call(s: Any, x: np.ndarray) -> Any:
    return ort_feed_call(s, {"pixel_values": x})


def ort_feed_call(s: Any, feed: dict[str, np.ndarray]) -> Any:
    return lambda: s.run(None, feed)


def interleaved(calls: dict[str, Any], rounds: int, clock: Any, reps: int = 4) -> dict[str, float]:
    for f in calls.values():
        f()
        f()
    t = {k: [] for k in calls}
    for _ in range(rounds):
        for k, f in calls.items():
            c = clock()
            for _ in range(reps):
                f()
            t[k].append((clock() - c) / reps)
    return {k: float(np.median(v)) for k, v in t.items()}


def op_profile(path: Path, x: np.ndarray, threads: int, runs: int = 40) -> dict[str, Any]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory() as d:
        so.profile_file_prefix = f"{d}/p"
        if threads:
            so.intra_op_num_threads = threads
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            s.run(None, {"pixel_values": x})
        events = json.loads(Path(s.end_profiling()).read_text())
    by: dict[str, float] = collections.defaultdict(float)
    model_run = [e["dur"] for e in events if e.get("name") == "model_run"]
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by[e["args"]["op_name"]] += e["dur"] / len(model_run) / 1e3
    total = sum(by.values())
    top = sorted(by.items(), key=lambda kv: -kv[1])[:10]
    return {
        "threads": threads or "default",
        "model_run_ms": round(float(np.median(model_run)) / 1e3, 3),
        "ops_ms": {k: round(v, 3) for k, v in top},
        "ops_share": {k: round(v / total, 3) for k, v in top},
    }


def text_spin(folder: Path, rounds: int) -> dict[str, Any]:
    """The text int8 folder at batch 64 (short texts, its own tokenizer), spinning vs not."""
    from transformers import AutoTokenizer

    texts = [f"a small example sentence number {i} about a kind of food" for i in range(64)]
    enc = AutoTokenizer.from_pretrained(str(folder))(texts, padding=True, return_tensors="np")
    calls = {}
    for spin in ("spin", "nospin"):
        s = session(folder / "model.onnx", 0, spin == "spin")
        names = {i.name for i in s.get_inputs()}
        feed = {k: v.astype(np.int64) for k, v in enc.items() if k in names}
        calls[spin] = ort_feed_call(s, feed)
    med = interleaved(calls, rounds, time.perf_counter)
    return {
        "texts_per_s": {k: round(64 / v, 1) for k, v in med.items()},
        "nospin_over_spin": round(med["spin"] / med["nospin"], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--finetune", help="a vision fine-tune folder (default: random weights)")
    ap.add_argument("--text", help="a text int8 model folder to time spinning vs not")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", type=Path, default=Path("bench/results/vision_int8-cpu.json"))
    args = ap.parse_args()
    import torch

    t0 = time.time()
    model = demo_model(args.finetune)
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 1.0, (args.batch, 1, 28, 28)).astype(np.float32)
    calib = torch.from_numpy(rng.normal(0.0, 1.0, (128, 1, 28, 28)).astype(np.float32))
    with tempfile.TemporaryDirectory(prefix="vision-int8-") as d:
        files, notes = build_variants(model, Path(d), calib)
        ref = model(pixel_values=torch.from_numpy(x)).logits.detach().numpy()
        agree = {
            k: float(
                (
                    session(p, 0, True).run(None, {"pixel_values": x})[0].argmax(-1)
                    == ref.argmax(-1)
                ).mean()
            )
            for k, p in files.items()
        }
        wall_calls = {"torch": torch_call(model, x, 0), "torch_1t": torch_call(model, x, 1)}
        for k, p in files.items():
            wall_calls[k] = ort_call(session(p, 0, True), x)
            wall_calls[f"{k}_nospin"] = ort_call(session(p, 0, False), x)
            wall_calls[f"{k}_1t"] = ort_call(session(p, 1, False), x)
        load_before = os.getloadavg()
        wall = interleaved(wall_calls, args.rounds, time.perf_counter)
        cpu_calls = {"torch": torch_call(model, x, 1)}
        cpu_calls |= {k: ort_call(session(p, 1, False), x) for k, p in files.items()}
        cpu = interleaved(cpu_calls, args.rounds * 2, time.thread_time)
        load_after = os.getloadavg()
        profiles = {
            f"{name}_{t or 'default'}t": op_profile(files[name], x, t)
            for name in ("int8_dynamic", "int8_dynamic_conv_quantized")
            for t in (1, 0)
        }
        profiles["fp32_1t"] = op_profile(files["fp32"], x, 1)
        profiles["pruned_heads3_ffn50_int8_1t"] = op_profile(
            files["pruned_heads3_ffn50_int8"], x, 1
        )
        profiles["torch_eager_1t"] = torch_profile(model, x)
    b = args.batch
    out = {
        "bench": "vision_int8",
        "command": " ".join(sys.argv),
        "host": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_avg_before": load_before,
            "load_avg_after": load_after,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        },
        "model": "trained: " + args.finetune if args.finetune else "random weights, demo size",
        "batch": b,
        "wall_images_per_s": {k: round(b / v, 1) for k, v in wall.items()},
        "wall_vs_torch_default_threads": {k: round(wall["torch"] / v, 3) for k, v in wall.items()},
        "wall_1t_vs_torch_1t": {
            k[:-3]: round(wall["torch_1t"] / v, 3) for k, v in wall.items() if k.endswith("_1t")
        },
        "cpu_ms_per_batch_1t": {k: round(v * 1e3, 3) for k, v in cpu.items()},
        "cpu_1t_vs_torch_1t": {k: round(cpu["torch"] / v, 3) for k, v in cpu.items()},
        "argmax_agreement_with_torch": agree,
        "op_profiles": profiles,
        **notes,
    }
    if args.text:
        out["text_int8_spinning"] = text_spin(Path(args.text), args.rounds)
    out["wall_seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for k in out["cpu_1t_vs_torch_1t"]:
        print(
            f"{k:30s} cpu-1t {out['cpu_1t_vs_torch_1t'][k]:5.2f}x  wall "
            f"{out['wall_vs_torch_default_threads'].get(k, 0):5.2f}x default threads, "
            f"{out['wall_vs_torch_default_threads'].get(k + '_nospin', 0):5.2f}x not spinning"
        )
    print("load", load_before, load_after)


if __name__ == "__main__":
    main()
