"""Structured pruning of the image ViT: whole layers, attention heads, FFN neurons.

The text pipeline's pruning (`tunery.onnx.compress.prune_ffn/prune_heads/drop_layers`) walks
BERT's module tree (`encoder.layer[i].attention.self.query`, `.intermediate.dense`); transformers'
ViT names the same parts `vit.layers[i].attention.{q,k,v,o}_proj` and `.mlp.fc1/fc2`. The
importance scores and the refit are the text side's own (`FfnStats`, `HeadStats`, `sliced_linear`,
`refit_output`, reused as they are); only where they are read and written differs. The
calibration is a few batches of images instead of token features (no padding mask: every patch
token is real).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

from tunery.errors import TuneryError

log = logging.getLogger("tunery.compress")


def vit_layers(model: Any) -> list[Any]:
    """The encoder layers of a `ViTForImageClassification` (transformers 5's module names)."""
    try:
        layers = list(model.vit.layers)
        for layer in layers:
            layer.attention.q_proj, layer.attention.o_proj, layer.mlp.fc1  # noqa: B018
    except AttributeError:
        raise TuneryError(
            "image pruning supports transformers' ViT (vit.layers[i].attention.q_proj, "
            f".mlp.fc1/fc2); got {type(model).__name__}"
        ) from None
    return layers


def _calibrate(model: Any, batches: Sequence[Any], hooks: dict[Any, Callable[..., None]]) -> None:
    """Run the pixel batches through `model`; hooks[module](x) gets each module's first input
    as (tokens, features) in float64."""
    import torch

    handles = [
        module.register_forward_hook(
            lambda _m, inp, _out, fn=fn: fn(inp[0].reshape(-1, inp[0].shape[-1]).double())
        )
        for module, fn in hooks.items()
    ]
    try:
        with torch.inference_mode():
            for x in batches:
                model(pixel_values=x)
    finally:
        for h in handles:
            h.remove()


def drop_layers(model: Any, keep: Sequence[int]) -> Any:
    """A copy of `model` with only the encoder layers `keep` (in order), weights as they were."""
    import torch

    model = copy.deepcopy(model).eval()
    layers = vit_layers(model)
    if not keep or any(not 0 <= i < len(layers) for i in keep) or len(set(keep)) != len(keep):
        raise TuneryError(
            f"drop_layers: {list(keep)} is not a set of layers of 0..{len(layers) - 1}"
        )
    model.vit.layers = torch.nn.ModuleList([layers[i] for i in keep])
    model.config.num_hidden_layers = len(keep)
    log.info("dropped layers: %d -> %d (kept %s)", len(layers), len(keep), list(keep))
    return model


def prune_ffn(model: Any, batches: Sequence[Any], fraction: float) -> Any:
    """A copy of `model` with `fraction` of each layer's FFN neurons removed, least important
    first (mean |activation| x ||W_fc2 column||, the removed neurons' mean folded into fc2's bias:
    `tunery.onnx.compress.prune_ffn`'s rule)."""
    from tunery.onnx.compress import FfnStats, sliced_ffn

    model = copy.deepcopy(model).eval()
    layers = vit_layers(model)
    width = layers[0].mlp.fc1.out_features
    keep = max(1, round(width * (1.0 - fraction)))
    stats = [FfnStats() for _ in layers]
    _calibrate(model, batches, {ly.mlp.fc2: st for ly, st in zip(layers, stats, strict=True)})
    for layer, st in zip(layers, stats, strict=True):
        layer.mlp.fc1, layer.mlp.fc2 = sliced_ffn(layer.mlp.fc1, layer.mlp.fc2, st, keep)
    model.config.intermediate_size = keep
    log.info("pruned FFN: %d -> %d neurons per layer", width, keep)
    return model


def prune_heads(model: Any, batches: Sequence[Any], heads: int, *, ridge: float = 1e-2) -> Any:
    """A copy of `model` with `heads` attention heads removed from every layer, least important
    first, o_proj refitted by ridge least squares (`tunery.onnx.compress.prune_heads`'s rule)."""
    import torch

    from tunery.onnx.compress import HeadStats, refit_output, sliced_linear

    model = copy.deepcopy(model).eval()
    layers = vit_layers(model)
    n_heads, size = int(layers[0].attention.num_attention_heads), int(layers[0].attention.head_dim)
    if not 0 < heads < n_heads:
        raise TuneryError(f"cannot remove {heads} of {n_heads} attention heads per layer")
    keep = n_heads - heads
    stats = [HeadStats(ly.attention.o_proj.weight, n_heads, size, gram=True) for ly in layers]
    _calibrate(
        model, batches, {ly.attention.o_proj: st for ly, st in zip(layers, stats, strict=True)}
    )
    with torch.no_grad():
        for layer, st in zip(layers, stats, strict=True):
            attn = layer.attention
            kept = torch.topk(torch.as_tensor(st["score"]).float(), keep).indices.sort().values
            idx = (kept[:, None] * size + torch.arange(size)).flatten()
            new_out = sliced_linear(attn.o_proj, idx, 1)
            refit_output(attn.o_proj, new_out, st, idx, refit="lstsq", ridge=ridge)
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(attn, name, sliced_linear(getattr(attn, name), idx, 0))
            attn.o_proj, attn.num_attention_heads = new_out, keep
    model.config.num_attention_heads = keep
    model.config.head_dim = size
    log.info("pruned attention: %d -> %d heads per layer", n_heads, keep)
    return model


def build_pruned(
    model: Any,
    calibration: Sequence[Any],
    pool: Any,
    cfg: Any,
    dest: Any,
    *,
    opset: int = 17,
) -> dict[str, Any]:
    """Prune `model` as `cfg` (a `VisionPruneConfig`) says: whole layers (`layer_choice`, the text
    side's `kept_layers`), then heads, then FFN neurons, scored on the `calibration` batches;
    distil it towards `model` on `pool` (`tunery.vision.recovery`, with `cfg.recovery.steps`);
    export it to `dest` (fp32 ONNX, `tunery.vision.export`). Returns what was done."""
    from tunery.onnx.compress import kept_layers
    from tunery.vision.export import export_onnx
    from tunery.vision.recovery import recover

    if not cfg.heads and not cfg.ffn_fraction and not cfg.layers:
        raise TuneryError(
            "compress.prune: set layers, heads and/or ffn_fraction to prune something"
        )
    n_layers, n_heads = len(vit_layers(model)), int(model.config.num_attention_heads)
    kept_idx = kept_layers(n_layers, cfg.layers, cfg.layer_choice)
    pruned = drop_layers(model, kept_idx) if cfg.layers else model
    if cfg.heads:
        pruned = prune_heads(pruned, calibration, cfg.heads)
    if cfg.ffn_fraction:
        pruned = prune_ffn(pruned, calibration, cfg.ffn_fraction)
    recovery = None
    if cfg.recovery.steps:
        pruned, recovery = recover(pruned, model, pool, cfg.recovery, teacher_layers=kept_idx)
    export_onnx(pruned, dest, opset=opset)
    return {
        "layers": len(kept_idx),
        "kept_layers": kept_idx,
        "heads_per_layer": n_heads - cfg.heads,
        "ffn_neurons_per_layer": int(pruned.config.intermediate_size),
        **({"recovery": recovery} if recovery is not None else {}),
    }
