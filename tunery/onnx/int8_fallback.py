"""Accuracy-aware int8: when a dynamic int8 variant misses the budget, keep its most sensitive nodes
in float, greedily, until it is within budget or a cap is reached (Intel Neural Compressor's
"fallback" tuning, with one cheap sensitivity pass instead of one quantization per node).

Sensitivity of a quantized node = the relative error (vs fp32, on the calibration texts) it adds:
||y_int8 - y_fp32|| / ||y_fp32|| at its output minus the same at its activation input. Both graphs
keep the tensor names of a quantized node's input and output (onnxruntime's quantizer rewrites the
node, not its neighbours), so one run of each graph with those tensors as extra outputs measures
every node at once. The greedy loop then re-quantizes with the top-k nodes excluded (k = 1, 2, 4,
..., the cap) and judges each try on the task, as the variant itself is judged.

Heavy imports (onnx, onnxruntime) happen inside functions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("tunery.compress")

# Ops onnxruntime's dynamic quantizer rewrites when their weight is a constant (IntegerOpsRegistry
# and the common ops with an initializer input); input index of the activation, or None.
QUANTIZABLE = {
    "MatMul": 0,
    "Gemm": 0,
    "Attention": 0,
    "Gather": None,
    "EmbedLayerNormalization": None,
}


def _packed(model_path: Path) -> Any:
    """The fp32 graph as `quantize_int8_dynamic` quantizes it (tokens packed when it packs)."""
    import onnx

    from tunery.onnx.export import pack_tokens

    model = onnx.load(str(model_path))
    pack_tokens(model)
    return model


def quantized_nodes(source: Any, quantized: Any) -> list[Any]:
    """Nodes of `source` (onnx model) that the quantizer rewrote in `quantized`, in graph order."""
    consts = {t.name for t in source.graph.initializer}
    kept = {n.name for n in quantized.graph.node}
    return [
        n
        for n in source.graph.node
        if n.op_type in QUANTIZABLE and n.name not in kept and any(i in consts for i in n.input)
    ]


def _with_outputs(model: Any, names: Sequence[str]) -> bytes:
    from onnx import TensorProto, helper

    have = {o.name for o in model.graph.output}
    model.graph.output.extend(
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in have
    )
    return model.SerializeToString()


def node_sensitivity(
    fp32_path: Path,
    int8_path: Path,
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    threads: int = 0,
) -> dict[str, float]:
    """{node name: relative output error it adds}, for every node of `fp32_path` quantized in
    `int8_path`, most sensitive first. `feeds`: calibration batches (input name -> int64 array).
    """
    import onnx
    import onnxruntime as ort

    from tunery.onnx.runtime import session_options

    source, quantized = _packed(fp32_path), onnx.load(str(int8_path))
    nodes = quantized_nodes(source, quantized)
    if not nodes:
        return {}
    wanted = {n.name: (n.output[0], _activation(n)) for n in nodes}
    tensors = sorted({t for pair in wanted.values() for t in pair if t})
    so = session_options(ort, threads=threads)
    sessions = [
        ort.InferenceSession(_with_outputs(m, tensors), so, providers=["CPUExecutionProvider"])
        for m in (source, quantized)
    ]
    inputs = [{i.name for i in s.get_inputs()} for s in sessions]
    err = dict.fromkeys(tensors, 0.0)
    ref = dict.fromkeys(tensors, 0.0)
    for feed in feeds:
        f32, q8 = (
            s.run(tensors, {k: v for k, v in feed.items() if k in names})
            for s, names in zip(sessions, inputs, strict=True)
        )
        for name, a, b in zip(tensors, f32, q8, strict=True):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            err[name] += float(((a - b) ** 2).sum())
            ref[name] += float((a**2).sum())
    rel = {t: (err[t] / ref[t]) ** 0.5 if ref[t] else 0.0 for t in tensors}
    added = {
        name: max(0.0, rel[out] - (rel[inp] if inp else 0.0)) for name, (out, inp) in wanted.items()
    }
    return dict(sorted(added.items(), key=lambda kv: -kv[1]))


def _activation(node: Any) -> str | None:
    index = QUANTIZABLE[node.op_type]
    return node.input[index] if index is not None and len(node.input) > index else None


def fallback_steps(cap: int) -> list[int]:
    """How many nodes each try keeps in float: 1, 2, 4, ... and the cap itself."""
    steps, k = [], 1
    while k < cap:
        steps.append(k)
        k *= 2
    return [*steps, cap] if cap > 0 else []


def tune(
    ranked: Sequence[str],
    *,
    cap: int,
    build: Callable[[list[str]], Path],
    drop: Callable[[Path], float],
    max_drop: float,
) -> dict[str, Any]:
    """Greedy fallback: keep the top-k of `ranked` in float for k in `fallback_steps(cap)`.

    `build(nodes)` writes the variant with those nodes in float and returns its path; `drop(path)`
    is its macro-F1 drop (reference - variant). Stops at the first try within `max_drop`.
    Returns {"tries": [...], "within_budget", "nodes", "path"}: the first try within budget,
    else the try with the smallest drop.
    """
    tries: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for k in fallback_steps(min(cap, len(ranked))):
        nodes = list(ranked[:k])
        path = build(nodes)
        d = drop(path)
        tries.append({"float_nodes": k, "macro_f1_drop": d})
        log.info("int8 fallback: %d node(s) in float -> macro-F1 drop %.4f", k, d)
        if best is None or d < best["drop"]:
            best = {"drop": d, "nodes": nodes, "path": path}
        if d <= max_drop + 1e-12:
            return {"tries": tries, "within_budget": True, "nodes": nodes, "path": path}
    return {
        "tries": tries,
        "within_budget": False,
        "nodes": best["nodes"] if best else [],
        "path": best["path"] if best else None,
    }
