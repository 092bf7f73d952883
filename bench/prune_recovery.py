"""The compress stage itself with pruned candidates, one run per pruning/recovery setting.

On a finished text project (after `tunery run`), each setting is `compress.prune` (+ overrides)
on top of the project's params.yaml `compress:` section, run through `tasks.compress.run` into a
scratch folder: the same export, int8, judgement and throughput ranking as the stage. Per
setting: every variant's ΔmacroF1 vs PyTorch on the judged rows (val + test), its throughput
over PyTorch eager's (the compress report's × PyTorch column, measured in the same run), what
was selected, and the pruning/recovery record (seconds, PyTorch drop before/after recovery).

    PYTHONPATH=. python bench/prune_recovery.py PROJECT OUT.json \\
        '[{"heads": 2, "ffn_fraction": 0.5, "recovery": {"steps": 300, "hidden_weight": 1.0}}]'

Each row also has `x_int8`: the throughput over the same run's int8_dynamic (the load moves
PyTorch eager more than onnxruntime, so that ratio is the steadier one between runs).

`--speed` instead times the pruned shapes only, side by side in one process: every setting
pruned as it is (no recovery: the speed does not depend on the weights), exported, int8
quantized like the stage does, then PyTorch eager, the export's fp32 and int8 and every
setting's pruned fp32/int8 timed round-robin (`--rounds` passes each, the median kept), with the
process CPU time per text next to the wall-clock throughput. Also each setting's macro-F1 drop as
pruned (before any recovery).
"""

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from tasks import compress
from tunery.config import load_params
from tunery.onnx import compress_report


def one(root: Path, params, prune: dict, work: Path) -> dict:
    cfg = params.compress.model_copy(
        update={"prune": params.compress.prune.model_validate({"enabled": True, **prune})}
    )
    t0 = time.monotonic()
    compress.run(
        cfg,
        finetune_dir=root / params.finetune.out_dir,
        export_dir=root / params.export.out_dir,
        data_dir=root / params.prepare.out_dir,
        variants_dir=work / "variants",
        out_dir=work / "deploy",
        report_dir=work / "report",
        plot_path=work / "tradeoff.png",
    )
    report = compress_report.read(work / "report")
    ref = report["reference_bench"]["cpu"]["throughput"]
    int8 = report["variants"].get("int8_dynamic", {}).get("bench", {}).get("cpu", {})
    int8 = int8.get("throughput")
    rows = {}
    for group in ("variants", "rejected_variants"):
        for name, v in report[group].items():
            rows[name] = {
                "macro_f1_delta": v["parity"]["macro_f1_delta"],
                "ci95": v["parity"].get("macro_f1_delta_ci95"),
                "x_pytorch": round(v["bench"]["cpu"]["throughput"] / ref, 3),
                "x_int8": round(v["bench"]["cpu"]["throughput"] / int8, 3) if int8 else None,
                "kept": group == "variants",
                "float_nodes": len((v.get("int8_fallback") or {}).get("float_nodes", [])),
            }
    pruning = next((v["pruning"] for v in report["rejected_variants"].values()), None) or next(
        (v["pruning"] for v in report["variants"].values() if v.get("pruning")), None
    )
    return {
        "prune": prune,
        "selected": report["selected"],
        "pytorch_texts_per_s": ref,
        "variants": rows,
        "pruning": pruning,
        "stage_s": round(time.monotonic() - t0, 1),
    }


def speed(root: Path, params, settings: list[dict], work: Path, rounds: int) -> dict:
    """The pruned shapes' speed side by side (see the module docstring)."""
    import numpy as np

    from tunery.onnx import compress as comp
    from tunery.onnx import export as ox
    from tunery.onnx import variants as vs
    from tunery.onnx.runtime import length_batches

    cfg = params.compress
    setup = vs.load_setup(
        cfg,
        finetune_dir=root / params.finetune.out_dir,
        export_dir=root / params.export.out_dir,
        data_dir=root / params.prepare.out_dir,
    )
    _, groups = vs.bench_inputs(cfg, setup)
    export_dir = root / params.export.out_dir
    graphs = {"fp32": export_dir / ox.MODEL_FILE, "int8_dynamic": work / "int8.onnx"}
    comp.quantize_int8_dynamic(
        graphs["fp32"], graphs["int8_dynamic"], **cfg.int8.quantize_options()
    )
    drops = {}
    for i, prune in enumerate(settings):
        pr = cfg.prune.model_validate({"enabled": True, **prune})
        fp32, int8 = work / f"s{i}.onnx", work / f"s{i}.int8.onnx"
        comp.build_pruned(
            setup.model,
            setup.tokenizer,
            setup.calib._feeds,
            fp32,
            heads=pr.heads,
            ffn_fraction=pr.ffn_fraction,
            layers=pr.layers,
            layer_choice=pr.layer_choice,
            opset=setup.opset,
            max_length=setup.ft.max_length,
        )
        comp.quantize_int8_dynamic(fp32, int8, **cfg.int8.quantize_options())
        graphs[f"s{i}_fp32"], graphs[f"s{i}_int8"] = fp32, int8
        drops[f"s{i}"] = -setup.judge.check(int8, "cpu")[1]["macro_f1_delta"]
    forwards = {name: comp.onnx_runner(path, "cpu") for name, path in graphs.items()}
    forwards["pytorch_fp32"] = _eager(setup)
    wall: dict[str, list[float]] = {n: [] for n in forwards}
    cpu: dict[str, list[float]] = {n: [] for n in forwards}
    texts = sum(len(g) for g in groups)
    feeds = [next(length_batches(g, len(g), setup.names, sort=False))[1] for g in groups]
    for fwd in forwards.values():  # warm-up
        fwd(feeds[0])
    for _ in range(rounds):
        for name, fwd in forwards.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for feed in feeds:
                fwd(feed)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = {n: float(np.median(v)) for n, v in wall.items()}
    med_cpu = {n: float(np.median(v)) for n, v in cpu.items()}
    rows = {
        n: {
            "x_pytorch": round(med["pytorch_fp32"] / med[n], 3),
            "x_int8": round(med["int8_dynamic"] / med[n], 3),
            "cpu_x_pytorch": round(med_cpu["pytorch_fp32"] / med_cpu[n], 3),
            "cpu_ms_per_text": round(med_cpu[n] / texts * 1e3, 3),
        }
        for n in forwards
    }
    return {
        "settings": {f"s{i}": s for i, s in enumerate(settings)},
        "int8_macro_f1_drop_as_pruned": {k: round(v, 5) for k, v in drops.items()},
        "rounds": rounds,
        "texts_per_pass": texts,
        "load_average_end": os.getloadavg(),
        "graphs": rows,
    }


def _eager(setup):
    """PyTorch eager fp32 as the stage times it (`variants.reference_bench`)."""
    from transformers import AutoModelForSequenceClassification

    from tunery.onnx import compress as comp

    path = str(setup.ft.merged_dir)
    return comp.torch_forward(AutoModelForSequenceClassification.from_pretrained(path).eval())


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("tunery").setLevel(logging.INFO)
    ap = argparse.ArgumentParser()
    ap.add_argument("project", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("settings", type=json.loads)
    ap.add_argument("--speed", action="store_true", help="time the pruned shapes only")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    root, out = args.project, args.out
    params = load_params(root / "params.yaml")
    results = json.loads(out.read_text()) if out.exists() else []
    if args.speed:
        with tempfile.TemporaryDirectory() as tmp:
            row = {"load_average_start": os.getloadavg()}
            row.update(speed(root, params, args.settings, Path(tmp), args.rounds))
        print(json.dumps(row, indent=1), flush=True)
        results.append(row)
        out.write_text(json.dumps(results, indent=1) + "\n")
        return
    for prune in args.settings:
        with tempfile.TemporaryDirectory() as tmp:
            row = {"load_average_start": os.getloadavg()}
            row.update(one(root, params, prune, Path(tmp)))
        row["load_average_end"] = os.getloadavg()
        print(json.dumps(row), flush=True)
        results.append(row)
        out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
