"""ONNX helpers: the fine-tuned model -> a checked, optimized ONNX graph in a deployable folder.

The deployable folder format (read by `tunery.inference.Predictor`):

    model.onnx          the graph (inputs input_ids, attention_mask[, token_type_ids]; output logits)
    labels.json         the sorted label list (index = class id)
    tokenizer files     what `AutoTokenizer.from_pretrained(folder)` needs
    tunery_model.json   {"format", "variant", "provider", "opset", "sha256", "max_length", "source"}

The manifest is how the loader knows a file came from this project's runs: its sha256 must match
`model.onnx`, and external-data paths inside the graph may not leave the folder.

Heavy imports (torch, transformers, onnx, onnxruntime) happen inside functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunery.errors import TuneryError

log = logging.getLogger("tunery.onnx")

MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.json"
MANIFEST_FILE = "tunery_model.json"
FORMAT = "tunery-onnx/1"
EXPORTABLE_METHODS = ("lora", "ia3", "adalora", "full")
# Encoders whose graphs onnxruntime's "bert" optimizer knows how to fuse.
BERT_FAMILY = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert")
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


# --------------------------------------------------------------------------- the finetune output
@dataclass(frozen=True)
class Finetuned:
    """What the finetune stage left: a merged classifier folder, its labels and how it was made."""

    root: Path
    merged_dir: Path
    labels: list[str]
    info: dict[str, Any]

    @property
    def max_length(self) -> int:
        return int(self.info.get("max_length") or 128)


def load_finetuned(finetune_dir: Path) -> Finetuned:
    info_path = finetune_dir / "finetune.json"
    if not info_path.is_file():
        raise TuneryError(f"{info_path}: not found; run the finetune stage first")
    info = json.loads(info_path.read_text())
    method = info.get("method", "?")
    merged = finetune_dir / "merged"
    if method not in EXPORTABLE_METHODS or not info.get("mergeable", True) or not merged.is_dir():
        raise TuneryError(
            f"{finetune_dir}: the '{method}' fine-tune has no merged model, so it cannot be "
            f"exported to ONNX; methods that export: {', '.join(EXPORTABLE_METHODS)} "
            "(set finetune.method to one of them)"
        )
    labels = json.loads((finetune_dir / LABELS_FILE).read_text())
    return Finetuned(root=finetune_dir, merged_dir=merged, labels=labels, info=info)


def load_torch_model(model_dir: Path) -> Any:
    """The classifier in eval mode, eager attention (the pattern onnxruntime's fusions match)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), attn_implementation="eager"
    )
    return model.eval()


def input_names_for(tokenizer: Any, model: Any) -> list[str]:
    import inspect

    params = inspect.signature(model.forward).parameters
    wanted = set(tokenizer.model_input_names) | {"input_ids", "attention_mask"}
    return [n for n in TOKEN_INPUTS if n in wanted and n in params]


# --------------------------------------------------------------------------- export
def export_onnx(
    model: Any, tokenizer: Any, dest: Path, *, opset: int = 17, max_length: int = 128
) -> list[str]:
    """Export logits with dynamic batch and sequence axes; `onnx.checker` the result."""
    import onnx
    import torch

    names = input_names_for(tokenizer, model)

    class Logits(torch.nn.Module):
        # transformers' forward takes its inputs by keyword; the exporter passes them by position.
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return self.inner(**dict(zip(names, args, strict=True))).logits

    wrapper = Logits(model).eval()  # a new module starts in training mode (dropout on)
    sample = tokenizer(
        ["a short text", "a somewhat longer text to give the sequence axis two sizes"],
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    args = tuple(sample[n] if n in sample else torch.zeros_like(sample["input_ids"]) for n in names)
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"logits": {0: "batch"}}
    dest.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            args,
            str(dest),
            dynamo=False,
            opset_version=opset,
            input_names=names,
            output_names=["logits"],
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    try:
        onnx.checker.check_model(str(dest), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise TuneryError(f"{dest}: exported graph fails onnx.checker: {exc}") from None
    return names


def optimize(
    src: Path,
    dest: Path,
    *,
    model_type: str,
    num_heads: int,
    hidden_size: int,
    use_gpu: bool = False,
    fp16: bool = False,
) -> dict[str, int]:
    """onnxruntime's transformer optimizer (fused attention, LayerNorm, GELU); fp16 for CUDA.

    Returns the fused operator counts. Non-BERT-family encoders are copied unchanged.
    """
    if model_type not in BERT_FAMILY:
        log.warning("no transformer fusions for model type %r; graph left as exported", model_type)
        if fp16:
            raise TuneryError(f"fp16 conversion needs a BERT-family encoder (got {model_type!r})")
        shutil.copyfile(src, dest)
        return {}
    from onnxruntime.transformers.optimizer import optimize_model

    src, dest = Path(src).resolve(), Path(dest).resolve()
    # onnxruntime's symbolic shape inference drops `sym_shape_infer_temp.onnx` (+ external data)
    # into the working directory when it cannot infer every shape: keep that litter out of the project.
    with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):
        opt = optimize_model(
            str(src),
            model_type="bert",
            num_heads=num_heads,
            hidden_size=hidden_size,
            use_gpu=use_gpu,
        )
        if fp16:
            # Inputs/outputs stay int64/float32, so callers do not change; the math is half precision.
            opt.convert_float_to_float16(keep_io_types=True)
        opt.save_model_to_file(str(dest))
    stats = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    if not stats.get("Attention") and not stats.get("MultiHeadAttention"):
        log.warning("%s: attention was not fused (%s)", dest.name, stats)
    return stats


def model_shape(model_or_config: Any) -> tuple[str, int, int]:
    config = getattr(model_or_config, "config", model_or_config)
    return (
        config.model_type,
        int(getattr(config, "num_attention_heads", 0) or 0),
        int(getattr(config, "hidden_size", 0) or 0),
    )


# --------------------------------------------------------------------------- deployable folders
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_model_dir(
    dest: Path,
    *,
    onnx_file: Path,
    tokenizer: Any,
    labels: list[str],
    variant: str,
    provider: str,
    opset: int,
    max_length: int,
    source: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fill `dest` (an existing, empty folder) with a deployable model; return its manifest."""
    shutil.copyfile(onnx_file, dest / MODEL_FILE)
    check_external_data(dest / MODEL_FILE)
    tokenizer.save_pretrained(str(dest))
    (dest / LABELS_FILE).write_text(json.dumps(labels, indent=2) + "\n")
    manifest = {
        "format": FORMAT,
        "variant": variant,
        "provider": provider,
        "opset": opset,
        "sha256": sha256_file(dest / MODEL_FILE),
        "max_length": max_length,
        "labels": len(labels),
        "source": source,
        **(extra or {}),
    }
    (dest / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _tensors(graph: Any) -> Any:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def check_external_data(model_path: Path) -> list[str]:
    """Refuse external-data locations outside the model's folder; return the files referenced."""
    import onnx

    folder = model_path.parent.resolve()
    proto = onnx.load(str(model_path), load_external_data=False)
    files = []
    for tensor in _tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if not location or os.path.isabs(location) or not target.is_relative_to(folder):
            raise TuneryError(
                f"{model_path}: tensor {tensor.name!r} points its external data at {location!r}, "
                "outside the model folder; refusing to load it"
            )
        if not target.is_file():
            raise TuneryError(f"{model_path}: external data file {location!r} is missing")
        files.append(location)
    return sorted(set(files))


def verify_model_dir(folder: Path) -> dict[str, Any]:
    """The manifest of a deployable folder made by this project, after checking it; else TuneryError."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    model_path = folder / MODEL_FILE
    if not folder.is_dir():
        raise TuneryError(f"{folder}: model folder not found (run the compress stage first?)")
    if not manifest_path.is_file() or not model_path.is_file():
        raise TuneryError(
            f"{folder}: not a Tunery model folder (needs {MODEL_FILE} and {MANIFEST_FILE} as "
            "written by the export/compress stages); refusing to load ONNX files from elsewhere"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise TuneryError(f"{manifest_path}: not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise TuneryError(f"{manifest_path}: unknown format {manifest.get('format')!r}")
    if sha256_file(model_path) != manifest.get("sha256"):
        raise TuneryError(
            f"{model_path}: sha256 does not match {MANIFEST_FILE}; the file was changed after "
            "the run that produced it, refusing to load it"
        )
    if not (folder / LABELS_FILE).is_file():
        raise TuneryError(f"{folder}: {LABELS_FILE} is missing")
    check_external_data(model_path)
    return manifest


def file_size(model_path: Path) -> int:
    """Bytes of the model plus its external data files."""
    return model_path.stat().st_size + sum(
        (model_path.parent / f).stat().st_size for f in check_external_data(model_path)
    )
