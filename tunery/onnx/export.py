"""ONNX helpers: the fine-tuned model -> a checked, optimized ONNX graph in a deployable folder.

The deployable folder format (read by `tunery.onnx.runtime.Predictor`):

    model.onnx          the graph (inputs input_ids, attention_mask[, token_type_ids]; output logits)
    labels.json         the sorted label list (index = class id)
    tokenizer files     text models: what `AutoTokenizer.from_pretrained(folder)` needs
    tunery_model.json   {"format", "modality", "variant", "provider", "opset", "sha256",
                         "max_length" (text) | "processor" (image), "labels", "source"}

Two modalities share the folder: "text" (inputs input_ids, attention_mask[, token_type_ids]; the
tokenizer saved beside the graph) and "image" (one input `pixel_values`; the preprocessing the
graph expects is the manifest's "processor", `tunery.vision.processor.contract`). A manifest
without "modality" (written before images existed) is a text model.

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
MODALITIES = ("text", "image")


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

    from tunery.onnx.logits import Logits

    names = input_names_for(tokenizer, model)
    wrapper = Logits(model, names).eval()  # a new module starts in training mode (dropout on)
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
    cls_only: bool = True,
) -> dict[str, int]:
    """onnxruntime's transformer optimizer (fused attention, LayerNorm, GELU); fp16 for CUDA.

    With `cls_only`, the last layer's token-wise tail runs on the first token only when that is
    all the classifier reads (`cls_only_tail`; exact). Returns the fused operator counts (plus
    `ClsOnlyTail`: the nodes narrowed). Non-BERT-family encoders are copied unchanged.
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
        tail = cls_only_tail(opt.model) if cls_only else 0
        if fp16:
            # Inputs/outputs stay int64/float32, so callers do not change; the math is half precision.
            opt.convert_float_to_float16(keep_io_types=True)
        opt.save_model_to_file(str(dest))
    stats = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    if not stats.get("Attention") and not stats.get("MultiHeadAttention"):
        log.warning("%s: attention was not fused (%s)", dest.name, stats)
    if tail:
        stats["ClsOnlyTail"] = tail
    return stats


# Ops that act on each token's vector on its own (given constant weights): the last layer's
# attention output projection, residual adds, layer norms and FFN are all of this kind.
_TOKENWISE = {
    "MatMul",
    "Add",
    "Sum",
    "Cast",
    "BiasGelu",
    "Gelu",
    "FastGelu",
    "LayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
}

# What may feed that tail from outside: (batch, sequence, hidden) tensors.
_SEQUENCE_PRODUCERS = {
    "Attention",
    "MultiHeadAttention",
    "EmbedLayerNormalization",
    "LayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "Add",
    "Sum",
    "Reshape",
}


def _constants(graph: Any) -> dict[str, Any]:
    """Initializers and Constant node outputs, by name."""
    consts: dict[str, Any] = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = attr.t
    return consts


def _consumers(nodes: list[Any]) -> dict[str, list[Any]]:
    consumers: dict[str, list[Any]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _drop_shapes(graph: Any, stale: set[str]) -> None:
    """Shapes recorded for narrowed or packed tensors (sequence axis) no longer hold: drop them."""
    kept = [v for v in graph.value_info if v.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(kept)


def _sequence_inputs(names: list[str], producer: dict[str, Any]) -> bool:
    """Every name is produced by a node known to output (batch, sequence, hidden)."""
    return all(n in producer and producer[n].op_type in _SEQUENCE_PRODUCERS for n in names)


def _first_index(node: Any, consts: dict[str, Any]) -> bool:
    """`Gather(axis=1)` of index 0: the first token's hidden state."""
    from onnx import numpy_helper

    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    index = consts.get(node.input[1]) if len(node.input) > 1 else None
    if axis != 1 or index is None:
        return False
    value = numpy_helper.to_array(index)
    return value.size == 1 and int(value.reshape(-1)[0]) == 0


def cls_only_tail(model: Any) -> int:
    """Run the encoder's last token-wise ops on the first token only, when only it is read; in place.

    A sequence classifier reads the final hidden state at position 0 (`Gather(axis=1, index 0)`:
    BERT's pooler, the RoBERTa/ELECTRA heads), yet the exported graph computes the last layer's
    attention projection, layer norms and FFN for every token. This finds the token-wise nodes
    whose outputs reach nothing but that Gather, and slices their inputs from outside that region
    (the last attention's output and the residual) to position 0 (`Slice` on axis 1). Exact: the
    logits do not change. On the demo model (MiniLM-L6, 6 layers) the last layer's output
    projection and FFN are 1/8 of the encoder's matmul work. Returns the number of nodes narrowed
    (0: pattern not found, graph unchanged).
    """
    graph = model.graph
    consts = _constants(graph)
    nodes = list(graph.node)
    gathers = [n for n in nodes if n.op_type == "Gather" and _first_index(n, consts)]
    if len(gathers) != 1:
        return 0
    members = _tail_region(nodes, gathers[0], consts, {o.name for o in graph.output})
    if not members:
        return 0
    produced = {o for n in members for o in n.output}
    boundary = sorted(
        {i for n in members for i in n.input if i and i not in consts and i not in produced}
    )
    producer = {o: n for n in nodes for o in n.output}
    if not boundary or not _sequence_inputs(boundary, producer):
        return 0  # inputs we cannot be sure are (batch, sequence, hidden): leave the graph alone
    renamed = _slice_to_first_token(graph, nodes, members, boundary)
    _drop_shapes(graph, produced | set(renamed.values()))
    return len(members)


def _tail_region(nodes: list[Any], gather: Any, consts: dict, outputs: set[str]) -> list[Any]:
    """The token-wise nodes whose outputs reach nothing but `gather`."""
    consumers = _consumers(nodes)
    region = {id(gather)}
    members: list[Any] = []
    # Nodes are topologically sorted: walking back, a node's consumers are decided before it.
    for node in reversed(nodes[: nodes.index(gather)]):
        if not _is_tokenwise(node, consts):
            continue  # (a MatMul of two activations, attention scores, is not token-wise)
        users = [c for o in node.output if o for c in consumers.get(o, [])]
        if not users or any(o in outputs for o in node.output):
            continue
        if all(id(c) in region for c in users):
            region.add(id(node))
            members.append(node)
    return members


def _slice_to_first_token(
    graph: Any, nodes: list[Any], members: list[Any], boundary: list[str]
) -> dict[str, str]:
    """Feed `members` the first position of each boundary tensor (`Slice` on axis 1)."""
    import numpy as np
    from onnx import helper, numpy_helper

    prefix = "cls_only_tail"
    graph.initializer.extend(
        numpy_helper.from_array(np.array([v], dtype=np.int64), f"{prefix}_{k}")
        for k, v in (("start", 0), ("end", 1), ("axis", 1))
    )
    slices, renamed = [], {}
    for k, name in enumerate(boundary):
        renamed[name] = f"{name}_{prefix}"
        slices.append(
            helper.make_node(
                "Slice",
                [name, f"{prefix}_start", f"{prefix}_end", f"{prefix}_axis"],
                [renamed[name]],
                f"{prefix}_Slice_{k}",
            )
        )
    for node in members:
        for k, name in enumerate(node.input):
            if name in renamed:
                node.input[k] = renamed[name]
    first = min(nodes.index(n) for n in members)
    del graph.node[:]
    graph.node.extend(nodes[:first] + slices + nodes[first:])
    return renamed


def model_shape(model_or_config: Any) -> tuple[str, int, int]:
    config = getattr(model_or_config, "config", model_or_config)
    return (
        config.model_type,
        int(getattr(config, "num_attention_heads", 0) or 0),
        int(getattr(config, "hidden_size", 0) or 0),
    )


def _is_tokenwise(node: Any, consts: dict[str, Any]) -> bool:
    if node.op_type not in _TOKENWISE or node.domain not in ("", "ai.onnx", "com.microsoft"):
        return False
    return node.op_type != "MatMul" or node.input[1] in consts  # not activation x activation


def pack_tokens(model: Any, mask_input: str = "attention_mask") -> int:
    """Run the token-wise ops (projections, FFN, layer norms) on the real tokens only; in place.

    A batch of texts is padded to its longest one; attention needs that (batch, sequence) layout,
    but everything between two attentions acts on each token on its own, so it can run on the
    non-padding tokens packed together: each token-wise region's inputs are gathered to
    (1, tokens, hidden) by the attention mask, its outputs scattered back (padding positions get
    a copy of a real token's vector, which attention masks out). Exact for the real tokens.
    Sorted batches of the demo test texts are ~15 % padding. The last layer's first-token tail
    (`cls_only_tail`) is left as it is. Returns the number of nodes now running packed.
    """
    graph = model.graph
    if mask_input not in {i.name for i in graph.input}:
        return 0
    consts = _constants(graph)
    nodes = list(graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers = _consumers(nodes)
    outputs = {o.name for o in graph.output}
    tail = _first_token_tail(nodes, producer)
    packed = [
        n for n in nodes if _is_tokenwise(n, consts) and n.op_type != "Cast" and id(n) not in tail
    ]
    inside = {id(n) for n in packed}
    produced = {o for n in packed for o in n.output}
    sources = sorted(
        {
            i
            for n in packed
            for i in n.input
            if i and i not in consts and i not in produced and i not in outputs
        }
    )
    sinks = sorted(
        {
            o
            for n in packed
            for o in n.output
            if any(id(c) not in inside for c in consumers.get(o, []))
        }
    )
    if (
        not packed
        or not sources
        or any(o in outputs for o in produced)
        or not _sequence_inputs(sources, producer)
    ):
        return 0
    new = _pack_index_nodes(graph, mask_input)
    first = min(sources, key=lambda name: nodes.index(producer[name]))
    after: dict[int, list[Any]] = {
        id(producer[first]): [helper_node("Shape", [first], [f"{PACK}_shape"], f"{PACK}_shape")]
    }
    renamed = _pack_sources(sources, packed, producer, after)
    _unpack_sinks(sinks, producer, consumers, inside, after)
    # Topological order: the index nodes (mask only) first; each pack / unpack right after the
    # node producing what it gathers.
    ordered = list(new)
    for node in nodes:
        ordered.append(node)
        ordered.extend(after.get(id(node), []))
    del graph.node[:]
    graph.node.extend(ordered)
    _drop_shapes(graph, produced | set(renamed.values()))
    return len(packed)


PACK = "pack_tokens"


def helper_node(*args: Any, **kwargs: Any) -> Any:
    from onnx import helper

    return helper.make_node(*args, **kwargs)


def _first_token_tail(nodes: list[Any], producer: dict[str, Any]) -> set[int]:
    """The first-token tail (fed by cls_only_tail's slices): it stays as it is."""
    tail: set[int] = set()
    for node in nodes:
        if node.name.startswith("cls_only_tail_Slice") or (
            id(node) not in tail
            and any(i in producer and id(producer[i]) in tail for i in node.input)
        ):
            tail.add(id(node))
    return tail


def _pack_index_nodes(graph: Any, mask_input: str) -> list[Any]:
    """idx: flat positions of the real tokens; inv: for every flat position, its packed row
    (padding -> row 0, a real token: attention masks it out)."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    pre, mk = PACK, helper_node
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([-1], np.int64), f"{pre}_flat"),
            numpy_helper.from_array(np.array([0], np.int64), f"{pre}_axis0"),
            numpy_helper.from_array(np.array(1, np.int64), f"{pre}_one"),
            numpy_helper.from_array(np.array(0, np.int64), f"{pre}_zero"),
        ]
    )
    return [
        mk("Reshape", [mask_input, f"{pre}_flat"], [f"{pre}_mask"], f"{pre}_mask"),
        mk("Cast", [f"{pre}_mask"], [f"{pre}_real"], f"{pre}_real", to=TensorProto.BOOL),
        mk("NonZero", [f"{pre}_real"], [f"{pre}_nz"], f"{pre}_nonzero"),
        mk("Reshape", [f"{pre}_nz", f"{pre}_flat"], [f"{pre}_idx"], f"{pre}_idx"),
        mk("Cast", [f"{pre}_real"], [f"{pre}_count"], f"{pre}_count", to=TensorProto.INT64),
        mk("CumSum", [f"{pre}_count", f"{pre}_zero"], [f"{pre}_cum"], f"{pre}_cumsum"),
        mk("Sub", [f"{pre}_cum", f"{pre}_one"], [f"{pre}_pos"], f"{pre}_pos"),
        mk("Where", [f"{pre}_real", f"{pre}_pos", f"{pre}_zero"], [f"{pre}_inv"], f"{pre}_inv"),
    ]


def _pack_sources(
    sources: list[str], packed: list[Any], producer: dict[str, Any], after: dict[int, list]
) -> dict[str, str]:
    """Gather each region input to (1, tokens, hidden); the region reads the packed copy."""
    pre, mk = PACK, helper_node
    renamed = {}
    for k, name in enumerate(sources):
        flat, rows = f"{name}_{pre}_flat", f"{name}_{pre}_rows"
        renamed[name] = f"{name}_{pre}"
        after.setdefault(id(producer[name]), []).extend(
            [
                mk("Flatten", [name], [flat], f"{pre}_flatten_{k}", axis=2),
                mk("Gather", [flat, f"{pre}_idx"], [rows], f"{pre}_gather_{k}", axis=0),
                mk("Unsqueeze", [rows, f"{pre}_axis0"], [renamed[name]], f"{pre}_unsqueeze_{k}"),
            ]
        )
    for node in packed:
        for k, name in enumerate(node.input):
            if name in renamed:
                node.input[k] = renamed[name]
    return renamed


def _unpack_sinks(
    sinks: list[str],
    producer: dict[str, Any],
    consumers: dict[str, list[Any]],
    inside: set[int],
    after: dict[int, list],
) -> None:
    """Scatter each region output back to (batch, sequence, hidden) for the nodes outside."""
    pre, mk = PACK, helper_node
    for k, name in enumerate(sinks):
        flat, rows, out = f"{name}_{pre}_flat", f"{name}_{pre}_rows", f"{name}_{pre}_padded"
        after.setdefault(id(producer[name]), []).extend(
            [
                mk("Flatten", [name], [flat], f"{pre}_unflatten_{k}", axis=2),
                mk("Gather", [flat, f"{pre}_inv"], [rows], f"{pre}_scatter_{k}", axis=0),
                mk("Reshape", [rows, f"{pre}_shape"], [out], f"{pre}_unpack_{k}"),
            ]
        )
        for c in consumers.get(name, []):
            if id(c) not in inside:
                for j, i in enumerate(c.input):
                    if i == name:
                        c.input[j] = out


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
    labels: list[str],
    variant: str,
    provider: str,
    opset: int,
    source: dict[str, Any],
    tokenizer: Any = None,
    max_length: int | None = None,
    processor: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fill `dest` (an existing, empty folder) with a deployable model; return its manifest.

    A text model passes its `tokenizer` and `max_length`; an image model its `processor`
    contract (`tunery.vision.processor.contract`) instead."""
    if (tokenizer is None) == (processor is None):
        raise ValueError("a model folder has either a tokenizer (text) or a processor (image)")
    shutil.copyfile(onnx_file, dest / MODEL_FILE)
    check_external_data(dest / MODEL_FILE)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(dest))
    (dest / LABELS_FILE).write_text(json.dumps(labels, indent=2) + "\n")
    inputs = {"max_length": max_length} if processor is None else {"processor": processor}
    manifest = {
        "format": FORMAT,
        "modality": "text" if processor is None else "image",
        "variant": variant,
        "provider": provider,
        "opset": opset,
        "sha256": sha256_file(dest / MODEL_FILE),
        **inputs,
        "labels": len(labels),
        "source": source,
        **(extra or {}),
    }
    (dest / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest as written, unchecked ({} when there is none): for code that only labels a
    folder (its modality), not loads it; loading goes through `verify_model_dir`."""
    path = Path(folder) / MANIFEST_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def modality(manifest: dict[str, Any]) -> str:
    """ "text" or "image": what a verified model folder takes as input."""
    return str(manifest.get("modality", "text"))


def _check_modality(manifest_path: Path, manifest: dict[str, Any]) -> None:
    kind = modality(manifest)
    if kind not in MODALITIES:
        raise TuneryError(
            f"{manifest_path}: unknown modality {kind!r} (one of {', '.join(MODALITIES)})"
        )
    if kind == "image" and not isinstance(manifest.get("processor"), dict):
        raise TuneryError(
            f'{manifest_path}: an image model needs its "processor" (the pixel_values '
            "contract the graph was trained with); re-run the export stage"
        )


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
    _check_modality(manifest_path, manifest)
    if sha256_file(model_path) != manifest.get("sha256"):
        raise TuneryError(
            f"{model_path}: sha256 does not match {MANIFEST_FILE}; the file was changed after "
            "the run that produced it, refusing to load it"
        )
    if not (folder / LABELS_FILE).is_file():
        raise TuneryError(f"{folder}: {LABELS_FILE} is missing")
    check_external_data(model_path)
    return manifest


def deployable_files(folder: Path) -> list[str]:
    """The top-level names a deployable folder needs: everything but other ONNX graphs (export
    keeps `raw.onnx` beside `model.onnx` for compress; serving never reads it)."""
    needed = set(check_external_data(Path(folder) / MODEL_FILE))
    return sorted(
        p.name
        for p in Path(folder).iterdir()
        if p.name == MODEL_FILE or p.suffix != ".onnx" or p.name in needed
    )


def file_size(model_path: Path) -> int:
    """Bytes of the model plus its external data files."""
    return model_path.stat().st_size + sum(
        (model_path.parent / f).stat().st_size for f in check_external_data(model_path)
    )
