"""A ViT classifier to ONNX: one `pixel_values` input (the processor's contract), `logits` out.

The legacy exporter (`dynamo=False`, opset 17, ~1 s) as the text side uses; the batch axis is
dynamic, the image axes are fixed by the position embeddings (a ViT takes one image size).
`parity` runs the graph in onnxruntime CPU and compares with PyTorch: what an export must pass
before anything downstream trusts it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tunery.vision.processor import INPUT_NAME


class PixelLogits(torch.nn.Module):
    """transformers' forward takes keywords; the exporter passes positional tensors."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.inner(pixel_values=pixel_values).logits


def export_onnx(model: Any, dest: Path, *, opset: int = 17) -> Path:
    """Export `model`'s logits for `pixel_values` `[batch, C, size, size]`; `onnx.checker` it."""
    import onnx

    config = model.config
    size = config.image_size
    sample = torch.zeros(2, config.num_channels, size, size)
    wrapper = PixelLogits(model).eval()  # a new module starts in training mode (dropout on)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (sample,),
            str(dest),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=["logits"],
            dynamic_axes={INPUT_NAME: {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
        )
    onnx.checker.check_model(str(dest), full_check=True)
    return dest


def onnx_logits(model_path: Path, pixel_values: Any) -> Any:
    """Logits (numpy) of the exported graph in onnxruntime on CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {INPUT_NAME: pixel_values.numpy().astype("float32")})[0]


def parity(model: Any, model_path: Path, pixel_values: Any) -> dict[str, float]:
    """Largest absolute logit difference ONNX vs PyTorch, and the share of equal argmaxes."""
    from tunery.vision.finetune import logits

    reference = logits(model, pixel_values).numpy()
    got = onnx_logits(model_path, pixel_values)
    return {
        "max_abs_diff": float(abs(reference - got).max()),
        "argmax_agreement": float((reference.argmax(-1) == got.argmax(-1)).mean()),
    }
