"""Compression variants of the exported model, judged, benchmarked and one selected and calibrated.

The compress stage's work: every candidate in `compress.variants` (fp32, fp16, int8 dynamic/static,
pruned) is built from the export, judged against the PyTorch model on val+test (paired: the same
rows), benchmarked on each usable provider, and the fastest within `compress.max_f1_drop` is
selected, temperature-calibrated on val and written as the deployable folder.
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from tunery.config import CompressConfig
from tunery.errors import TuneryError
from tunery.io import atomic_dir

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
    calib: Any,
    shape: tuple[str, int, int],
) -> Path:
    """Write variant `name` as `<work>/<name>.onnx` and return the path."""
    from tunery.onnx import compress as comp
    from tunery.onnx import export as ox

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
            raise TuneryError(f"variant {name}: build the pruned model first (`build_pruned`)")
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


@dataclass
class Judge:
    """What every variant is judged against: the PyTorch logits on the judged rows (val + test)."""

    cfg: CompressConfig
    encoded: Any
    y_true: np.ndarray
    ref_logits: np.ndarray
    n: int
    val_rows: int  # judged rows [0, val_rows) are val, the rest test

    @property
    def test_part(self) -> slice:
        return slice(self.val_rows, len(self.y_true))

    def check(self, path: Path, on: str) -> tuple[np.ndarray, dict[str, Any]]:
        """The variant's logits on the judged rows and its parity with PyTorch."""
        from tunery.onnx import compress as comp

        cfg = self.cfg
        runner = comp.onnx_runner(path, on, threads=cfg.bench.threads)
        logits = comp.run_batches(runner, self.encoded, cfg.batch_size, runner.input_names, self.n)
        p = comp.parity(self.ref_logits, logits, self.y_true)
        if cfg.bootstrap_resamples:
            p["macro_f1_delta_ci95"] = comp.bootstrap_f1_delta(
                self.y_true,
                self.ref_logits.argmax(-1),
                logits.argmax(-1),
                self.n,
                resamples=cfg.bootstrap_resamples,
                seed=cfg.seed,
            )
        return logits, p


@dataclass
class Setup:
    """The stage's inputs, loaded once: the fine-tune, the export, the judged data."""

    ft: Any
    manifest: dict[str, Any]
    model: Any
    tokenizer: Any
    names: list[str]
    splits: dict[str, pd.DataFrame]
    judge: Judge
    calib: Any
    reference: dict[str, Any]
    providers: list[str]
    train: Any = None  # tunery.onnx.distill.RecoveryData, when the pruned model is recovered
    pruning: dict[str, Any] | None = None  # what `build_pruned` did

    @property
    def opset(self) -> int:
        return int(self.manifest["opset"])


@dataclass
class Candidates:
    """The variants built: kept (with logits and files), rejected (pruned, over budget), failed."""

    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    logits_of: dict[str, np.ndarray] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)
    rejected_variants: dict[str, dict[str, Any]] = field(default_factory=dict)


def load_setup(
    cfg: CompressConfig, *, finetune_dir: Path, export_dir: Path, data_dir: Path
) -> Setup:
    from transformers import AutoTokenizer

    from tunery.data.tokens import unpadded
    from tunery.onnx import compress as comp
    from tunery.onnx import export as ox

    ft = ox.load_finetuned(finetune_dir)
    manifest = ox.verify_model_dir(export_dir)
    model = ox.load_torch_model(ft.merged_dir)  # eager attention: the graph the ONNX came from
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    names = list(manifest.get("inputs") or ["input_ids", "attention_mask"])
    n = len(ft.labels)
    splits = _splits(data_dir)
    judged = pd.concat(splits.values(), ignore_index=True)
    train = pd.read_parquet(data_dir / "train.parquet")
    index = {label: i for i, label in enumerate(ft.labels)}
    y_true = judged["label"].map(index).to_numpy()
    encoded = unpadded(tokenizer, judged["text"].tolist(), max_length=ft.max_length)
    calib_texts = (
        train["text"].sample(n=min(cfg.calibration_samples, len(train)), random_state=0).tolist()
    )
    calib = comp.CalibrationReader(
        unpadded(tokenizer, calib_texts, max_length=ft.max_length), names
    )
    ref_logits = comp.run_batches(comp.torch_forward(model), encoded, cfg.batch_size, names, n)
    judge = Judge(cfg, encoded, y_true, ref_logits, n, val_rows=len(splits.get("val", ())))
    providers = ["cpu"] + (["cuda"] if comp.cuda_usable(export_dir / ox.MODEL_FILE) else [])
    if cfg.target_provider not in providers:
        raise TuneryError(
            f"compress.target_provider is {cfg.target_provider!r} but this machine can only run "
            f"{providers}; run compress where onnxruntime-gpu and a GPU are, or target cpu"
        )
    train_data = None
    if cfg.prune.enabled and cfg.prune.recovery.steps:
        from tunery.onnx.distill import RecoveryData

        train_data = RecoveryData(
            unpadded(tokenizer, train["text"].tolist(), max_length=ft.max_length),
            _label_ids(train, index, data_dir / "train.parquet"),
            names,
        )
    return Setup(
        ft=ft,
        manifest=manifest,
        model=model,
        tokenizer=tokenizer,
        names=names,
        splits=splits,
        judge=judge,
        calib=calib,
        reference=comp.task_metrics(y_true, ref_logits.argmax(-1), n),
        providers=providers,
        train=train_data,
    )


def _label_ids(df: pd.DataFrame, index: dict[str, int], path: Path) -> np.ndarray:
    ids = df["label"].map(index)
    if ids.isna().any():
        unknown = sorted(set(df.loc[ids.isna(), "label"].astype(str)))[:5]
        raise TuneryError(f"{path}: labels {unknown} are not among the fine-tune's labels")
    return ids.to_numpy(dtype=np.int64)


def bench_inputs(cfg: CompressConfig, setup: Setup) -> tuple[Any, Any]:
    """Timing runs on the test texts only (as before), whatever the judged rows are."""
    from tunery.onnx import compress as comp

    b = cfg.bench
    return comp.bench_inputs(
        setup.judge.encoded[setup.judge.test_part],
        runs=b.latency_runs,
        batch=b.throughput_batch,
        batches=b.throughput_batches,
    )


def reference_bench(cfg: CompressConfig, setup: Setup, singles: Any, groups: Any) -> dict:
    """The speed baseline: PyTorch as usually run (default attention), fp32, on the CPU."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from tunery.onnx import compress as comp

    b = cfg.bench
    if b.threads:
        torch.set_num_threads(b.threads)
    eager = AutoModelForSequenceClassification.from_pretrained(str(setup.ft.merged_dir)).eval()
    return {
        "cpu": comp.bench(
            comp.torch_forward(eager),
            setup.names,
            singles,
            groups,
            warmup=b.warmup,
            repeats=b.throughput_repeats,
        )
    }


def wanted_variants(cfg: CompressConfig) -> list[str]:
    wanted = list(dict.fromkeys(cfg.variants))
    if cfg.prune.enabled:
        wanted += ["pruned_fp32", "pruned_int8_dynamic"]
    return wanted


def build_variants(
    cfg: CompressConfig, setup: Setup, *, export_dir: Path, work: Path, singles, groups
) -> Candidates:
    """Build, judge and benchmark every wanted variant; pruned ones over budget are not kept."""
    out, timed = Candidates(), {}
    wanted = wanted_variants(cfg)
    started = time.monotonic()
    for i, name in enumerate(wanted):
        log.info(
            "variant %d/%d %s: building (elapsed %s)",
            i + 1,
            len(wanted),
            name,
            tqdm.format_interval(time.monotonic() - started),
        )
        variant_started = time.monotonic()
        try:
            path, check_on = _build_variant(name, cfg, setup, export_dir=export_dir, work=work)
            logits, par = setup.judge.check(path, check_on)
        except Exception as exc:  # a quantizer/provider failing on an operator
            if name == "fp32":
                raise
            log.warning("variant %s failed: %s", name, exc)
            out.failed[name] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            continue
        path, logits, info = _record(
            name, cfg, setup, path, logits, par, check_on, export_dir, work
        )
        info["build_s"] = round(time.monotonic() - variant_started, 1)
        if name.startswith("pruned_") and setup.pruning:
            info["pruning"] = setup.pruning
        if name.startswith("pruned_") and -info["parity"]["macro_f1_delta"] > cfg.max_f1_drop:
            log.info("variant %s: outside the accuracy budget, not kept", name)
            out.rejected.append(name)
            out.rejected_variants[name] = info
            timed[name] = path
            continue
        out.variants[name], out.logits_of[name], out.files[name] = info, logits, path
        timed[name] = path
    # Timed together once all are built: the pruned model's recovery takes minutes, and on a
    # shared machine the load moves in between (side by side measured the pruned int8 at
    # 0.99x PyTorch after the recovery vs 2.37x for the int8 timed before it).
    for name, path in timed.items():
        info = out.variants.get(name) or out.rejected_variants[name]
        info["bench"] = _bench_variant(cfg, setup.providers, path, singles, groups)
        log.info("variant %s: %s", name, _one_line(info))
    return out


def _build_variant(
    name: str, cfg: CompressConfig, setup: Setup, *, export_dir: Path, work: Path
) -> tuple[Path, str]:
    """Build variant `name`; where it is judged (its target provider when usable, else cpu)."""
    from tunery.onnx import compress as comp
    from tunery.onnx import export as ox

    targets = comp.VARIANT_TARGETS[name]
    check_on = cfg.target_provider if cfg.target_provider in targets else "cpu"
    check_on = check_on if check_on in setup.providers else "cpu"
    if name.startswith("pruned_") and not (work / "pruned_fp32.onnx").exists():
        build_pruned(cfg, setup, work / "pruned_fp32.onnx")
    path = _build(
        name,
        cfg=cfg,
        export_dir=export_dir,
        work=work,
        calib=setup.calib,
        shape=ox.model_shape(setup.model),
    )
    return path, check_on


def build_pruned(cfg: CompressConfig, setup: Setup, dest: Path) -> dict[str, Any]:
    """The pruned model (layers, heads, FFN), distilled back towards the fine-tune when
    `prune.recovery.steps`, as fp32 ONNX at `dest`; what it did is kept in `setup.pruning`
    (every pruned_* variant's record shows it: what the pruning cost and the recovery bought)."""
    from tunery.onnx import compress as comp

    started = time.monotonic()
    setup.pruning = comp.build_pruned(
        setup.model,
        setup.tokenizer,
        setup.calib._feeds,
        dest,
        heads=cfg.prune.heads,
        ffn_fraction=cfg.prune.ffn_fraction,
        layers=cfg.prune.layers,
        layer_choice=cfg.prune.layer_choice,
        opset=setup.opset,
        max_length=setup.ft.max_length,
        recover=functools.partial(_recover, cfg, setup),
    )
    setup.pruning["seconds"] = round(time.monotonic() - started, 1)
    return setup.pruning


def _recover(
    cfg: CompressConfig, setup: Setup, pruned: Any, teacher_layers: list[int]
) -> tuple[Any, dict[str, Any]]:
    """The pruned PyTorch model's macro-F1 drop on the judged rows before and after the
    distillation recovery (`tunery.onnx.distill`; none with `recovery.steps: 0`); the
    hidden-state term compares each kept layer with the teacher layer it came from."""
    from tunery.onnx import compress as comp
    from tunery.onnx import distill

    j, rec = setup.judge, cfg.prune.recovery
    ref_f1 = setup.reference["macro_f1"]

    def drop(model: Any) -> float:
        logits = comp.run_batches(
            comp.torch_forward(model.eval()), j.encoded, cfg.batch_size, setup.names, j.n
        )
        return ref_f1 - comp.task_metrics(j.y_true, logits.argmax(-1), j.n)["macro_f1"]

    record: dict[str, Any] = {"macro_f1_drop_pruned": round(drop(pruned), 5)}
    if rec.steps:
        if setup.train is None:
            raise TuneryError("compress.prune.recovery: no training texts were loaded")
        pruned, done = distill.recover(
            pruned, setup.model, setup.train, rec, teacher_layers=teacher_layers
        )
        record.update(done, macro_f1_drop_recovered=round(drop(pruned), 5))
    log.info("pruned model (PyTorch) on the judged rows: %s", record)
    return pruned, record


def _record(
    name: str,
    cfg: CompressConfig,
    setup: Setup,
    path: Path,
    logits: np.ndarray,
    par: dict[str, Any],
    check_on: str,
    export_dir: Path,
    work: Path,
) -> tuple[Path, np.ndarray, dict[str, Any]]:
    """A judged variant's record; an int8 one over budget first tries the accuracy fallback."""
    from tunery.onnx import compress as comp
    from tunery.onnx import export as ox

    fallback = None
    if (
        name in ("int8_dynamic", "pruned_int8_dynamic")
        and -par["macro_f1_delta"] > cfg.max_f1_drop + 1e-12
        and cfg.int8.max_fallback_nodes
    ):
        source = (
            work / "pruned_fp32.onnx" if name.startswith("pruned_") else export_dir / ox.MODEL_FILE
        )
        path, logits, par, fallback = _int8_fallback(
            name, cfg, source, path, logits, par, setup.calib, work, setup.judge.check, check_on
        )
    info: dict[str, Any] = {
        "targets": list(comp.VARIANT_TARGETS[name]),
        "size_mb": round(ox.file_size(path) / 2**20, 3),
        "checked_on": check_on,
        "parity": par,
        "bench": {},
    }
    if fallback is not None:
        info["int8_fallback"] = fallback
    return path, logits, info


def _bench_variant(cfg: CompressConfig, providers: list[str], path: Path, singles, groups) -> dict:
    from tunery.onnx import compress as comp

    b, out = cfg.bench, {}
    for prov in providers:
        try:
            r = comp.onnx_runner(path, prov, threads=b.threads)
            out[prov] = comp.bench(
                r, r.input_names, singles, groups, warmup=b.warmup, repeats=b.throughput_repeats
            )
        except TuneryError as exc:
            out[prov] = {"error": str(exc)}
    return out


def calibrate(setup: Setup, logits: np.ndarray) -> dict[str, Any]:
    """Temperature scaling on the deployed variant's own logits on every judged row (val + test).

    A temperature cannot change an argmax, and argmax (the macro-F1 budget) is all test is used
    for here, so test's rows can fit the one scalar too: on the demo that is 800 rows instead of
    val's 398, which halves the variance of the fitted T (the holdout, never seen here, is where
    the served ECE is measured). Without a val split the fit uses test alone.
    """
    from tunery.onnx import calibration as cal

    j = setup.judge
    fitted_on = "val+test" if j.val_rows else "test"
    calibration = cal.calibrate(logits, j.y_true, j.n, fitted_on=fitted_on)
    if calibration["fallback"]:
        log.warning("calibration: %s", calibration["fallback"])
    else:
        log.info(
            "calibration: T = %.4f fitted on %s (%d rows), ECE there %.4f -> %.4f",
            calibration["temperature"],
            fitted_on,
            calibration["rows"],
            calibration["val_ece_before"],
            calibration["val_ece_after"],
        )
    return calibration


def write_outputs(
    cfg: CompressConfig,
    setup: Setup,
    built: Candidates,
    *,
    selected: str,
    eligible: Any,
    calibration: dict[str, Any],
    work: Path,
    variants_dir: Path,
    out_dir: Path,
) -> None:
    """Every kept variant as a model folder, and the selected one, calibrated, as the deployable."""
    from tunery.onnx import calibration as cal
    from tunery.onnx import compress as comp
    from tunery.onnx import export as ox

    ft, j = setup.ft, setup.judge
    deployed = work / "deploy.onnx"
    cal.add_probabilities(built.files[selected], deployed, calibration["temperature"])
    test_logits = built.logits_of[selected][j.test_part]
    source = {
        "finetune": ft.info,
        "export_sha256": setup.manifest["sha256"],
        "test_macro_f1": comp.task_metrics(j.y_true[j.test_part], test_logits.argmax(-1), j.n)[
            "macro_f1"
        ],
        "judged_macro_f1": built.variants[selected]["parity"]["macro_f1"],
    }
    common = dict(
        tokenizer=setup.tokenizer,
        labels=ft.labels,
        opset=setup.opset,
        max_length=ft.max_length,
        source=source,
    )
    with atomic_dir(variants_dir) as tmp:
        for name, path in built.files.items():
            (tmp / name).mkdir()
            ox.write_model_dir(
                tmp / name,
                onnx_file=path,
                variant=name,
                provider=built.variants[name]["targets"][0],
                **common,
            )
    with atomic_dir(out_dir) as tmp:
        ox.write_model_dir(
            tmp,
            onnx_file=deployed,
            variant=selected,
            provider=cfg.target_provider,
            **common,
            extra={
                "inputs": setup.names,
                "outputs": ["logits", cal.PROBABILITIES],
                "calibration": calibration,
                "selection": {"rule": _rule(cfg), "eligible": eligible},
            },
        )
        ox.verify_model_dir(tmp)


def report(
    cfg: CompressConfig,
    setup: Setup,
    built: Candidates,
    *,
    reference_bench: dict,
    selected: str,
    eligible: Any,
    calibration: dict[str, Any],
) -> dict[str, Any]:
    """The compress report (`tunery.onnx.compress_report`): what was judged, how, every variant and
    why the selected one."""
    rows = {name: len(df) for name, df in setup.splits.items()}
    return {
        "eval_rows": sum(rows.values()),
        "judged": {
            "splits": list(setup.splits),
            "rows": rows,
            "note": JUDGED_NOTE,
            "bootstrap": {
                "resamples": cfg.bootstrap_resamples,
                "seed": cfg.seed,
                "level": 0.95,
                "paired": True,
            },
        },
        "reference": setup.reference,
        "reference_bench": reference_bench,
        "providers": setup.providers,
        "target_provider": cfg.target_provider,
        "rule": _rule(cfg),
        "selected": selected,
        # What the promotion gate reads: the deployable variant agrees with the PyTorch model on
        # the task within the budget (export's own fp32 parity check already passed or it failed).
        "parity_passed": bool(
            -built.variants[selected]["parity"]["macro_f1_delta"] <= cfg.max_f1_drop + 1e-12
        ),
        "calibration": calibration,
        "eligible": eligible,
        "rejected": built.rejected,
        "failed": built.failed,
        "prune": cfg.prune.model_dump() if cfg.prune.enabled else None,
        "bench_config": cfg.bench.model_dump(),
        "variants": built.variants,
        "rejected_variants": built.rejected_variants,
    }


def write_report(report: dict[str, Any], report_dir: Path, plot_path: Path) -> None:
    """The report folder (its owner: `tunery.onnx.compress_report`) and the trade-off plot."""
    from tunery.onnx import compress as comp
    from tunery.onnx import compress_report

    compress_report.write(report_dir, report, comp.markdown(report))
    comp.plot_tradeoff(report, plot_path)


def metrics(report: dict[str, Any]) -> dict[str, Any]:
    """metrics/compress.json: the selected variant and one flat line per variant."""
    selected, variants = report["selected"], report["variants"]
    sel = variants[selected]
    return {
        "selected": selected,
        "selected_size_mb": sel["size_mb"],
        "selected_macro_f1_delta": sel["parity"]["macro_f1_delta"],
        "selected_macro_f1_delta_ci95": sel["parity"].get("macro_f1_delta_ci95"),
        "selected_agreement": sel["parity"]["agreement"],
        "reference_macro_f1": report["reference"]["macro_f1"],
        "judged_rows": report["eval_rows"],
        "calibration": report["calibration"],
        "failed": report["failed"],
        "variants": {
            name: _variant_metrics(v, report["reference_bench"]["cpu"]["throughput"])
            for name, v in variants.items()
        },
    }


def _variant_metrics(v: dict[str, Any], base: float) -> dict[str, Any]:
    return {
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
        **({"float_nodes": len(v["int8_fallback"]["float_nodes"])} if "int8_fallback" in v else {}),
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
    from tunery.onnx import int8_fallback as fb

    log.info(
        "variant %s: macro-F1 drop %.4f > %.4f, trying the accuracy-aware fallback",
        name,
        -par["macro_f1_delta"],
        cfg.max_f1_drop,
    )
    ranked = fb.node_sensitivity(source, path, calib._feeds, threads=cfg.bench.threads)
    seen: dict[Path, tuple[Any, dict[str, Any]]] = {}

    result = fb.tune(
        list(ranked),
        cap=cfg.int8.max_fallback_nodes,
        build=functools.partial(_fallback_build, name, cfg, source, work),
        drop=functools.partial(_fallback_drop, seen, check, check_on),
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


def _fallback_build(name: str, cfg: CompressConfig, source: Path, work: Path, nodes) -> Path:
    from tunery.onnx import compress as comp

    dest = work / f"{name}.fallback{len(nodes)}.onnx"
    comp.quantize_int8_dynamic(source, dest, **cfg.int8.quantize_options(), float_nodes=nodes)
    return dest


def _fallback_drop(seen: dict, check: Any, check_on: str, p: Path) -> float:
    """The macro-F1 drop of a fallback try (its logits and parity kept in `seen`)."""
    seen[p] = check(p, check_on)
    return -seen[p][1]["macro_f1_delta"]


def _rule(cfg: CompressConfig) -> str:
    speed = "throughput" if cfg.rank_by == "throughput" else "batch-1 p50 latency"
    return (
        f"fastest ({speed}) variant on {cfg.target_provider} whose macro-F1 drop vs PyTorch "
        f"(point estimate on val+test) is <= {cfg.max_f1_drop}; the paired bootstrap 95 % "
        "interval is reported, not used"
    )
