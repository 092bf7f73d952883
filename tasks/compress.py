"""compress: ONNX variants of the exported model, each checked on the task; deploy the best one.

Inputs:  `<export.out_dir>/{model.onnx, raw.onnx, tokenizer, labels.json}`, `<finetune.out_dir>/merged`
         (the PyTorch reference, and the source for pruning), `<prepare.out_dir>/test.parquet`
         (checks and timing), `<prepare.out_dir>/train.parquet` (calibration texts).
Outputs: `<variants_dir>/<variant>/` one deployable folder per variant kept (fp32, fp16,
         int8_dynamic, int8_static, and with `prune.enabled` pruned_fp32/pruned_int8_dynamic when
         within budget); `<out_dir>/` the selected variant (model.onnx, tokenizer, labels.json,
         tunery_model.json), loadable on its own by `tunery.Predictor`;
         `<report_dir>/report.{json,md}`, `plots/compress/tradeoff.png`; `metrics/compress.json`.

Selection: the fastest variant on `target_provider` whose test macro-F1 is at most `max_f1_drop`
below the PyTorch model's. The stage fails, writing nothing, if none qualifies or the target
provider is not available here.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from tunery.config import CompressConfig, Params
from tunery.errors import TuneryError
from tunery.io import atomic_dir, write_json

log = logging.getLogger("tunery.compress")


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
        comp.quantize_int8_dynamic(export_dir / ox.MODEL_FILE, dest, **cfg.int8.model_dump())
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
            comp.quantize_int8_dynamic(pruned_fp32, dest, **cfg.int8.model_dump())
    else:  # pragma: no cover - the config schema lists the names
        raise TuneryError(f"unknown variant {name!r}")
    return dest


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

    test = pd.read_parquet(data_dir / "test.parquet")
    train = pd.read_parquet(data_dir / "train.parquet")
    index = {label: i for i, label in enumerate(ft.labels)}
    y_true = test["label"].map(index).to_numpy()
    encoded = encode(tokenizer, test["text"].tolist(), ft.max_length)
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
    singles, groups = comp.bench_inputs(
        encoded, runs=b.latency_runs, batch=b.throughput_batch, batches=b.throughput_batches
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

    wanted = list(dict.fromkeys(cfg.variants))
    if cfg.prune.enabled:
        wanted += ["pruned_fp32", "pruned_int8_dynamic"]
    variants: dict[str, dict[str, Any]] = {}
    rejected: list[str] = []
    rejected_variants: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(
        dir=variants_dir.parent if variants_dir.parent.exists() else None
    ) as scratch:
        work = Path(scratch)
        files: dict[str, Path] = {}
        for name in wanted:
            log.info("variant %s: building", name)
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
            targets = comp.VARIANT_TARGETS[name]
            check_on = cfg.target_provider if cfg.target_provider in targets else "cpu"
            check_on = check_on if check_on in providers else "cpu"
            runner = comp.onnx_runner(path, check_on, threads=b.threads)
            logits = comp.run_batches(runner, encoded, cfg.batch_size, runner.input_names, n)
            info: dict[str, Any] = {
                "targets": list(targets),
                "size_mb": round(ox.file_size(path) / 2**20, 3),
                "checked_on": check_on,
                "parity": comp.parity(ref_logits, logits, y_true),
                "bench": {},
            }
            for prov in providers:
                try:
                    r = (
                        runner
                        if prov == check_on
                        else comp.onnx_runner(path, prov, threads=b.threads)
                    )
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
            log.info("variant %s: %s", name, {k: info[k] for k in ("size_mb", "parity", "bench")})
            if name.startswith("pruned_") and -info["parity"]["macro_f1_delta"] > cfg.max_f1_drop:
                log.info("variant %s: outside the accuracy budget, not kept", name)
                rejected.append(name)
                rejected_variants[name] = info
                continue
            variants[name] = info
            files[name] = path

        selected, eligible = comp.select(
            variants, target=cfg.target_provider, max_f1_drop=cfg.max_f1_drop, rank_by=cfg.rank_by
        )
        source = {
            "finetune": ft.info,
            "export_sha256": export_manifest["sha256"],
            "test_macro_f1": variants[selected]["parity"]["macro_f1"],
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
                onnx_file=files[selected],
                tokenizer=tokenizer,
                labels=ft.labels,
                variant=selected,
                provider=cfg.target_provider,
                opset=opset,
                max_length=ft.max_length,
                source=source,
                extra={"inputs": names, "selection": {"rule": _rule(cfg), "eligible": eligible}},
            )

    report = {
        "eval_rows": len(test),
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
        "eligible": eligible,
        "rejected": rejected,
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
        "selected_agreement": sel["parity"]["agreement"],
        "reference_macro_f1": reference["macro_f1"],
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
            }
            for name, v in variants.items()
        },
    }


def _rule(cfg: CompressConfig) -> str:
    speed = "throughput" if cfg.rank_by == "throughput" else "batch-1 p50 latency"
    return f"fastest ({speed}) variant on {cfg.target_provider} with macro-F1 drop <= {cfg.max_f1_drop}"


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
