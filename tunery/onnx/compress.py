"""Compression helpers: build ONNX variants, check each on the task, time it, pick one.

Every variant is compared with the PyTorch model it came from, on the evaluation texts: prediction
agreement, accuracy and macro-F1 deltas, max |logit difference|; then file size and latency
(batch-1 p50/p95, throughput at a larger batch) on each provider it can run on.

CPU int8 (dynamic, per-channel 7-bit weights) runs its token-wise ops on the real tokens only and
its layer norms unfused (`quantize_int8_dynamic`); structured pruning (whole encoder layers,
attention heads and FFN neurons by importance on calibration texts, `build_pruned`, optionally
distilled back towards the unpruned model by `tunery.onnx.distill`) gives the pruned_* variants.

Heavy imports (torch, onnx, onnxruntime, sklearn) happen inside functions.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tunery.errors import TuneryError
from tunery.onnx.runtime import OnnxRunner, create_session, length_batches

log = logging.getLogger("tunery.compress")

# Where each variant is meant to run: the selection only considers variants made for the target.
VARIANT_TARGETS: dict[str, tuple[str, ...]] = {
    "fp32": ("cpu", "cuda"),
    "fp16": ("cuda",),
    "int8_dynamic": ("cpu",),
    "int8_static": ("cpu",),
    "pruned_fp32": ("cpu", "cuda"),
    "pruned_int8_dynamic": ("cpu",),
}
Encoded = list[dict[str, list[int]]]
Forward = Callable[[dict[str, np.ndarray]], np.ndarray]


# --------------------------------------------------------------------------- scoring
def run_batches(
    forward: Forward, encoded: Encoded, batch_size: int, input_names: Sequence[str], n_out: int
) -> np.ndarray:
    out = np.zeros((len(encoded), n_out), dtype=np.float32)
    for idx, feed in length_batches(encoded, batch_size, input_names):
        out[idx] = forward(feed)
    return out


def torch_forward(model: Any) -> Forward:
    """A PyTorch classifier as a `Forward` (numpy feeds in, float logits out)."""
    return functools.partial(_torch_logits, model)


def _torch_logits(model: Any, feed: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        logits = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits
    return logits.float().numpy()


def task_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(
                y_true, y_pred, average="macro", labels=list(range(n_classes)), zero_division=0
            )
        ),
    }


def parity(ref_logits: np.ndarray, logits: np.ndarray, y_true: np.ndarray) -> dict[str, float]:
    """A variant against the PyTorch reference, on the task."""
    n = ref_logits.shape[1]
    ref = task_metrics(y_true, ref_logits.argmax(-1), n)
    got = task_metrics(y_true, logits.argmax(-1), n)
    return {
        "agreement": float((ref_logits.argmax(-1) == logits.argmax(-1)).mean()),
        "accuracy": got["accuracy"],
        "macro_f1": got["macro_f1"],
        "accuracy_delta": got["accuracy"] - ref["accuracy"],
        "macro_f1_delta": got["macro_f1"] - ref["macro_f1"],
        "max_abs_logit_diff": float(np.abs(ref_logits - logits).max()),
    }


def require_export_parity(check: dict[str, float], cfg: Any, checked_on: Path) -> None:
    """Refuse an export whose graph strays from PyTorch on `checked_on`'s rows beyond
    `cfg.max_logit_diff` / `cfg.min_agreement` (the text and image export stages alike)."""
    if check["max_abs_logit_diff"] > cfg.max_logit_diff or check["agreement"] < cfg.min_agreement:
        raise TuneryError(
            f"ONNX parity failed on {checked_on}: max |logit diff| "
            f"{check['max_abs_logit_diff']:.2e} (limit {cfg.max_logit_diff}), agreement "
            f"{check['agreement']:.4f} (min {cfg.min_agreement}); nothing written"
        )


def _macro_f1_weighted(y: np.ndarray, pred: np.ndarray, w: np.ndarray, n: int) -> np.ndarray:
    """Macro-F1 of each row of weights `w` (resamples x rows: how often each row was drawn).

    Same definition as sklearn's (labels = all classes, zero_division=0): F1_c = 2tp/(2tp+fp+fn).
    """
    f1 = np.zeros(w.shape[0])
    for c in range(n):
        tp = w @ ((y == c) & (pred == c))
        fp = w @ ((y != c) & (pred == c))
        fn = w @ ((y == c) & (pred != c))
        den = 2 * tp + fp + fn
        f1 += np.divide(2 * tp, den, out=np.zeros_like(f1), where=den > 0)
    return f1 / n


def bootstrap_f1_delta(
    y_true: np.ndarray,
    ref_pred: np.ndarray,
    pred: np.ndarray,
    n_classes: int,
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> list[float]:
    """Paired bootstrap interval of macro-F1(variant) - macro-F1(reference).

    Each resample draws the same rows (with replacement) for both models, so the interval is that
    of the difference, not of two independent scores. Seeded: the same inputs give the same interval.
    """
    y, ref, got = (np.asarray(a) for a in (y_true, ref_pred, pred))
    rng = np.random.default_rng(seed)
    w = rng.multinomial(len(y), np.full(len(y), 1.0 / len(y)), size=resamples).astype(np.float64)
    delta = _macro_f1_weighted(y, got, w, n_classes) - _macro_f1_weighted(y, ref, w, n_classes)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(delta, [tail, 100 - tail])
    return [float(lo), float(hi)]


# --------------------------------------------------------------------------- variants
class CalibrationReader:
    """Feeds of training texts for static quantization (onnxruntime's CalibrationDataReader API)."""

    def __init__(self, encoded: Encoded, input_names: Sequence[str], batch_size: int = 8) -> None:
        self._feeds = [f for _, f in length_batches(encoded, batch_size, input_names, sort=False)]
        self._it: Iterator[dict[str, np.ndarray]] = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def quantize_int8_dynamic(
    src: Path,
    dest: Path,
    *,
    per_channel: bool = True,
    reduce_range: bool = True,
    plain_layer_norm: bool = True,
    pack_tokens: bool = True,
    exclude: Sequence[str] = (),
    float_nodes: Sequence[str] = (),
) -> None:
    """Dynamic int8 (weights int8, activations quantized at run time): CPU.

    `pack_tokens` runs the token-wise ops on the real (non-padding) tokens only
    (`onnx_export.pack_tokens`); `plain_layer_norm` rewrites the SkipLayerNormalization nodes for
    the CPU provider (`plain_layer_norms`). `exclude`: node names (or substrings) left in float;
    `float_nodes`: exact node names left in float (what the accuracy-aware fallback chose).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from tunery.onnx.export import pack_tokens as pack

    excluded = _matching_nodes(src, exclude, float_nodes) if exclude or float_nodes else []
    source = Path(src)
    if pack_tokens:
        model = onnx.load(str(src))
        if pack(model):
            source = Path(dest).with_name(Path(dest).stem + ".packed.onnx")
            onnx.save(model, str(source))
        del model
    try:
        # Fused contrib ops (Attention, SkipLayerNormalization) defeat ONNX type inference on
        # their outputs; those tensors are float.
        quantize_dynamic(
            str(source),
            str(dest),
            weight_type=QuantType.QInt8,
            # Per-channel weight scales with a 7-bit range: on the demo model (MiniLM + LoRA, 402
            # test texts) agreement with fp32 rose from 0.94 to 0.98 and the macro-F1 drop from
            # -0.37 to -0.15 points at the same size and speed (per-tensor is no faster on AVX2);
            # reduce_range also avoids u8s8 saturation on CPUs without VNNI (vpmaddubsw adds
            # pairs of u8*s8 products in int16).
            per_channel=per_channel,
            reduce_range=reduce_range,
            nodes_to_exclude=excluded,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        if source != Path(src):
            source.unlink(missing_ok=True)
    if plain_layer_norm:
        model = onnx.load(str(dest))
        if plain_layer_norms(model):
            onnx.save(model, str(dest))


def _matching_nodes(path: Path, patterns: Sequence[str], exact: Sequence[str] = ()) -> list[str]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    wanted = set(exact)
    names = [
        n.name for n in graph.node if n.name in wanted or any(p and p in n.name for p in patterns)
    ]
    # onnxruntime's quantizer first rewrites Gemm as `<name>_MatMul` + Add: exclude that name too.
    gemms = {n.name for n in graph.node if n.op_type == "Gemm"}
    return names + [f"{n}_MatMul" for n in names if n in gemms]


def plain_layer_norms(model: Any) -> int:
    """Rewrite each SkipLayerNormalization as Sum(input, skip[, bias]) -> LayerNormalization, in place.

    onnxruntime's CPU kernel for the fused SkipLayerNormalization is slow: on the demo model (2
    AMD EPYC cores, AVX2, batch 64) its 12 nodes took ~13 % of the int8 graph's time, ~4x what a
    plain LayerNormalization plus the residual add take. The add is written as `Sum`, not `Add`,
    so that onnxruntime's own graph optimizer (SkipLayerNormFusion matches Add -> LayerNorm) does
    not fuse it back. Same math; returns the number of nodes rewritten. For CPU graphs only: the
    CUDA kernel of the fused op is the fast one.
    """
    from onnx import helper

    graph = model.graph
    if not any(n.op_type == "SkipLayerNormalization" for n in graph.node):
        return 0
    if not any(o.domain in ("", "ai.onnx") and o.version >= 17 for o in model.opset_import):
        return 0  # LayerNormalization is an ONNX op from opset 17: leave the fused op
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    nodes, count = [], 0
    for node in graph.node:
        outs = list(node.output) + [""] * (4 - len(node.output))
        if (
            node.op_type != "SkipLayerNormalization"
            or node.domain != "com.microsoft"
            or any(o and o in used for o in outs[1:3])  # mean / inv_std_var: keep the fused op
        ):
            nodes.append(node)
            continue
        ins = list(node.input) + [""] * (5 - len(node.input))
        x, skip, gamma, beta, bias = ins[:5]
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        summed = outs[3] if outs[3] else f"{node.name}_sum"
        nodes.append(
            helper.make_node(
                "Sum", [x, skip] + ([bias] if bias else []), [summed], f"{node.name}_Sum"
            )
        )
        nodes.append(
            helper.make_node(
                "LayerNormalization",
                [summed, gamma] + ([beta] if beta else []),
                [outs[0]],
                f"{node.name}_LayerNorm",
                axis=-1,
                epsilon=eps,
            )
        )
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
    return count


def quantize_int8_static(raw: Path, dest: Path, reader: CalibrationReader, workdir: Path) -> None:
    """Static int8 in QDQ format, activation ranges calibrated on training texts: CPU.

    Starts from the unfused graph: QDQ around plain MatMuls is what the CPU provider fuses into
    integer kernels; only MatMul/Gemm are quantized, which keeps LayerNorm/Softmax in float.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = workdir / "static.pre.onnx"
    quant_pre_process(str(raw), str(pre), skip_symbolic_shape=True)
    quantize_static(
        str(pre),
        str(dest),
        reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Gemm"],
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        # 7-bit weights: without VNNI (AVX2 CPUs) the u8*s8 kernels add products in int16 and
        # saturate. CI on such a CPU measured agreement 0.80 with PyTorch on the test model
        # without it, 1.00 on an AVX512-VNNI CPU; the dynamic variant has always set it.
        reduce_range=True,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"MatMulConstBOnly": True},
    )
    pre.unlink(missing_ok=True)


def _encoder_layers(model: Any, what: str) -> list[Any]:
    try:
        layers = list(model.base_model.encoder.layer)
        for layer in layers:
            layer.attention.self.query, layer.attention.output.dense  # noqa: B018
            layer.intermediate.dense, layer.output.dense  # noqa: B018
    except AttributeError:
        raise TuneryError(
            f"{what} pruning supports BERT-style encoders (encoder.layer[i].attention.self/output, "
            f".intermediate/.output); got {type(model).__name__}"
        ) from None
    return layers


def _calibrate(
    model: Any, feeds: Sequence[dict[str, np.ndarray]], hooks: dict[Any, Callable[..., None]]
) -> None:
    """Run `feeds` through `model`; call hooks[module](x, mask) with each module's first input.

    `x` is (tokens, features): the input at the real (non-padding) tokens of the batch.
    """
    import torch

    mask: list[Any] = [None]
    handles = [
        module.register_forward_hook(lambda _m, inp, _out, fn=fn: fn(inp[0][mask[0]].double()))
        for module, fn in hooks.items()
    ]
    try:
        with torch.inference_mode():
            for feed in feeds:
                ids = feed["input_ids"]
                att = feed.get("attention_mask")
                mask[0] = torch.from_numpy(att if att is not None else np.ones_like(ids)).bool()
                model(**{k: torch.from_numpy(v) for k, v in feed.items()})
    finally:
        for h in handles:
            h.remove()


def sliced_linear(lin: Any, idx: Any, dim: int) -> Any:
    """A copy of nn.Linear `lin` keeping output features `idx` (dim 0) or input features (dim 1)."""
    import torch

    weight = lin.weight.index_select(dim, idx)
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=lin.bias is not None)
    with torch.no_grad():
        new.weight.copy_(weight)
        if lin.bias is not None:
            new.bias.copy_(lin.bias[idx] if dim == 0 else lin.bias)
    return new


class _Stats(dict):
    """Sums over the real tokens of the calibration texts, kept by a forward hook (`__call__`)."""


class FfnStats(_Stats):
    """The FFN's hidden activations (the input of its output projection): |x| and x sums."""

    def __init__(self) -> None:
        super().__init__(abs=0.0, sum=0.0, n=0)

    def __call__(self, x: Any) -> None:
        self["abs"] = self["abs"] + x.abs().sum(0)
        self["sum"] = self["sum"] + x.sum(0)
        self["n"] += x.shape[0]


class HeadStats(_Stats):
    """The attention context before W_O: each head's contribution norm, sums, and (for the
    least-squares refit) the Gram matrix."""

    def __init__(self, weight: Any, n_heads: int, size: int, gram: bool) -> None:
        super().__init__(score=0.0, sum=0.0, gram=0.0, n=0)
        self.w = weight.detach().double().view(weight.shape[0], n_heads, size)
        self.n_heads, self.size, self.keep_gram = n_heads, size, gram

    def __call__(self, x: Any) -> None:  # x: (tokens, heads * size), the context before W_O
        import torch

        per_head = torch.einsum("thd,ohd->tho", x.view(-1, self.n_heads, self.size), self.w)
        self["score"] = self["score"] + per_head.norm(dim=-1).sum(0)
        self["sum"] = self["sum"] + x.sum(0)
        if self.keep_gram:
            self["gram"] = self["gram"] + x.T @ x
        self["n"] += x.shape[0]


def prune_ffn(
    model: Any, feeds: Sequence[dict[str, np.ndarray]], fraction: float, *, compensate: bool = True
) -> Any:
    """A copy of `model` with `fraction` of each layer's FFN neurons removed, least important first.

    Importance of neuron j = mean |activation_j| over the real tokens of the calibration texts ×
    ||W_out[:, j]||: what removing it changes in the layer's output. With `compensate`, the mean
    contribution of the removed neurons is folded into the output bias (so the layer keeps its
    average output). Every layer keeps the same count, so the result is a plain model with a
    smaller `intermediate_size` (saveable, exportable, fusable). Plain slicing of the Linear
    layers rather than `torch.nn.utils.prune`: that only masks weights (same shapes, same
    FLOPs), and onnxruntime runs a masked matrix as fast as a full one.
    """
    model = copy.deepcopy(model).eval()
    layers = _encoder_layers(model, "FFN")
    width = layers[0].intermediate.dense.out_features
    keep = max(1, round(width * (1.0 - fraction)))
    stats = [FfnStats() for _ in layers]
    _calibrate(model, feeds, {ly.output.dense: st for ly, st in zip(layers, stats, strict=True)})
    for layer, st in zip(layers, stats, strict=True):
        layer.intermediate.dense, layer.output.dense = sliced_ffn(
            layer.intermediate.dense, layer.output.dense, st, keep, compensate=compensate
        )
    model.config.intermediate_size = keep
    log.info("pruned FFN: %d -> %d neurons per layer", width, keep)
    return model


def sliced_ffn(up: Any, down: Any, st: FfnStats, keep: int, *, compensate: bool = True):
    """One FFN's (up, down) Linear pair with its `keep` most important neurons (`prune_ffn`'s
    rule; shared with the image pipeline's ViT, whose pair is `mlp.fc1/fc2`)."""
    import torch

    with torch.no_grad():
        n = max(st["n"], 1)
        score = torch.as_tensor(st["abs"] / n).float() * down.weight.norm(dim=0)
        idx = torch.topk(score, keep).indices.sort().values
        new_down = sliced_linear(down, idx, 1)
        if compensate and down.bias is not None and st["n"]:
            dropped = torch.ones(up.out_features, dtype=torch.bool)
            dropped[idx] = False
            mean = torch.as_tensor(st["sum"] / n).float()
            new_down.bias += down.weight[:, dropped] @ mean[dropped]
        return sliced_linear(up, idx, 0), new_down


def prune_heads(
    model: Any,
    feeds: Sequence[dict[str, np.ndarray]],
    heads: int,
    *,
    refit: str = "lstsq",
    ridge: float = 1e-2,
) -> Any:
    """A copy of `model` with `heads` attention heads removed from every layer, least important first.

    Importance of head h (gradient-free) = mean over the real tokens of the calibration texts of
    ||context_h · W_O[:, h]ᵀ||: the size of what the head adds to the attention output. Q/K/V rows
    and W_O columns of the removed heads are dropped (`prune_heads`-style; the transformers 5 BERT
    models no longer have `prune_heads`). Every layer keeps the same number of heads, so
    onnxruntime's attention fusion still applies (num_heads = the heads kept).

    The output projection is then refitted on the same calibration pass:
    - `lstsq` (default): W_O and its bias re-solved by ridge least squares so that the kept heads'
      context reproduces the full layer's attention output (from the context's mean and covariance,
      no second pass). On the demo model (4 of 12 heads removed, 512 calibration texts) the KL
      divergence to the unpruned model's predictions fell from 0.035 to 0.005.
    - `mean`: only the removed heads' mean contribution is folded into the bias.
    - `none`: the columns are dropped as they are.
    """
    import torch

    model = copy.deepcopy(model).eval()
    layers = _encoder_layers(model, "Attention-head")
    first = layers[0].attention.self
    n_heads, size = int(first.num_attention_heads), int(first.attention_head_size)
    if not 0 < heads < n_heads:
        raise TuneryError(f"cannot remove {heads} of {n_heads} attention heads per layer")
    if refit not in ("lstsq", "mean", "none"):
        raise TuneryError(f"prune_heads: refit must be lstsq, mean or none (got {refit!r})")
    keep = n_heads - heads
    stats = [
        HeadStats(ly.attention.output.dense.weight, n_heads, size, gram=refit == "lstsq")
        for ly in layers
    ]
    _calibrate(
        model,
        feeds,
        {ly.attention.output.dense: st for ly, st in zip(layers, stats, strict=True)},
    )
    with torch.no_grad():
        for layer, st in zip(layers, stats, strict=True):
            _drop_heads(layer, st, keep=keep, size=size, refit=refit, ridge=ridge)
    log.info("pruned attention: %d -> %d heads per layer", n_heads, keep)
    return model


def _drop_heads(layer: Any, st: HeadStats, *, keep: int, size: int, refit: str, ridge: float):
    """Keep the `keep` most important heads of one layer; refit its output projection."""
    import torch

    attn, out = layer.attention.self, layer.attention.output.dense
    kept = torch.topk(torch.as_tensor(st["score"]).float(), keep).indices.sort().values
    idx = (kept[:, None] * size + torch.arange(size)).flatten()
    new_out = sliced_linear(out, idx, 1)
    if st["n"] and out.bias is not None and refit != "none":
        refit_output(out, new_out, st, idx, refit=refit, ridge=ridge)
    for name in ("query", "key", "value"):
        setattr(attn, name, sliced_linear(getattr(attn, name), idx, 0))
    layer.attention.output.dense = new_out
    attn.num_attention_heads, attn.all_head_size = keep, keep * size


def refit_output(out: Any, new_out: Any, st: HeadStats, idx: Any, *, refit: str, ridge: float):
    """The pruned W_O (`new_out`) refitted to the full layer's output: lstsq, or the mean."""
    import torch

    n = st["n"]
    mean = torch.as_tensor(st["sum"]) / n
    w = out.weight.detach().double()
    if refit == "lstsq":
        # min ||X_k W_kᵀ + b_k - (X Wᵀ + b)||² + ridge·tr(C_kk)/k·||W_k||², X centered.
        cov = torch.as_tensor(st["gram"]) / n - torch.outer(mean, mean)
        c_kk = cov[idx][:, idx]
        c_kk = c_kk + ridge * c_kk.diagonal().mean() * torch.eye(len(idx), dtype=c_kk.dtype)
        w_k = torch.linalg.solve(c_kk, cov[idx] @ w.T).T
        bias = out.bias.double() + w @ mean - w_k @ mean[idx]
        new_out.weight.copy_(w_k.float())
        new_out.bias.copy_(bias.float())
    else:
        dropped = torch.ones(w.shape[1], dtype=torch.bool)
        dropped[idx] = False
        new_out.bias += (w[:, dropped] @ mean[dropped]).float()


def kept_layers(n_layers: int, drop: int, choice: str = "top") -> list[int]:
    """The encoder layers kept when `drop` of `n_layers` are removed: `top` keeps the first
    ones; `spread` keeps evenly spaced ones, the first and the last among them."""
    keep = n_layers - drop
    if not 0 < keep <= n_layers:
        raise TuneryError(
            f"compress.prune.layers: cannot remove {drop} of the model's {n_layers} layers "
            "(at least one must stay)"
        )
    if choice == "top" or keep == n_layers:
        return list(range(keep))
    if choice != "spread":
        raise TuneryError(f"compress.prune.layer_choice must be top or spread (got {choice!r})")
    if keep == 1:
        return [n_layers - 1]
    return sorted({round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)})


def drop_layers(model: Any, keep: Sequence[int]) -> Any:
    """A copy of `model` with only the encoder layers `keep` (in order): a plain model with a
    smaller `num_hidden_layers` (saveable, exportable, fusable), each kept layer's weights as
    they were. Layer dropping in the style of Sajjad et al. ("Poor Man's BERT") and DistilBERT's
    initialisation; the recovery then distils it towards the full model."""
    import torch

    model = copy.deepcopy(model).eval()
    layers = _encoder_layers(model, "Layer")
    if not keep or any(not 0 <= i < len(layers) for i in keep) or len(set(keep)) != len(keep):
        raise TuneryError(
            f"drop_layers: {list(keep)} is not a set of layers of 0..{len(layers) - 1}"
        )
    encoder = model.base_model.encoder
    encoder.layer = torch.nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(encoder.layer):  # cache/layer-type lookups index by position
        attn = getattr(layer.attention, "self", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_index
    model.config.num_hidden_layers = len(keep)
    log.info("dropped layers: %d -> %d (kept %s)", len(layers), len(keep), list(keep))
    return model


def build_pruned(
    model: Any,
    tokenizer: Any,
    feeds: Sequence[dict[str, np.ndarray]],
    dest: Path,
    *,
    heads: int = 0,
    ffn_fraction: float = 0.0,
    layers: int = 0,
    layer_choice: str = "top",
    opset: int = 17,
    max_length: int = 128,
    recover: Callable[[Any, list[int]], tuple[Any, dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Prune `model` (whole layers, then heads, then FFN neurons), `recover` it (e.g.
    `tunery.onnx.distill.recover` bound to its teacher and data; it gets the pruned model and,
    per kept layer, the teacher layer it came from), export and optimize it to `dest` (fp32 ONNX).

    Returns what was done: layers kept, heads and FFN neurons kept per layer, the fused
    operators, and what `recover` reported.
    """
    from tunery.onnx import export as ox

    if not heads and not ffn_fraction and not layers:
        raise TuneryError(
            "compress.prune: set layers, heads and/or ffn_fraction to prune something"
        )
    model_type, n_heads, hidden = ox.model_shape(model)
    size = hidden // max(n_heads, 1)
    n_layers = len(_encoder_layers(model, "Layer"))
    kept_idx = kept_layers(n_layers, layers, layer_choice)
    pruned = drop_layers(model, kept_idx) if layers else model
    if heads:
        pruned = prune_heads(pruned, feeds, heads)
    if ffn_fraction:
        pruned = prune_ffn(pruned, feeds, ffn_fraction)
    recovery = None
    if recover is not None:
        pruned, recovery = recover(pruned, kept_idx)
    raw = dest.with_name(dest.stem + ".raw.onnx")
    ox.export_onnx(pruned, tokenizer, raw, opset=opset, max_length=max_length)
    kept = n_heads - heads
    fused = ox.optimize(raw, dest, model_type=model_type, num_heads=kept, hidden_size=kept * size)
    raw.unlink(missing_ok=True)
    return {
        "layers": len(kept_idx),
        "kept_layers": kept_idx,
        "heads_per_layer": kept,
        "ffn_neurons_per_layer": int(pruned.config.intermediate_size),
        "fused_operators": fused,
        **({"recovery": recovery} if recovery is not None else {}),
    }


# --------------------------------------------------------------------------- timing
def bench_inputs(
    encoded: Encoded, *, runs: int, batch: int, batches: int
) -> tuple[Encoded, list[Encoded]]:
    """The texts timed: `runs` single texts, and `batches` batches of `batch` (cycling if few).

    The batches are sorted by length, as `Predictor` (and `run_batches`) batch texts, so each
    pads only to texts of similar length: the throughput is that of the deployed path.
    """
    if not encoded:
        raise TuneryError("no evaluation texts to time")
    singles = [encoded[i % len(encoded)] for i in range(runs)]
    many = [encoded[i % len(encoded)] for i in range(batch * batches)]
    many = [many[i] for i in np.argsort([len(e["input_ids"]) for e in many], kind="stable")]
    return singles, [many[i : i + batch] for i in range(0, len(many), batch)]


def bench(
    forward: Forward,
    input_names: Sequence[str],
    singles: Encoded,
    groups: list[Encoded],
    *,
    warmup: int,
    sync: Callable[[], None] | None = None,
    repeats: int = 1,
) -> dict[str, float]:
    """Batch-1 latency p50/p95 (ms) over `singles`; throughput (texts/s) over `groups`.

    Throughput: the median of `repeats` timed passes over all the groups (`throughput_best`: the
    fastest pass, what a quiet machine gives).
    """
    one = [f for _, f in length_batches(singles, 1, input_names, sort=False)]
    big = [next(length_batches(g, len(g), input_names, sort=False))[1] for g in groups]
    for feed in (one[:warmup] or one[:1]) + big[:1]:
        forward(feed)
    times = []
    for feed in one:
        t = time.perf_counter()
        forward(feed)
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    passes = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        for feed in big:
            forward(feed)
        if sync:
            sync()
        passes.append(time.perf_counter() - t)
    texts = sum(len(g) for g in groups)
    return {
        "latency_p50_ms": round(float(np.percentile(times, 50)) * 1e3, 3),
        "latency_p95_ms": round(float(np.percentile(times, 95)) * 1e3, 3),
        "throughput": round(texts / float(np.median(passes)), 1),
        "throughput_best": round(texts / min(passes), 1),
        "throughput_batch": len(groups[0]),
    }


def onnx_runner(model_path: Path, device: str, threads: int = 0) -> OnnxRunner:
    session, real = create_session(model_path, device, threads=threads)
    return OnnxRunner(session, real)


def cuda_usable(model_path: Path) -> bool:
    """Whether a strict CUDA session starts here (onnxruntime-gpu, a GPU, its libraries)."""
    try:
        onnx_runner(model_path, "cuda")
    except TuneryError as exc:
        log.info("CUDA provider not usable here: %s", exc)
        return False
    return True


# --------------------------------------------------------------------------- selection
def select(
    variants: dict[str, dict[str, Any]], *, target: str, max_f1_drop: float, rank_by: str
) -> tuple[str, list[str]]:
    """The fastest variant on `target` whose macro-F1 drop is within budget; and the eligible ones.

    A variant is eligible when it is made for `target`, was timed there, and its macro-F1 is at
    most `max_f1_drop` below the PyTorch model's. Fastest = highest throughput, or lowest batch-1
    p50 latency with `rank_by: latency_p50`.
    """
    eligible = []
    for name, v in variants.items():
        timed = v.get("bench", {}).get(target)
        if target not in v["targets"] or not timed or "error" in timed:
            continue
        if -v["parity"]["macro_f1_delta"] <= max_f1_drop + 1e-12:
            eligible.append(name)
    if not eligible:
        summary = ", ".join(
            f"{n}: macro-F1 {v['parity']['macro_f1_delta']:+.4f}" for n, v in variants.items()
        )
        raise TuneryError(
            f"no variant for {target} is within compress.max_f1_drop={max_f1_drop} ({summary})"
        )
    speed = functools.partial(_speed, variants, target, rank_by)
    return max(eligible, key=speed), sorted(eligible, key=speed, reverse=True)


def _speed(variants: dict[str, dict[str, Any]], target: str, rank_by: str, name: str) -> float:
    """Higher is faster: throughput, or minus the batch-1 p50 latency."""
    timed = variants[name]["bench"][target]
    return timed["throughput"] if rank_by == "throughput" else -timed["latency_p50_ms"]


# --------------------------------------------------------------------------- report
def markdown(report: dict[str, Any]) -> str:
    """report.md: how the variants were judged, one table row per variant and provider, then the
    int8 fallbacks, failures and rejections."""
    lines = _markdown_header(report) + _markdown_table(report)
    for name, v in report["variants"].items():
        if v.get("int8_fallback"):
            lines += ["", _fallback_line(name, v["int8_fallback"])]
    if report.get("failed"):
        lines += [
            "",
            "Failed (recorded, not selectable): "
            + "; ".join(f"{n}: {e}" for n, e in report["failed"].items()),
        ]
    if report.get("rejected"):
        lines += [
            "",
            "Rejected (outside the accuracy budget, not kept): "
            + ", ".join(_why_rejected(report, n) for n in report["rejected"]),
        ]
    return "\n".join(lines) + "\n"


def _markdown_header(report: dict[str, Any]) -> list[str]:
    ref = report["reference"]
    judged = report.get("judged") or {"rows": {"test": report["eval_rows"]}}
    rows = " + ".join(f"{k} {v}" for k, v in judged["rows"].items())
    boot = judged.get("bootstrap") or {}
    lines = [
        "# Compression report",
        "",
        f"Judged on {report['eval_rows']} texts ({rows}). Reference: PyTorch fp32 — accuracy "
        f"{ref['accuracy']:.4f}, macro-F1 {ref['macro_f1']:.4f}. Rule: {report['rule']}.",
    ]
    if judged.get("note"):
        lines.append(f"Why these rows: {judged['note']}.")
    if boot.get("resamples"):
        lines.append(
            f"ΔmacroF1 95 % interval: paired bootstrap, {boot['resamples']} resamples of the judged "
            f"rows (the same rows for reference and variant), seed {boot['seed']}."
        )
    lines.append(f"Selected: **{report['selected']}** for `{report['target_provider']}`.")
    c = report.get("calibration")
    if c:
        how = (
            f"T = {c['temperature']:.4f} fitted on {c['fitted_on']} ({c['rows']} rows): "
            f"ECE {c['val_ece_before']:.4f} -> {c['val_ece_after']:.4f}, NLL "
            f"{c['val_nll_before']:.4f} -> {c['val_nll_after']:.4f}"
            if "val_ece_before" in c
            else f"T = {c['temperature']:.4f}"
        )
        lines.append(
            f"Calibration (deployed graph: `probabilities` = Softmax(logits / T)): {how}."
            + (f" Fallback: {c['fallback']}." if c.get("fallback") else "")
        )
    if report.get("prune"):
        lines.append(_pruning_line(report))
    return lines


def _pruning_line(report: dict[str, Any]) -> str:
    """What the pruned_* variants are: what was removed, what the recovery did and cost."""
    pr = report["prune"]
    done = next(
        (
            v["pruning"]
            for group in ("variants", "rejected_variants")
            for v in (report.get(group) or {}).values()
            if v.get("pruning")
        ),
        {},
    )
    layers = ""
    if pr.get("layers"):
        kept = done.get("kept_layers")
        layers = (
            f"{pr['layers']} encoder layers dropped ({pr.get('layer_choice', 'top')}"
            + (f": kept {', '.join(map(str, kept))}" if kept else "")
            + "), "
        )
    line = (
        f"Pruning (pruned_* variants): {layers}{pr.get('heads', 0)} attention heads per layer, "
        f"{pr.get('ffn_fraction', 0):.0%} of FFN neurons per layer, removed by importance"
    )
    rec = done.get("recovery") or {}
    if "macro_f1_drop_pruned" in rec:
        line += f"; PyTorch ΔmacroF1 {-rec['macro_f1_drop_pruned']:+.4f} as pruned"
    if rec.get("steps"):
        line += (
            f", {-rec['macro_f1_drop_recovered']:+.4f} after distillation recovery "
            f"({rec['steps']} steps x {rec['batch_size']} texts, KL T={rec['temperature']:g} "
            f"weight {rec['kd_weight']:g} + CE, hidden-state weight {rec['hidden_weight']:g}"
            + (", quantization-aware (int8 fake-quantized)" if rec.get("quant_aware") else "")
            + f": {rec['seconds']:.0f} s)"
        )
    if done.get("seconds") is not None:
        line += f"; pruned model built in {done['seconds']:.0f} s"
    return line + "."


def _ratio(report: dict[str, Any], prov: str, t: dict[str, Any]) -> str:
    """Throughput over the PyTorch reference's on the same provider (else the CPU's)."""
    base = {p: b.get("throughput") for p, b in report["reference_bench"].items()}
    ref_tp = base.get(prov) or base.get("cpu")
    return f"{t['throughput'] / ref_tp:.2f}" if ref_tp else "-"


def _markdown_table(report: dict[str, Any]) -> list[str]:
    b = report.get("bench_config") or {}
    lines = [
        "",
        "Throughput: texts/s at batch "
        f"{next(iter(report['reference_bench'].values())).get('throughput_batch', '?')}, "
        "length-sorted batches of test texts, median of "
        f"{b.get('throughput_repeats', 1)} passes; × PyTorch = that over the PyTorch fp32 row.",
        "",
        "| variant | targets | size MB | agreement | Δacc | ΔmacroF1 | 95 % interval "
        "| max abs Δlogit | provider | p50 ms | p95 ms | texts/s | × PyTorch | eligible |",
        "|---|---|---:|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for prov, t in report["reference_bench"].items():
        lines.append(
            f"| pytorch_fp32 | - | - | 1.000 | 0 | 0 | - | 0 | {prov} | "
            f"{t['latency_p50_ms']:.2f} | {t['latency_p95_ms']:.2f} | {t['throughput']:.0f} "
            "| 1.00 | - |"
        )
    for name, v in report["variants"].items():
        lines += _variant_rows(report, name, v)
    for name, v in (report.get("rejected_variants") or {}).items():
        lines += _variant_rows(report, name, v, eligible="no: over budget")
    return lines


def _variant_rows(
    report: dict[str, Any], name: str, v: dict[str, Any], eligible: str | None = None
) -> list[str]:
    p = v["parity"]
    ci = p.get("macro_f1_delta_ci95")
    interval = f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "-"
    rows = []
    for prov, t in (v.get("bench") or {"-": {"error": "not timed"}}).items():
        timing = (
            f"{t['latency_p50_ms']:.2f} | {t['latency_p95_ms']:.2f} | {t['throughput']:.0f} "
            f"| {_ratio(report, prov, t)}"
            if "error" not in t
            else f"- | - | - ({t['error'][:40]}) | -"
        )
        rows.append(
            f"| {name} | {','.join(v['targets'])} | {v['size_mb']:.1f} | {p['agreement']:.3f} | "
            f"{p['accuracy_delta']:+.4f} | {p['macro_f1_delta']:+.4f} | {interval} | "
            f"{p['max_abs_logit_diff']:.2e} | {prov} | {timing} | "
            f"{eligible or ('yes' if name in report['eligible'] else 'no')} |"
        )
    return rows


def _fallback_line(name: str, fb: dict[str, Any]) -> str:
    tries = ", ".join(f"{t['float_nodes']} -> {-t['macro_f1_drop']:+.4f}" for t in fb["tries"])
    return (
        f"Accuracy-aware fallback for {name}: fully quantized ΔmacroF1 "
        f"{fb['quantized_macro_f1_delta']:+.4f}; tries (nodes in float -> ΔmacroF1): "
        f"{tries or 'none'}; "
        + (
            f"within budget with {len(fb['float_nodes'])} node(s) in float: "
            + ", ".join(f"`{x}`" for x in fb["float_nodes"])
            if fb["within_budget"]
            else "not within budget at the cap"
            + (
                f" (kept the best try: {len(fb['float_nodes'])} node(s) in float)"
                if fb["float_nodes"]
                else ""
            )
        )
        + ". The speed in the table is that of the variant as kept."
    )


def _why_rejected(report: dict[str, Any], name: str) -> str:
    v = (report.get("rejected_variants") or {}).get(name)
    if not v:
        return name
    target = report["target_provider"]
    t = v.get("bench", {}).get(target, {})
    speed = f", {_ratio(report, target, t)}× PyTorch" if "throughput" in t else ""
    return (
        f"{name} (ΔmacroF1 {v['parity']['macro_f1_delta']:+.4f}, agreement "
        f"{v['parity']['agreement']:.3f}{speed})"
    )


PROVIDER_COLOURS = {"cpu": "tab:blue", "cuda": "tab:green"}


def plot_tradeoff(report: dict[str, Any], dest: Path) -> None:
    """Macro-F1 vs batch-1 latency; marker area ~ file size; one colour per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tunery.io import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = _tradeoff_points(report)
    _plot_variants(ax, report, points)
    ref_f1 = report["reference"]["macro_f1"]
    for prov, t in report["reference_bench"].items():
        ax.scatter(t["latency_p50_ms"], ref_f1, marker="x", color="black")
        ax.annotate(
            f"pytorch fp32 ({prov})",
            (t["latency_p50_ms"], ref_f1),
            xytext=(6, -12),
            textcoords="offset points",
            fontsize=7,
        )
    ax.legend(handles=_legend(report, points), fontsize=7, loc="lower right")
    ax.margins(x=0.12, y=0.15)
    ax.set(
        xlabel="batch-1 latency p50 (ms)",
        ylabel="macro-F1 (judged rows)",
        title="Variants: accuracy vs latency (marker area ~ size)",
    )
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _tradeoff_points(report: dict[str, Any]) -> list[tuple]:
    """(latency, macro-F1, variant, provider, record) of every timed variant, by latency."""
    points = []
    for name, v in report["variants"].items():
        for prov, t in (v.get("bench") or {}).items():
            if "error" in t:
                continue
            points.append((t["latency_p50_ms"], v["parity"]["macro_f1"], name, prov, v))
    points.sort(key=lambda p: (p[0], -p[1]))
    return points


def _plot_variants(ax: Any, report: dict[str, Any], points: list[tuple]) -> None:
    # Labels of points close together (fp32 / fp16: same accuracy, similar latency) would overlap:
    # each label goes one line lower per earlier point near it.
    xs = [p[0] for p in points] + [t["latency_p50_ms"] for t in report["reference_bench"].values()]
    ys = [p[1] for p in points] + [report["reference"]["macro_f1"]]
    # A label is ~30 % of the axis wide: points that close in x share its line.
    dx, dy = 0.3 * (max(xs) - min(xs) or 1.0), 0.08 * (max(ys) - min(ys) or 1.0)
    for k, (x, y, name, prov, v) in enumerate(points):
        selected = name == report["selected"]
        near = sum(abs(x - q[0]) < dx and abs(y - q[1]) < dy for q in points[:k])
        ax.scatter(
            x,
            y,
            s=20 + 6 * v["size_mb"],
            alpha=0.6,
            color=PROVIDER_COLOURS.get(prov, "tab:gray"),
            edgecolors="black" if selected else "none",
            linewidths=2 if selected else 0,
        )
        ax.annotate(
            f"{name} ({prov}, {v['size_mb']:.0f} MB)",
            (x, y),
            xytext=(8, -4 - 12 * near),
            textcoords="offset points",
            fontsize=7,
            arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5} if near else None,
        )


def _legend(report: dict[str, Any], points: list[tuple]) -> list[Any]:
    from matplotlib.lines import Line2D

    return [
        Line2D([], [], marker="o", ls="", color=c, alpha=0.6, label=f"variant on {p}")
        for p, c in PROVIDER_COLOURS.items()
        if any(pt[3] == p for pt in points)
    ] + [
        Line2D(
            [],
            [],
            marker="o",
            ls="",
            mfc="none",
            mec="black",
            mew=2,
            label=f"selected: {report['selected']}",
        ),
        Line2D([], [], marker="x", ls="", color="black", label="PyTorch fp32 reference"),
    ]
