"""The image compress stage's work: ONNX variants of the exported ViT, judged, timed, one deployed.

Variants (`compress.variants`): fp32 (the export), int8_dynamic (int8 weights, activations
quantized at run time), int8_static (QDQ, activation ranges calibrated on training images), fp16
(for CUDA: built and judged, never selectable on the CPU). The quantizers are the text pipeline's
(`tunery.onnx.compress`, onnxruntime.quantization underneath); fp16 is onnxruntime's converter.

Each variant is judged against the PyTorch model on val + test together (agreement, accuracy and
macro-F1 deltas) and timed on each provider it targets that runs here. The rule is the text
compress's (`tunery.onnx.compress.select`): the fastest variant on `target_provider` whose
macro-F1 is at most `max_f1_drop` below PyTorch's. The deployed graph gets a second output,
`probabilities = Softmax(logits / T)`, T fitted on val + test (`tunery.onnx.calibration`).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from tunery.errors import TuneryError
from tunery.vision.processor import INPUT_NAME

log = logging.getLogger("tunery.compress")


class PixelReader:
    """Calibration feeds for static int8 (onnxruntime's CalibrationDataReader protocol)."""

    def __init__(self, pixel_values: Any, batch_size: int = 32) -> None:
        x = np.ascontiguousarray(pixel_values.numpy(), dtype=np.float32)
        self._feeds = [{INPUT_NAME: x[i : i + batch_size]} for i in range(0, len(x), batch_size)]
        self._it = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


PRUNED = ("pruned_fp32", "pruned_int8_dynamic")  # with compress.prune.enabled


def build(name: str, src: Path, dest: Path, calibration: Any, work: Path) -> None:
    """Write variant `name` of the fp32 graph `src` to `dest` (a pruned_* variant: `src` is the
    pruned model's graph, `pruned_source`, made like the unpruned one's)."""
    from tunery.onnx import compress as comp

    name = name.removeprefix("pruned_")
    if name == "fp32":
        shutil.copyfile(src, dest)
    elif name == "int8_dynamic":
        # No token packing or layer-norm rewrite: those are for the fused text encoders. The
        # patch embedding stays float (`float_convs`); only MatMul/Gemm become int8.
        comp.quantize_int8_dynamic(
            src, dest, pack_tokens=False, plain_layer_norm=False, float_nodes=float_convs(src)
        )
    elif name == "int8_static":
        comp.quantize_int8_static(src, dest, PixelReader(calibration), work)
    elif name == "fp16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # float32 in and out: the processor's pixel_values and the logits keep their contract.
        onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dest))
    else:
        raise ValueError(f"unknown variant {name!r}")


def float_convs(src: Path) -> list[str]:
    """The graph's Conv nodes (the ViT's patch embedding), left in float by the int8 variants.

    Dynamic int8 turns the patch-embedding Conv into DynamicQuantizeLinear + ConvInteger: one
    input channel and a 7x7 kernel are 49 multiply-adds an output, too little for int8 to pay
    for quantizing the image at run time. Measured on the demo's ViT (96 wide, 4 layers, one
    thread, CPU time, batch 64, bench/vision_int8.py): ConvInteger 1.27 ms vs the float Conv's
    0.29 ms, and the whole graph 7.5 vs 8.1 ms. The static variant quantizes MatMul/Gemm only.
    """
    import onnx

    graph = onnx.load(str(src), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "Conv"]


def providers_here(model_path: Path, targets: tuple[str, ...]) -> list[str]:
    """The providers among `targets` a session starts on here (CUDA only with a usable GPU)."""
    from tunery.onnx import compress as comp

    return [p for p in targets if p == "cpu" or (p == "cuda" and comp.cuda_usable(model_path))]


def judge_and_time(
    name: str, path: Path, judged: tuple, ref_logits: np.ndarray, bench_x: Any, cfg: Any
) -> dict[str, Any]:
    """A built variant's record: targets, parity on the judged rows, the timings per provider."""
    from tunery.onnx import compress as comp
    from tunery.vision import deploy

    targets = comp.VARIANT_TARGETS[name]
    record: dict[str, Any] = {
        "targets": list(targets),
        "size_mb": round(path.stat().st_size / 2**20, 3),
    }
    here = providers_here(path, targets)
    if not here:
        record["bench"] = {}
        record["skipped"] = f"made for {', '.join(targets)}: no such provider here"
        return record
    x, y = judged
    logits = deploy.run_batches(deploy.runner(path, here[0]), x)
    record["parity"] = comp.parity(ref_logits, logits, y)
    record["parity"]["judged_on"] = here[0]
    record["bench"] = {
        p: deploy.bench(
            deploy.runner(path, p, threads=cfg.bench.threads), bench_x, cfg.bench, cfg.clock
        )
        for p in here
    }
    return record


def variant_line(name: str, v: dict[str, Any], torch_tp: float) -> str:
    if "error" in v or "skipped" in v:
        return f"{name}: {v.get('error') or v.get('skipped')}"
    cpu = v["bench"].get("cpu", {})
    speed = f", {cpu['throughput'] / torch_tp:.2f}x PyTorch" if cpu and torch_tp else ""
    return (
        f"{name}: macro-F1 {v['parity']['macro_f1_delta']:+.4f}, agreement "
        f"{v['parity']['agreement']:.4f}, {v['size_mb']:.2f} MB{speed}"
    )


def prune_line(info: dict[str, Any]) -> str:
    """report.md's line on what the pruning did (or why it failed)."""
    if "error" in info:
        return f"Pruning failed: {info['error']}"
    rec = info.get("recovery")
    done = (
        f", then {rec['steps']} distillation steps on {rec['images']} images ({rec['seconds']} s)"
        if rec
        else ", no recovery"
    )
    return (
        f"Pruned: layers {info['kept_layers']} kept, {info['heads_per_layer']} heads and "
        f"{info['ffn_neurons_per_layer']} FFN neurons per layer{done}."
    )


def select(variants: dict[str, dict[str, Any]], cfg: Any) -> tuple[str, list[str]]:
    """The text compress's rule over the variants that were judged."""
    from tunery.onnx import compress as comp

    judged = {n: v for n, v in variants.items() if "parity" in v}
    if not judged:
        raise TuneryError("no compression variant could be built and judged here")
    return comp.select(
        judged, target=cfg.target_provider, max_f1_drop=cfg.max_f1_drop, rank_by=cfg.rank_by
    )


def pruned_source(cfg: Any, context: dict[str, Any], dest: Path) -> dict[str, Any]:
    """The pruned and recovered ViT as an fp32 graph at `dest` (`tunery.vision.prune`), from the
    PyTorch reference, scored on the calibration images, distilled on `context["pool"]`."""
    from tunery.vision.prune import build_pruned

    calib = context["calibration"]
    batches = [calib[i : i + 64] for i in range(0, len(calib), 64)]
    return build_pruned(context["model"], batches, context["pool"], cfg.prune, dest)


def build_all(cfg: Any, src: Path, dest_dir: Path, context: dict[str, Any]) -> dict[str, Any]:
    """Build, judge and time every listed variant into `dest_dir/<name>/` (a model folder each,
    `tunery.onnx.export.write_model_dir`); a variant that fails is recorded, not fatal. With
    `prune.enabled`, pruned_fp32 and pruned_int8_dynamic too; what the pruning did goes to
    `context["prune"]`."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tunery-pruned-") as pruned_work:
        sources = {name: src for name in cfg.variants}
        if cfg.prune.enabled:
            pruned = Path(pruned_work) / "pruned.onnx"
            try:
                context["prune"] = pruned_source(cfg, context, pruned)
                sources |= {name: pruned for name in PRUNED}
            except Exception as exc:  # pruning failing: recorded, the other variants stand
                log.warning("pruning failed: %s", exc)
                context["prune"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        return _build_each(cfg, sources, dest_dir, context)


def _build_each(
    cfg: Any, sources: dict[str, Path], dest_dir: Path, context: dict[str, Any]
) -> dict[str, Any]:
    import tempfile

    from tunery.onnx import export as ox

    variants: dict[str, Any] = {}
    for name, src in sources.items():
        folder = dest_dir / name
        folder.mkdir(parents=True)
        try:
            with tempfile.TemporaryDirectory(prefix="tunery-variant-") as work:
                built = Path(work) / "model.onnx"
                build(name, src, built, context["calibration"], Path(work))
                ox.write_model_dir(folder, onnx_file=built, variant=name, **context["folder"])
        except Exception as exc:  # a quantizer failing on one variant: recorded, not fatal
            log.warning("variant %s failed: %s", name, exc)
            shutil.rmtree(folder, ignore_errors=True)
            variants[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            continue
        variants[name] = judge_and_time(
            name, folder / ox.MODEL_FILE, context["judged"], context["ref"], context["bench_x"], cfg
        )
        log.info("%s", variant_line(name, variants[name], context["torch_throughput"]))
    return variants


def deploy_selected(
    variant_dir: Path, dest: Path, fit: tuple, folder_args: dict[str, Any], extra: dict[str, Any]
) -> dict[str, Any]:
    """Write the deployable folder: the selected variant with its calibrated probabilities.

    `fit`: (pixel_values, labels) the temperature is fitted on, the judged val + test rows, as
    for text (`tunery.onnx.variants.calibrate`: a temperature cannot change the argmax that is
    all test is judged on here, and more rows give a steadier T).
    """
    import tempfile

    from tunery.onnx import calibration as cal
    from tunery.onnx import export as ox
    from tunery.vision import deploy

    x, y = fit
    src = variant_dir / ox.MODEL_FILE
    logits = deploy.run_batches(deploy.runner(src), x)
    fitted = cal.calibrate(logits, y, len(folder_args["labels"]), fitted_on="val+test")
    manifest = ox.verify_model_dir(variant_dir)
    with tempfile.TemporaryDirectory(prefix="tunery-deploy-") as work:
        calibrated = Path(work) / "calibrated.onnx"
        cal.add_probabilities(src, calibrated, fitted["temperature"])
        written = ox.write_model_dir(
            dest,
            onnx_file=calibrated,
            variant=manifest["variant"],
            **folder_args,
            extra={"calibration": fitted, **extra},
        )
    return {"calibration": fitted, "sha256": written["sha256"]}
