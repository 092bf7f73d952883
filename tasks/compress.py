"""compress: ONNX variants of the exported model, each checked on the task; deploy the best one.

Inputs:  `<export.out_dir>/{model.onnx, raw.onnx, tokenizer, labels.json}`, `<finetune.out_dir>/merged`
         (the PyTorch reference, and the source for pruning), `<prepare.out_dir>/{val,test}.parquet`
         (the accuracy checks; test alone for timing; val also fits the temperature),
         `<prepare.out_dir>/train.parquet` (calibration texts).
Outputs: `<variants_dir>/<variant>/` one deployable folder per variant kept (fp32, int8_dynamic, and
         when listed fp16, int8_static, with `prune.enabled` pruned_fp32/pruned_int8_dynamic when
         within budget); `<out_dir>/` the selected variant with its calibrated probabilities as a
         second graph output (model.onnx, tokenizer, labels.json, tunery_model.json), loadable on
         its own by `tunery.Predictor`; `<report_dir>/report.{json,md}`,
         `plots/compress/tradeoff.png`; `metrics/compress.json`.

Selection: the fastest variant on `target_provider` whose macro-F1 on val + test together is at
most `max_f1_drop` below the PyTorch model's (point estimate; a paired bootstrap 95 % interval is
reported beside it). A dynamic int8 variant over budget first keeps its most sensitive nodes in
float (`int8.max_fallback_nodes`); a variant whose quantization fails is recorded, not fatal. The
deployed graph gets `probabilities = Softmax(logits / T)`, T fitted on val (`tunery.calibration`).
The stage fails, writing nothing, if none qualifies or the target provider is not available here.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from tunery.config import CompressConfig, Params
from tunery.errors import TuneryError
from tunery.io import atomic_dir, write_json

log = logging.getLogger("tunery.compress")


def _one_line(info: dict[str, Any]) -> str:
    """A variant's result as one readable line (the full record is in the report)."""
    p = info["parity"]
    speeds = ", ".join(
        f"{prov} {b['throughput']:.0f} texts/s"
        for prov, b in info["bench"].items()
        if "throughput" in b
    )
    return (
        f"{info['size_mb']:.1f} MB, agreement {p['agreement']:.3f}, "
        f"macro-F1 {p['macro_f1_delta']:+.4f} vs PyTorch" + (f", {speeds}" if speeds else "")
    )


def _build(
    name: str,
    *,
    cfg: CompressConfig,
    export_dir: Path,
    work: Path,
    model: Any,
    tokenizer: Any,
    calib: Any,
    shape: tuple[str, int, int],
    opset: int,
    max_length: int,
) -> Path:
    """Write variant `name` as `<work>/<name>.onnx` and return the path."""
    from tunery import compression as comp
    from tunery import onnx_export as ox

    dest = work / f"{name}.onnx"
    model_type, heads, hidden = shape
    if name == "fp32":
        shutil.copyfile(export_dir / ox.MODEL_FILE, dest)
    elif name == "fp16":
        ox.optimize(
            export_dir / "raw.onnx",
            dest,
            model_type=model_type,
            num_heads=heads,
            hidden_size=hidden,
            use_gpu=True,
            fp16=True,
        )
    elif name == "int8_dynamic":
        comp.quantize_int8_dynamic(export_dir / ox.MODEL_FILE, dest, **cfg.int8.quantize_options())
    elif name == "int8_static":
        calib.rewind()
        comp.quantize_int8_static(export_dir / "raw.onnx", dest, calib, work)
    elif name.startswith("pruned_"):
        pruned_fp32 = work / "pruned_fp32.onnx"
        if not pruned_fp32.exists():
            comp.build_pruned(
                model,
                tokenizer,
                calib._feeds,
                pruned_fp32,
                heads=cfg.prune.heads,
                ffn_fraction=cfg.prune.ffn_fraction,
                opset=opset,
                max_length=max_length,
            )
        if name == "pruned_int8_dynamic":
            comp.quantize_int8_dynamic(pruned_fp32, dest, **cfg.int8.quantize_options())
    else:  # pragma: no cover - the config schema lists the names
        raise TuneryError(f"unknown variant {name!r}")
    return dest


JUDGED_SPLITS = ("val", "test")
JUDGED_NOTE = (
    "val and test together: neither was trained on (val chose finetune's best checkpoint and "
    "early stop, which touches both models alike, so the paired drop is unaffected); the frozen "
    "holdout stays for evaluate"
)


def _splits(data_dir: Path) -> dict[str, pd.DataFrame]:
    """The judged splits present (test is required; val too unless absent in old data folders)."""
    out = {}
    for name in JUDGED_SPLITS:
        path = data_dir / f"{name}.parquet"
        if path.is_file() or name == "test":
            out[name] = pd.read_parquet(path)
    return out


def run(
    cfg: CompressConfig,
    *,
    finetune_dir: Path,
    export_dir: Path,
    data_dir: Path,
    variants_dir: Path,
    out_dir: Path,
    report_dir: Path,
    plot_path: Path,
) -> dict[str, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunery import calibration as cal
    from tunery import compression as comp
    from tunery import onnx_export as ox
    from tunery.inference import encode

    ft = ox.load_finetuned(finetune_dir)
    export_manifest = ox.verify_model_dir(export_dir)
    opset = int(export_manifest["opset"])
    model = ox.load_torch_model(ft.merged_dir)  # eager attention: the graph the ONNX came from
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    shape = ox.model_shape(model)
    names = list(export_manifest.get("inputs") or ["input_ids", "attention_mask"])
    n = len(ft.labels)

    splits = _splits(data_dir)
    judged = pd.concat(splits.values(), ignore_index=True)
    rows = {name: len(df) for name, df in splits.items()}
    val_rows = rows.get("val", 0)  # judged rows [0, val_rows) are val, the rest test
    test_part = slice(val_rows, len(judged))
    train = pd.read_parquet(data_dir / "train.parquet")
    index = {label: i for i, label in enumerate(ft.labels)}
    y_true = judged["label"].map(index).to_numpy()
    encoded = encode(tokenizer, judged["text"].tolist(), ft.max_length)
    calib_texts = (
        train["text"].sample(n=min(cfg.calibration_samples, len(train)), random_state=0).tolist()
    )
    calib = comp.CalibrationReader(encode(tokenizer, calib_texts, ft.max_length), names)

    ref_logits = comp.run_batches(comp.torch_forward(model), encoded, cfg.batch_size, names, n)
    reference = comp.task_metrics(y_true, ref_logits.argmax(-1), n)

    providers = ["cpu"] + (["cuda"] if comp.cuda_usable(export_dir / ox.MODEL_FILE) else [])
    if cfg.target_provider not in providers:
        raise TuneryError(
            f"compress.target_provider is {cfg.target_provider!r} but this machine can only run "
            f"{providers}; run compress where onnxruntime-gpu and a GPU are, or target cpu"
        )
    b = cfg.bench
    # Timing runs on the test texts only (as before), whatever the judged rows are.
    singles, groups = comp.bench_inputs(
        encoded[test_part],
        runs=b.latency_runs,
        batch=b.throughput_batch,
        batches=b.throughput_batches,
    )
    import torch

    if b.threads:
        torch.set_num_threads(b.threads)
    # The speed baseline is PyTorch as usually run (default attention), fp32, on the CPU.
    eager = AutoModelForSequenceClassification.from_pretrained(str(ft.merged_dir)).eval()
    reference_bench = {
        "cpu": comp.bench(
            comp.torch_forward(eager),
            names,
            singles,
            groups,
            warmup=b.warmup,
            repeats=b.throughput_repeats,
        )
    }
    del eager

    def check(path: Path, on: str) -> tuple[np.ndarray, dict[str, Any]]:
        runner = comp.onnx_runner(path, on, threads=b.threads)
        logits = comp.run_batches(runner, encoded, cfg.batch_size, runner.input_names, n)
        p = comp.parity(ref_logits, logits, y_true)
        if cfg.bootstrap_resamples:
            p["macro_f1_delta_ci95"] = comp.bootstrap_f1_delta(
                y_true,
                ref_logits.argmax(-1),
                logits.argmax(-1),
                n,
                resamples=cfg.bootstrap_resamples,
                seed=cfg.seed,
            )
        return logits, p

    wanted = list(dict.fromkeys(cfg.variants))
    if cfg.prune.enabled:
        wanted += ["pruned_fp32", "pruned_int8_dynamic"]
    variants: dict[str, dict[str, Any]] = {}
    logits_of: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    rejected: list[str] = []
    rejected_variants: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(
        dir=variants_dir.parent if variants_dir.parent.exists() else None
    ) as scratch:
        work = Path(scratch)
        files: dict[str, Path] = {}
        started = time.monotonic()
        for i, name in enumerate(wanted):
            log.info(
                "variant %d/%d %s: building (elapsed %s)",
                i + 1,
                len(wanted),
                name,
                tqdm.format_interval(time.monotonic() - started),
            )
            targets = comp.VARIANT_TARGETS[name]
            check_on = cfg.target_provider if cfg.target_provider in targets else "cpu"
            check_on = check_on if check_on in providers else "cpu"
            try:
                path = _build(
                    name,
                    cfg=cfg,
                    export_dir=export_dir,
                    work=work,
                    model=model,
                    tokenizer=tokenizer,
                    calib=calib,
                    shape=shape,
                    opset=opset,
                    max_length=ft.max_length,
                )
                logits, par = check(path, check_on)
            except Exception as exc:  # a quantizer/provider failing on an operator
                if name == "fp32":
                    raise
                log.warning("variant %s failed: %s", name, exc)
                failed[name] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
                continue
            fallback = None
            if (
                name in ("int8_dynamic", "pruned_int8_dynamic")
                and -par["macro_f1_delta"] > cfg.max_f1_drop + 1e-12
                and cfg.int8.max_fallback_nodes
            ):
                source = (
                    work / "pruned_fp32.onnx"
                    if name.startswith("pruned_")
                    else (export_dir / ox.MODEL_FILE)
                )
                path, logits, par, fallback = _int8_fallback(
                    name, cfg, source, path, logits, par, calib, work, check, check_on
                )
            info: dict[str, Any] = {
                "targets": list(targets),
                "size_mb": round(ox.file_size(path) / 2**20, 3),
                "checked_on": check_on,
                "parity": par,
                "bench": {},
            }
            if fallback is not None:
                info["int8_fallback"] = fallback
            for prov in providers:
                try:
                    r = comp.onnx_runner(path, prov, threads=b.threads)
                    info["bench"][prov] = comp.bench(
                        r,
                        r.input_names,
                        singles,
                        groups,
                        warmup=b.warmup,
                        repeats=b.throughput_repeats,
                    )
                except TuneryError as exc:
                    info["bench"][prov] = {"error": str(exc)}
            log.info("variant %s: %s", name, _one_line(info))
            if name.startswith("pruned_") and -info["parity"]["macro_f1_delta"] > cfg.max_f1_drop:
                log.info("variant %s: outside the accuracy budget, not kept", name)
                rejected.append(name)
                rejected_variants[name] = info
                continue
            variants[name] = info
            logits_of[name] = logits
            files[name] = path

        selected, eligible = comp.select(
            variants, target=cfg.target_provider, max_f1_drop=cfg.max_f1_drop, rank_by=cfg.rank_by
        )
        # Temperature scaling on the deployed variant's own val logits (argmax unchanged).
        sel_logits = logits_of[selected]
        calibration = cal.calibrate(sel_logits[:val_rows], y_true[:val_rows], n, fitted_on="val")
        if calibration["fallback"]:
            log.warning("calibration: %s", calibration["fallback"])
        else:
            log.info(
                "calibration: T = %.4f, val ECE %.4f -> %.4f",
                calibration["temperature"],
                calibration["val_ece_before"],
                calibration["val_ece_after"],
            )
        deployed = work / "deploy.onnx"
        cal.add_probabilities(files[selected], deployed, calibration["temperature"])
        test_y = y_true[test_part]
        source = {
            "finetune": ft.info,
            "export_sha256": export_manifest["sha256"],
            "test_macro_f1": comp.task_metrics(test_y, sel_logits[test_part].argmax(-1), n)[
                "macro_f1"
            ],
            "judged_macro_f1": variants[selected]["parity"]["macro_f1"],
        }
        with atomic_dir(variants_dir) as tmp:
            for name, path in files.items():
                (tmp / name).mkdir()
                ox.write_model_dir(
                    tmp / name,
                    onnx_file=path,
                    tokenizer=tokenizer,
                    labels=ft.labels,
                    variant=name,
                    provider=variants[name]["targets"][0],
                    opset=opset,
                    max_length=ft.max_length,
                    source=source,
                )
        with atomic_dir(out_dir) as tmp:
            ox.write_model_dir(
                tmp,
                onnx_file=deployed,
                tokenizer=tokenizer,
                labels=ft.labels,
                variant=selected,
                provider=cfg.target_provider,
                opset=opset,
                max_length=ft.max_length,
                source=source,
                extra={
                    "inputs": names,
                    "outputs": ["logits", cal.PROBABILITIES],
                    "calibration": calibration,
                    "selection": {"rule": _rule(cfg), "eligible": eligible},
                },
            )
            ox.verify_model_dir(tmp)

    report = {
        "eval_rows": len(judged),
        "judged": {
            "splits": list(splits),
            "rows": rows,
            "note": JUDGED_NOTE,
            "bootstrap": {
                "resamples": cfg.bootstrap_resamples,
                "seed": cfg.seed,
                "level": 0.95,
                "paired": True,
            },
        },
        "reference": reference,
        "reference_bench": reference_bench,
        "providers": providers,
        "target_provider": cfg.target_provider,
        "rule": _rule(cfg),
        "selected": selected,
        # What the promotion gate reads: the deployable variant agrees with the PyTorch model on
        # the task within the budget (export's own fp32 parity check already passed or it failed).
        "parity_passed": bool(
            -variants[selected]["parity"]["macro_f1_delta"] <= cfg.max_f1_drop + 1e-12
        ),
        "calibration": calibration,
        "eligible": eligible,
        "rejected": rejected,
        "failed": failed,
        "prune": cfg.prune.model_dump() if cfg.prune.enabled else None,
        "bench_config": cfg.bench.model_dump(),
        "variants": variants,
        "rejected_variants": rejected_variants,
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    write_json(report_dir / "report.json", report)
    (report_dir / "report.md").write_text(comp.markdown(report))
    comp.plot_tradeoff(report, plot_path)
    sel = variants[selected]
    base = reference_bench["cpu"]["throughput"]
    return {
        "selected": selected,
        "selected_size_mb": sel["size_mb"],
        "selected_macro_f1_delta": sel["parity"]["macro_f1_delta"],
        "selected_macro_f1_delta_ci95": sel["parity"].get("macro_f1_delta_ci95"),
        "selected_agreement": sel["parity"]["agreement"],
        "reference_macro_f1": reference["macro_f1"],
        "judged_rows": len(judged),
        "calibration": calibration,
        "failed": failed,
        "variants": {
            name: {
                "size_mb": v["size_mb"],
                "macro_f1_delta": v["parity"]["macro_f1_delta"],
                "max_abs_logit_diff": v["parity"]["max_abs_logit_diff"],
                **{
                    f"{prov}_{k}": t[k]
                    for prov, t in v["bench"].items()
                    if "error" not in t
                    for k in ("latency_p50_ms", "throughput")
                },
                **(
                    {"cpu_speedup_vs_pytorch": round(v["bench"]["cpu"]["throughput"] / base, 2)}
                    if "error" not in v["bench"].get("cpu", {"error": 1})
                    else {}
                ),
                **(
                    {"float_nodes": len(v["int8_fallback"]["float_nodes"])}
                    if "int8_fallback" in v
                    else {}
                ),
            }
            for name, v in variants.items()
        },
    }


def _int8_fallback(
    name: str,
    cfg: CompressConfig,
    source: Path,
    path: Path,
    logits: Any,
    par: dict[str, Any],
    calib: Any,
    work: Path,
    check: Any,
    check_on: str,
) -> tuple[Path, Any, dict[str, Any], dict[str, Any]]:
    """Keep the most sensitive quantized nodes of `name` in float until it is within budget."""
    from tunery import compression as comp
    from tunery import int8_fallback as fb

    log.info(
        "variant %s: macro-F1 drop %.4f > %.4f, trying the accuracy-aware fallback",
        name,
        -par["macro_f1_delta"],
        cfg.max_f1_drop,
    )
    ranked = fb.node_sensitivity(source, path, calib._feeds, threads=cfg.bench.threads)
    seen: dict[Path, tuple[Any, dict[str, Any]]] = {}

    def build(nodes: list[str]) -> Path:
        dest = work / f"{name}.fallback{len(nodes)}.onnx"
        comp.quantize_int8_dynamic(source, dest, **cfg.int8.quantize_options(), float_nodes=nodes)
        return dest

    def drop(p: Path) -> float:
        seen[p] = check(p, check_on)
        return -seen[p][1]["macro_f1_delta"]

    result = fb.tune(
        list(ranked),
        cap=cfg.int8.max_fallback_nodes,
        build=build,
        drop=drop,
        max_drop=cfg.max_f1_drop,
    )
    record = {
        "quantized_macro_f1_delta": par["macro_f1_delta"],
        "sensitivity": {k: round(v, 5) for k, v in list(ranked.items())[:16]},
        "tries": result["tries"],
        "within_budget": result["within_budget"],
        "float_nodes": result["nodes"],
    }
    best = result["path"]
    if best is None or seen[best][1]["macro_f1_delta"] <= par["macro_f1_delta"]:
        # No try did better than plain quantization: keep it (still outside the budget).
        record["float_nodes"] = []
        return path, logits, par, record
    return best, seen[best][0], seen[best][1], record


def _rule(cfg: CompressConfig) -> str:
    speed = "throughput" if cfg.rank_by == "throughput" else "batch-1 p50 latency"
    return (
        f"fastest ({speed}) variant on {cfg.target_provider} whose macro-F1 drop vs PyTorch "
        f"(point estimate on val+test) is <= {cfg.max_f1_drop}; the paired bootstrap 95 % "
        "interval is reported, not used"
    )


def _stage(params: Params, root: Path, tracking_run: Any) -> dict[str, Any]:
    cfg = params.compress
    report_dir = root / cfg.report_dir
    plot = root / "plots" / "compress" / "tradeoff.png"
    metrics = run(
        cfg,
        finetune_dir=root / params.finetune.out_dir,
        export_dir=root / params.export.out_dir,
        data_dir=root / params.prepare.out_dir,
        variants_dir=root / cfg.variants_dir,
        out_dir=root / cfg.out_dir,
        report_dir=report_dir,
        plot_path=plot,
    )
    tracking_run.log_artifact(report_dir, "compress")
    tracking_run.log_artifact(plot, "compress")
    tracking_run.log_dict(
        json.loads((root / cfg.out_dir / "tunery_model.json").read_text()), "compress/deploy.json"
    )
    tracking_run.set_tags({"tunery.compress.selected": metrics["selected"]})
    return metrics


def main(argv: list[str] | None = None) -> None:
    from tunery.stage import stage_main

    stage_main("compress", _stage, argv)


if __name__ == "__main__":
    main()
