"""Image ONNX model folders in the pipeline: export one, score one, time one.

The folder format is `tunery.onnx.export`'s (`write_model_dir` with the processor contract,
`verify_model_dir`); this module only fills and runs it for the image stages. Scoring feeds
`pixel_values` made by the processor the folder names (`processor.from_contract`), so a folder
is scored exactly as it will be served.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tunery.errors import TuneryError
from tunery.vision.processor import INPUT_NAME

PROBABILITIES = "probabilities"  # the calibrated second output of a deployed graph


def run_batches(runner: Any, pixel_values: Any, batch_size: int = 256) -> np.ndarray:
    """The runner's output (logits or probabilities) over `pixel_values` (torch or numpy)."""
    x = pixel_values.numpy() if hasattr(pixel_values, "numpy") else np.asarray(pixel_values)
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = [runner({INPUT_NAME: x[i : i + batch_size]}) for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def runner(model_path: Path, device: str = "cpu", output: str | None = None, threads: int = 0):
    """An onnxruntime session on `model_path` as a callable (`tunery.onnx.runtime.OnnxRunner`)."""
    from tunery.onnx.runtime import OnnxRunner, create_session

    session, real = create_session(model_path, device, threads=threads)
    return OnnxRunner(session, real, output)


def folder_processor(folder: Path) -> tuple[dict[str, Any], Any, list[str]]:
    """(manifest, processor, labels) of a verified image model folder; refuses a text model."""
    import json

    from tunery.onnx.export import LABELS_FILE, modality, verify_model_dir
    from tunery.vision.processor import from_contract

    manifest = verify_model_dir(folder)
    if modality(manifest) != "image":
        raise TuneryError(f"{folder}: a {modality(manifest)} model, not an image model")
    try:
        processor = from_contract(manifest["processor"])
    except ValueError as exc:
        raise TuneryError(f"{folder}: {exc}") from None
    return manifest, processor, list(json.loads((Path(folder) / LABELS_FILE).read_text()))


def outputs(folder: Path, image_paths: Sequence[Path], device: str = "cpu") -> tuple:
    """(logits, class probabilities) of a deployed image folder for image files, as it serves
    them: its own processor, its calibrated `probabilities` output (softmax if it has none)."""
    from tunery.onnx.calibration import probabilities as softmax
    from tunery.onnx.export import MODEL_FILE
    from tunery.vision.processor import process_paths

    manifest, processor, _ = folder_processor(folder)
    pv = process_paths(list(image_paths), processor)
    model = Path(folder) / MODEL_FILE
    logits = run_batches(runner(model, device), pv)
    if "calibration" not in manifest:
        return logits, softmax(logits)
    return logits, run_batches(runner(model, device, PROBABILITIES), pv)


def clock(name: str) -> Any:
    """The timer of a bench: `wall` (perf_counter) or `cpu`, the CPU time of the calling thread
    (`time.thread_time`). With one thread both runtimes compute on the calling thread (torch
    with `set_num_threads(1)`, onnxruntime with `intra_op_num_threads` 1, no pool), so `cpu`
    is what a pass costs on a core of its own: the wall time of a quiet machine, unmoved by
    other jobs taking the core mid-pass."""
    return time.thread_time if name == "cpu" else time.perf_counter


def torch_throughput(
    model: Any,
    pixel_values: Any,
    *,
    batch: int,
    batches: int,
    repeats: int,
    threads: int = 0,
    timer: str = "wall",
) -> float:
    """Images/s of the PyTorch fp32 model in eager mode, the median of `repeats` passes.

    `threads` (compress.bench.threads, 0: torch's default) is what the onnxruntime variants are
    timed with too, so the ratio compares the two runtimes on the same cores; `timer`: `clock`.
    """
    import torch

    feeds = [pixel_values[(i * batch) % len(pixel_values) :][:batch] for i in range(batches)]
    model.eval()
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _time_torch(model, feeds, repeats, clock(timer))
    finally:
        torch.set_num_threads(before)


def _time_torch(model: Any, feeds: list[Any], repeats: int, now: Any) -> float:
    import torch

    with torch.inference_mode():
        model(pixel_values=feeds[0])
        passes = []
        for _ in range(repeats):
            t = now()
            for f in feeds:
                model(pixel_values=f)
            passes.append(now() - t)
    return round(sum(len(f) for f in feeds) / float(np.median(passes)), 1)


def bench(run: Any, pixel_values: Any, cfg: Any, timer: str = "wall") -> dict[str, Any]:
    """Batch-1 latency p50/p95 (ms) and throughput (images/s, median of the repeats) of `run`,
    timed by `timer` (`clock`); `throughput_wall` is the wall-clock one either way."""
    x = np.ascontiguousarray(pixel_values.numpy(), dtype=np.float32)
    singles = [x[i % len(x)][None] for i in range(cfg.latency_runs)]
    b = cfg.throughput_batch
    groups = [x[(i * b) % len(x) :][:b] for i in range(cfg.throughput_batches)]
    for feed in singles[: max(1, cfg.warmup)] + groups[:1]:
        run({INPUT_NAME: feed})
    times = []
    for feed in singles:
        t = time.perf_counter()
        run({INPUT_NAME: feed})
        times.append(time.perf_counter() - t)
    now, passes, walls = clock(timer), [], []
    for _ in range(cfg.throughput_repeats):
        t, w = now(), time.perf_counter()
        for feed in groups:
            run({INPUT_NAME: feed})
        passes.append(now() - t)
        walls.append(time.perf_counter() - w)
    images = sum(len(g) for g in groups)
    return {
        "latency_p50_ms": round(float(np.percentile(times, 50)) * 1e3, 3),
        "latency_p95_ms": round(float(np.percentile(times, 95)) * 1e3, 3),
        "throughput": round(images / float(np.median(passes)), 1),
        "throughput_wall": round(images / float(np.median(walls)), 1),
        "throughput_clock": timer,
        "throughput_batch": b,
    }
