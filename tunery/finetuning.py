"""Fine-tuning glue: data, a model per PEFT method, the `Trainer` set-up, merge checks, loading.

Every method (LoRA, IA3, AdaLoRA, prefix tuning, full) trains the classification head: the head, and
any other module the encoder checkpoint lacks (a BERT pooler after MLM pretraining), are peft's
`modules_to_save`, so they train and are saved with the adapter.

torch, transformers and peft are imported inside functions: importing this module is cheap, and the
GPU machine (no mlflow/prefect/dvc) can import it too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunery.errors import DataValidationError, TuneryError

# Checkpoints and fingerprints: one implementation, shared with pretraining. A checkpoint is
# complete once `CompletionMarker` has recorded its files; `fingerprint` (a hash of settings and
# file contents) keys the resume folder and ties an adapter to its encoder.
from tunery.training import fingerprint_files as fingerprint
from tunery.training import (
    is_main_process,
    last_complete_checkpoint,
    length_sorted_batches,
    trainer_callbacks,
    training_args,
    world_size,
)

if TYPE_CHECKING:  # pydantic is not on the GPU machine; the bench passes a look-alike there
    from tunery.config import FinetuneConfig

log = logging.getLogger("tunery.finetuning")

METHODS = ("lora", "ia3", "adalora", "prefix", "full")
PEFT_METHODS = ("lora", "ia3", "adalora", "prefix")
MERGEABLE = ("lora", "ia3", "adalora")  # peft can fold these into the base weights
PEFT_TYPE = {"lora": "LORA", "ia3": "IA3", "adalora": "ADALORA", "prefix": "PREFIX_TUNING"}

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
LABELS_FILE = "labels.json"
INFO_FILE = "finetune.json"
# The arms table (probe, base, pipeline, full: what each stage bought) and the pretrain gate's
# decision; written by the finetune stage, read with `read_arms`.
ARMS_FILE = "arms.json"
ARM_ORDER = ("probe", "base", "pipeline", "full")
SPLIT_FILES = ("train", "val", "test", "holdout")
RANK_PATTERN_FILE = "adalora_rank_pattern.json"
ALL_LINEAR = "all-linear"  # a target_modules shorthand (see `linear_targets`)


class FinetuneError(TuneryError):
    """The model, adapter or method cannot be used as configured."""


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Split:
    name: str
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


def read_labels(path: Path) -> list[str]:
    try:
        labels = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataValidationError(path, "missing_file", "label list not found") from None
    if not isinstance(labels, list) or len(labels) < 2 or labels != sorted(set(labels)):
        raise DataValidationError(
            path, "bad_labels", "expected a sorted list of >= 2 unique labels"
        )
    return [str(x) for x in labels]


def load_split(path: Path, labels: Sequence[str], *, allow_empty: bool = False) -> Split:
    """Read a prepared split; every label must be one the model knows (index in `labels`)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataValidationError(path, "missing_file", "split not found; run the prepare stage")
    df = pd.read_parquet(path)
    missing = {"text", "label"} - set(df.columns)
    if missing:
        raise DataValidationError(path, "missing_column", f"columns {sorted(missing)} are missing")
    if df.empty and not allow_empty:
        raise DataValidationError(
            path, "empty_split", f"the {path.stem} split is empty; add data or change the fractions"
        )
    index = {label: i for i, label in enumerate(labels)}
    unknown_mask = ~df["label"].astype(str).isin(index)
    if unknown_mask.any():
        unknown = sorted(df.loc[unknown_mask, "label"].astype(str).unique())
        rows = [int(i) + 1 for i in df.index[unknown_mask]]
        raise DataValidationError(
            path,
            "unknown_label",
            f"labels {unknown} are not among the model's {len(labels)} labels {list(labels)}",
            rows=rows,
        )
    return Split(
        name=path.stem,
        texts=df["text"].astype(str).tolist(),
        labels=[index[str(x)] for x in df["label"]],
    )


def write_arms(finetune_dir: Path, report: Mapping[str, Any]) -> Path:
    """Write `arms.json`: `chosen`, `pretrain_gate` and `arms` (in `ARM_ORDER`)."""
    arms = report["arms"]
    unknown = set(arms) - set(ARM_ORDER)
    if unknown or report["chosen"] not in arms:
        raise FinetuneError(f"arms table: unknown arms {sorted(unknown)} or chosen not among them")
    ordered = {
        "chosen": report["chosen"],
        "pretrain_gate": dict(report["pretrain_gate"]),
        "arms": {name: arms[name] for name in ARM_ORDER if name in arms},
    }
    path = Path(finetune_dir) / ARMS_FILE
    path.write_text(json.dumps(ordered, indent=2) + "\n")
    return path


def read_arms(finetune_dir: Path) -> dict[str, Any]:
    """The arms table of a finetune output (see `write_arms`)."""
    path = Path(finetune_dir) / ARMS_FILE
    if not path.is_file():
        raise FinetuneError(f"{finetune_dir}: no {ARMS_FILE}; run finetune")
    report = json.loads(path.read_text())
    if (
        not {"chosen", "pretrain_gate", "arms"} <= set(report)
        or report["chosen"] not in report["arms"]
    ):
        raise FinetuneError(f"{path}: not an arms table (chosen, pretrain_gate, arms)")
    return report


# --------------------------------------------------------------------------- devices and memory
def resolve_device(cfg: FinetuneConfig) -> str:
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("finetune.device is cuda but no CUDA device is available")
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def resolve_precision(cfg: FinetuneConfig, device: str) -> str:
    import torch

    if cfg.precision == "bf16" and device == "cpu":
        raise FinetuneError("finetune.precision bf16 needs a GPU here; use auto or fp32 on CPU")
    if cfg.precision == "auto":
        return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return cfg.precision


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak on a GPU, sampled process RSS on CPU.

    On CPU `peak_mb` is the process's peak resident memory during the block and `delta_mb` its rise
    above the start (what the block itself needed, roughly).
    """

    def __init__(self, device: str, interval_s: float = 0.05) -> None:
        self.device, self.interval_s = device, interval_s
        self.peak_mb = self.delta_mb = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start = self._peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _rss_bytes())
        self.peak_mb = round(peak / 2**20, 1)
        self.delta_mb = round((peak - self._start) / 2**20, 1)


# --------------------------------------------------------------------------- models
def _peft_defaults(method: str, model_type: str) -> tuple[list[str] | None, list[str] | None]:
    from peft.utils import constants as c

    if method == "ia3":
        return (
            c.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(model_type),
            c.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type),
        )
    mapping = (
        c.TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING
        if method == "adalora"
        else c.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    )
    return mapping.get(model_type), None


def check_supported(cfg: FinetuneConfig, method: str, model: Any) -> None:
    """Fail before training when `method` cannot adapt this architecture (a clear message)."""
    import inspect

    model_type = model.config.model_type
    if method not in METHODS:
        raise FinetuneError(f"unknown fine-tuning method {method!r}; expected one of {METHODS}")
    if method == "full":
        return
    if method == "prefix":
        # peft feeds the prefix to every attention layer as past key/values.
        base = getattr(model, model.base_model_prefix, model)
        if "past_key_values" not in inspect.signature(base.forward).parameters:
            raise FinetuneError(
                f"prefix tuning needs an encoder that accepts past_key_values; "
                f"{type(base).__name__} ({model_type}) does not. Use lora, ia3, adalora or full"
            )
        return
    sub = getattr(cfg, method)
    if sub.target_modules == ALL_LINEAR:
        if not linear_targets(model, []):
            raise FinetuneError(
                f"finetune.{method}.target_modules all-linear: {type(model).__name__} "
                f"({model_type}) has no linear layer outside its head"
            )
        return
    targets = sub.target_modules or _peft_defaults(method, model_type)[0]
    if not targets:
        raise FinetuneError(
            f"peft has no default target modules for {method} on model type {model_type!r}; "
            f"set finetune.{method}.target_modules"
        )
    names = [n for n, _ in model.named_modules()]
    if not any(n == t or n.endswith("." + t) for n in names for t in targets):
        raise FinetuneError(
            f"finetune.{method}.target_modules {list(targets)} match no module of "
            f"{type(model).__name__} ({model_type})"
        )


def fully_trained(model: Any, suffixes: Sequence[str]) -> list[str]:
    """The modules named by `finetune.lora.train_fully` (suffixes) that this model has."""
    return sorted(
        n
        for n, _ in model.named_modules()
        if n and any(n == s or n.endswith("." + s) for s in suffixes)
    )


def linear_targets(model: Any, new_modules: Sequence[str]) -> list[str]:
    """`all-linear`, resolved: the encoder's linear layers, without the classification head and
    the newly initialised modules (those are `modules_to_save`: trained fully, not adapted).

    Resolved here rather than by peft's own "all-linear", which knows the head only by a few
    conventional names and would put an adapter inside a `modules_to_save` pooler.
    """
    import torch

    skip = (*new_modules, "classifier", "score")
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        names.append(name)
    return names


def peft_config(
    cfg: FinetuneConfig,
    method: str,
    *,
    model_type: str,
    total_steps: int,
    new_modules: list[str],
    model: Any = None,
) -> Any:
    from peft import AdaLoraConfig, IA3Config, LoraConfig, PrefixTuningConfig, TaskType

    common = {"task_type": TaskType.SEQ_CLS, "modules_to_save": list(new_modules) or None}
    if method == "lora":
        m = cfg.lora
        targets = m.target_modules
        fully = fully_trained(model, m.train_fully) if model is not None else []
        if fully:  # peft matches modules_to_save by the last name ("pooler"), as "classifier"
            # (a new module inside a fully trained one is trained with it: not wrapped twice)
            inner = {n for n in new_modules if any(n.startswith(f + ".") for f in fully)}
            names = {*(set(new_modules) - inner), *(f.rsplit(".", 1)[-1] for f in fully)}
            common["modules_to_save"] = sorted(names)
        if targets == ALL_LINEAR:
            if model is None:
                raise FinetuneError("lora target_modules all-linear needs the model to resolve")
            targets = linear_targets(model, [*new_modules, *fully])
        return LoraConfig(
            r=m.r,
            lora_alpha=m.alpha,
            lora_dropout=m.dropout,
            target_modules=targets,
            use_rslora=getattr(m, "use_rslora", False),
            **common,
        )
    if method == "ia3":
        m = cfg.ia3
        targets, ff = m.target_modules, m.feedforward_modules
        if targets is not None and ff is None:
            ff = [t for t in (_peft_defaults("ia3", model_type)[1] or []) if t in targets]
        return IA3Config(target_modules=targets, feedforward_modules=ff, **common)
    if method == "adalora":
        m = cfg.adalora
        tinit = int(m.warmup_share * total_steps)
        tfinal = int(m.final_share * total_steps)
        if tinit >= total_steps - tfinal:
            raise FinetuneError(
                f"adalora: {total_steps} training steps leave no room for rank budgeting; "
                "train longer or lower finetune.adalora.warmup_share/final_share"
            )
        return AdaLoraConfig(
            init_r=m.init_r,
            target_r=m.target_r,
            lora_alpha=m.alpha,
            lora_dropout=m.dropout,
            target_modules=m.target_modules,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=m.delta_t,
            total_step=total_steps,
            **common,
        )
    if method == "prefix":
        m = cfg.prefix
        return PrefixTuningConfig(
            num_virtual_tokens=m.num_virtual_tokens, prefix_projection=m.projection, **common
        )
    raise FinetuneError(f"unknown fine-tuning method {method!r}; expected one of {METHODS}")


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the load report is ours to log (below), in one line


def load_base(
    encoder: Path, labels: Sequence[str], *, init: str = "pretrained", seed: int = 0
) -> tuple[Any, list[str]]:
    """A sequence classifier on the encoder, and the modules the encoder checkpoint lacked."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, set_seed

    _quiet_transformers()
    encoder = Path(encoder)
    if not (encoder / "config.json").is_file():
        raise FinetuneError(f"{encoder}: not a model directory (no config.json); run pretrain")
    kwargs = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }
    set_seed(seed)  # the head's initial weights
    if init == "random":
        config = AutoConfig.from_pretrained(encoder, **kwargs)
        model = AutoModelForSequenceClassification.from_config(config)
        return model, _head_modules(model, [n for n, _ in model.named_parameters()])
    model, info = AutoModelForSequenceClassification.from_pretrained(
        encoder, output_loading_info=True, **kwargs
    )
    new = _head_modules(model, info["missing_keys"])
    if new:
        log.info("newly initialised (trained with the adapter): %s", new)
    return model, new


def _head_modules(model: Any, missing_keys: Sequence[str]) -> list[str]:
    """Module names owning the parameters the checkpoint lacked (the head, maybe a pooler)."""
    owners: list[str] = []
    backbone = model.base_model_prefix
    for key in missing_keys:
        module = key.rsplit(".", 1)[0]
        if module.split(".")[0] == backbone and ".pooler" not in module:
            continue  # a random encoder (ablation) stays frozen for PEFT methods, as in real use
        if module not in owners:
            owners.append(module)
    return owners


def build_model(
    cfg: FinetuneConfig,
    *,
    method: str,
    encoder: Path,
    labels: Sequence[str],
    init: str = "pretrained",
    warm_start: Path | None = None,
    total_steps: int = 1,
) -> Any:
    """The model to train: the encoder + head, wrapped for `method`, optionally warm-started."""
    model, new_modules = load_base(encoder, labels, init=init, seed=cfg.seed)
    check_supported(cfg, method, model)
    if warm_start is not None:
        return _warm_start(model, method=method, labels=labels, warm_start=warm_start)
    if method == "full":
        return model
    from peft import get_peft_model

    pcfg = peft_config(
        cfg,
        method,
        model_type=model.config.model_type,
        total_steps=total_steps,
        new_modules=new_modules,
        model=model,
    )
    try:
        return get_peft_model(model, pcfg)
    except ValueError as exc:  # e.g. target modules not found
        raise FinetuneError(f"{method} cannot adapt {type(model).__name__}: {exc}") from None


def _warm_start(model: Any, *, method: str, labels: Sequence[str], warm_start: Path) -> Any:
    """Continue from a previous fine-tune (the champion's): same method, labels and encoder shape."""
    info_path = warm_start / INFO_FILE
    if not info_path.is_file():
        raise FinetuneError(f"{warm_start}: not a finetune output (no {INFO_FILE})")
    info = json.loads(info_path.read_text())
    if info.get("method") != method:
        raise FinetuneError(
            f"{warm_start}: warm start from a {info.get('method')!r} fine-tune, "
            f"but finetune.method is {method!r}"
        )
    old_labels = read_labels(warm_start / LABELS_FILE)
    if list(old_labels) != list(labels):
        raise FinetuneError(
            f"{warm_start}: its labels {old_labels} differ from the data's {list(labels)}; "
            "a new label set needs a fresh fine-tune (finetune.warm_start: null)"
        )
    adapter = warm_start / ADAPTER_DIR
    if method == "full":
        from safetensors.torch import load_file

        files = sorted(adapter.glob("*.safetensors"))
        if not files:
            raise FinetuneError(f"{adapter}: no safetensors weights")
        state: dict[str, Any] = {}
        for f in files:
            state.update(load_file(f))
        _load_strict(model, state, adapter)
        return model
    from peft import PeftConfig, get_peft_model
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    pcfg = PeftConfig.from_pretrained(str(adapter))
    pcfg.inference_mode = False
    try:
        peft_model = get_peft_model(model, pcfg)
        result = set_peft_model_state_dict(
            peft_model, load_peft_weights(str(adapter), device="cpu")
        )
    except (ValueError, RuntimeError) as exc:
        raise FinetuneError(f"{adapter}: the adapter does not match the encoder: {exc}") from None
    if result.unexpected_keys:
        raise FinetuneError(
            f"{adapter}: the adapter does not match the encoder: "
            f"{len(result.unexpected_keys)} weights have no place in it, e.g. {result.unexpected_keys[:2]}"
        )
    log.info("warm start from %s", adapter)
    return peft_model


def _load_strict(model: Any, state: Mapping[str, Any], where: Path) -> None:
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise FinetuneError(f"{where}: the model does not match the encoder: {exc}") from None
    # Tied or buffer-only keys may be absent; anything the model has no place for is a mismatch.
    if result.unexpected_keys or len(result.missing_keys) > len(state) // 2:
        raise FinetuneError(
            f"{where}: the model does not match the encoder "
            f"({len(result.unexpected_keys)} unknown, {len(result.missing_keys)} missing weights)"
        )


def effective_max_length(cfg: FinetuneConfig, method: str, model_config: Any) -> int:
    """`finetune.max_length`, capped by the encoder's position embeddings.

    Prefix tuning's virtual tokens take positions too (the encoder sees them as past tokens).
    """
    limit = getattr(model_config, "max_position_embeddings", None) or cfg.max_length
    if model_config.model_type in ("roberta", "xlm-roberta", "camembert"):
        limit -= 2  # positions start after the padding index
    if method == "prefix":
        limit -= cfg.prefix.num_virtual_tokens
    if limit < 8:
        raise FinetuneError(
            f"the encoder has {limit} positions left for text with {method}; "
            "lower finetune.prefix.num_virtual_tokens or use another method"
        )
    return min(cfg.max_length, limit)


def trainable_parameters(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# --------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    model: Any
    best_val_macro_f1: float
    epochs: float
    steps: int
    train_seconds: float  # training steps only (no evaluation)
    samples_per_s: float
    tokens_per_s: float  # real (non-padding) tokens
    padding_share: float
    peak_memory_mb: float
    memory_delta_mb: float
    resumed_from: str | None
    history: list[dict[str, float]] = field(default_factory=list)
    # Per optimizer step (this process's steps; a resumed run lacks the earlier ones).
    step_seconds: list[float] = field(default_factory=list)
    step_samples: list[int] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)
    step_padded: list[int] = field(default_factory=list)
    # The fast-path settings this run used (pad multiple, compile mode, loader workers).
    settings: dict[str, Any] = field(default_factory=dict)


class _TokenCounter:
    """Counts real and padded tokens of training batches (device tensors: no sync per step)."""

    def __init__(self) -> None:
        self.real: list[Any] = []  # per step
        self.padded: list[int] = []
        self.samples: list[int] = []

    def add(self, mask: Any) -> None:
        self.real.append(mask.sum())
        self.padded.append(int(mask.numel()))
        self.samples.append(int(mask.shape[0]))


def tokenize(tokenizer: Any, split: Split, max_length: int) -> list[dict[str, Any]]:
    enc = tokenizer(split.texts, truncation=True, max_length=max_length)
    keys = [k for k in enc if k in ("input_ids", "attention_mask", "token_type_ids")]
    return [{**{k: enc[k][i] for k in keys}, "labels": split.labels[i]} for i in range(len(split))]


def class_weight_vector(labels: Sequence[int], n_classes: int) -> list[float]:
    """'balanced' weights: n / (k * count), so a balanced set gets all ones."""
    counts = [0] * n_classes
    for y in labels:
        counts[y] += 1
    n = len(labels)
    return [n / (n_classes * c) if c else 0.0 for c in counts]


def macro_f1_from_logits(eval_pred: Any) -> dict[str, float]:
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score

    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    pred = np.asarray(logits).argmax(-1)
    return {
        "macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(labels, pred)),
    }


def model_files(folder: Path) -> list[Path]:
    """The files that define a model dir's weights and config (for fingerprints)."""
    folder = Path(folder)
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and (p.suffix in (".safetensors", ".json") or p.name == "vocab.txt")
    )


def cuda_settings(
    cfg: FinetuneConfig, method: str, device: str, use_compile: bool
) -> dict[str, Any]:
    """The GPU fast path's settings; on CPU exactly what the stage always did (no extra settings).

    With short texts (the demo's glosses are ~20 tokens) a step is bound by kernel launches and
    host work, not by the GPU's arithmetic: so on CUDA, lengths padded to a multiple of 32 (few
    shapes), torch.compile with CUDA graphs ("reduce-overhead") for the methods tested with it,
    batches collated in worker processes and copied from pinned memory without blocking, and no
    per-step host synchronisation (the Trainer's NaN/Inf loss filter reads the loss every step;
    off on CUDA: a NaN loss shows in the logged average instead of being skipped).
    """
    cuda = device == "cuda"
    pad = getattr(cfg, "pad_to_multiple_of", None)
    workers = getattr(cfg, "dataloader_workers", None)
    workers = (2 if cuda else 0) if workers is None else workers
    mode = getattr(cfg, "compile_mode", "auto") or "auto"
    if mode == "auto":
        graphs = cuda and method in ("lora", "ia3", "full")
        mode = "reduce-overhead" if graphs else "default"
    trainer: dict[str, Any] = {"dataloader_num_workers": workers}
    if workers:
        trainer["dataloader_persistent_workers"] = True
    if use_compile and mode != "default":
        trainer["torch_compile_mode"] = mode
    if cuda:
        trainer["logging_nan_inf_filter"] = False
        trainer["dataloader_pin_memory"] = True
        trainer["accelerator_config"] = {"non_blocking": True}
    return {
        "pad_to_multiple_of": pad if pad is not None else (32 if cuda else None),
        "compile_mode": mode if use_compile else None,
        "trainer": trainer,
    }


def train(
    model: Any,
    tokenizer: Any,
    cfg: FinetuneConfig,
    *,
    method: str,
    train_split: Split,
    val_split: Split,
    checkpoint_dir: Path | None,
    max_length: int,
    epochs: float | None = None,
    on_log: Callable[[dict[str, float], int], None] | None = None,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Train with `transformers.Trainer`: early stopping on validation macro-F1, best model kept.

    With `checkpoint_dir`, checkpoints (safetensors weights) are kept there and a run with the
    same folder resumes from the last complete one; without, a temporary folder is used.
    """
    import torch
    from transformers import (
        DataCollatorWithPadding,
        EarlyStoppingCallback,
        PrinterCallback,
        Trainer,
        TrainerCallback,
    )

    device = resolve_device(cfg)
    precision = resolve_precision(cfg, device)
    if getattr(cfg, "threads", 0):
        torch.set_num_threads(cfg.threads)
    cuda = device == "cuda"
    # Compiled kernels are chosen by timing, so two compiled CUDA runs can differ (measured on the
    # H100: 6.7e-4 max weight difference, 0 without compile): `deterministic` keeps compile off.
    use_compile = cfg.compile if cfg.compile is not None else cuda and not cfg.deterministic
    if use_compile and cuda and cfg.deterministic:
        log.warning(
            "finetune.deterministic with compile on CUDA: re-runs may still differ slightly"
        )
    fast = cuda_settings(cfg, method, device, use_compile)
    epochs = cfg.epochs if epochs is None else epochs
    n_classes = model.config.num_labels
    lr = getattr(cfg, method).learning_rate

    train_features = tokenize(tokenizer, train_split, max_length)
    val_features = tokenize(tokenizer, val_split, max_length)
    # On CUDA, lengths rounded up to a multiple of 32: few shapes for torch.compile / CUDA graphs.
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=fast["pad_to_multiple_of"])
    counter = _TokenCounter()
    steps_per_epoch = math.ceil(len(train_features) / cfg.batch_size)
    processes = world_size()
    if cfg.batch_size % processes:
        raise FinetuneError(
            f"finetune.batch_size {cfg.batch_size} is the global batch and must divide evenly "
            f"among the {processes} training processes"
        )

    loss_func = None
    if cfg.class_weights == "balanced":
        weights = torch.tensor(class_weight_vector(train_split.labels, n_classes))

        def loss_func(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
            logits = outputs["logits"].float()
            loss = torch.nn.functional.cross_entropy(
                logits, labels, weight=weights.to(logits.device), reduction="sum"
            )
            return loss / (num_items_in_batch or labels.numel())

    class Hooks(TrainerCallback):
        """Step timing (training only), AdaLoRA rank budgeting, and live metric logging."""

        def __init__(self) -> None:
            self.step_seconds: list[float] = []
            self._t0: Any = 0.0
            self._pairs: list[tuple[Any, Any]] = []  # CUDA: (start, end) events per step

        # Training time = the sum of epoch-begin/step-end intervals: batches and steps included,
        # evaluation and checkpointing (after an epoch's last step) excluded. On CUDA the marks
        # are CUDA events read after training: no host synchronisation per step, and an interval
        # ends when the GPU has finished the step (or at the mark, when the GPU waits on the host).
        def _mark(self) -> Any:
            if not cuda:
                return time.perf_counter()
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event

        def collect(self) -> None:
            if self._pairs:
                self._pairs[-1][1].synchronize()
                self.step_seconds = [a.elapsed_time(b) / 1e3 for a, b in self._pairs]

        def on_epoch_begin(self, args, state, control, **kw):
            self._t0 = self._mark()

        def on_optimizer_step(self, args, state, control, model=None, **kw):
            if method == "adalora":
                # Needs the gradients, so between optimizer.step() and zero_grad().
                peft_model = model.module if hasattr(model, "module") else model
                peft_model.base_model.update_and_allocate(state.global_step)

        def on_step_end(self, args, state, control, **kw):
            now = self._mark()
            if cuda:
                self._pairs.append((self._t0, now))
            else:
                self.step_seconds.append(now - self._t0)
            self._t0 = now

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "eval_macro_f1" in logs:
                log.info(
                    "epoch %.0f: val macro-F1 %.4f, val loss %.4f",
                    state.epoch or 0,
                    logs["eval_macro_f1"],
                    logs.get("eval_loss", float("nan")),
                )
            if on_log and logs:
                on_log(
                    {k: v for k, v in logs.items() if isinstance(v, (int, float))},
                    state.global_step,
                )

    temp = None
    if checkpoint_dir is None:
        temp = Path(tempfile.mkdtemp(prefix="tunery-ft-"))
        out = temp
    else:
        out = Path(checkpoint_dir)
        out.mkdir(parents=True, exist_ok=True)
    # Under torchrun the main process alone removes half-written checkpoints.
    resume = (
        last_complete_checkpoint(out, main=is_main_process())
        if checkpoint_dir is not None
        else None
    )
    if resume is not None:
        log.info("resuming from %s", resume)

    settings = dict(
        output_dir=str(out),
        num_train_epochs=epochs,
        # `batch_size` is the global batch: under torchrun each process takes its share, so the
        # steps, the schedule and the metrics do not depend on the number of processes.
        per_device_train_batch_size=cfg.batch_size // processes,
        per_device_eval_batch_size=cfg.eval_batch_size,
        learning_rate=lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,  # the best and the last
        load_best_model_at_end=True,
        metric_for_best_model="macro_f1",
        greater_is_better=True,
        logging_strategy="steps",
        logging_steps=max(1, steps_per_epoch // 4),
        seed=cfg.seed,
        data_seed=cfg.seed,
        # Deterministic kernels on CPU (cheap there); on CUDA only when asked (they cost speed).
        full_determinism=device == "cpu" if cfg.deterministic is None else cfg.deterministic,
        use_cpu=device == "cpu",
        bf16=precision == "bf16",
        torch_compile=use_compile,
        **fast["trainer"],
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        label_names=["labels"],
        report_to="none",
        disable_tqdm=True,
        restore_callback_states_from_checkpoint=True,
    )
    args = training_args(**settings)  # adapts to the transformers version (the GPU machine's 5.17)

    class TuneryTrainer(Trainer):
        """Counts training tokens; keeps AdaLoRA checkpoints at full rank (see below)."""

        def compute_loss(self, model, inputs, *a, **kw):
            if model.training:
                counter.add(inputs["attention_mask"])
            return super().compute_loss(model, inputs, *a, **kw)

        # On CUDA the step is host-bound (see `cuda_settings`); the Trainer walks all ~500 modules
        # of a peft model several times per step. Two of those walks give per-step constants:
        # the parameter count (FLOP estimate) and the parameters that can have gradients (the
        # frozen ones never do, and clipping skips parameters without one): computed once.
        _params_count: int | None = None
        _grad_params: list[Any] | None = None

        def floating_point_ops(self, inputs):
            if not cuda:
                return super().floating_point_ops(inputs)
            if self._params_count is None:
                self._params_count = (
                    self.model.num_parameters(exclude_embeddings=True)
                    if hasattr(self.model, "num_parameters")
                    else -1
                )
            main_input = getattr(self.model, "main_input_name", "input_ids")
            if main_input not in inputs or self._params_count < 0:
                return 0
            return 6 * inputs[main_input].numel() * self._params_count

        def _clip_grad_norm(self, model):
            if not cuda or self.accelerator.distributed_type != "NO" or self.args.fp16:
                return super()._clip_grad_norm(model)
            if self._grad_params is None:
                self._grad_params = [p for p in model.parameters() if p.requires_grad]
            return torch.nn.utils.clip_grad_norm_(self._grad_params, self.args.max_grad_norm)

        # AdaLoRA's rank pattern changes while it trains, and peft saves the adapter resized to
        # the current pattern, so checkpoints from different steps have different shapes and the
        # Trainer cannot load the best one or resume. Checkpoints are saved at full rank instead
        # (pruned ranks are zeros), with the pattern beside them, and put back after loading.
        def save_model(self, output_dir=None, _internal_call=False):
            if method != "adalora" or not _internal_call:
                return super().save_model(output_dir, _internal_call)
            cfg_ = self.model.peft_config["default"]
            pattern, cfg_.rank_pattern = cfg_.rank_pattern, None
            try:
                super().save_model(output_dir, _internal_call)
            finally:
                cfg_.rank_pattern = pattern
            Path(output_dir, RANK_PATTERN_FILE).write_text(json.dumps(pattern))

        def _with_full_rank(self, load, checkpoint):
            if method != "adalora":
                return load()
            cfg_ = self.model.peft_config["default"]
            cfg_.rank_pattern = None
            load()
            saved = Path(checkpoint or "", RANK_PATTERN_FILE)
            cfg_.rank_pattern = json.loads(saved.read_text()) if saved.is_file() else None

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            self._with_full_rank(
                lambda: super(TuneryTrainer, self)._load_from_checkpoint(
                    resume_from_checkpoint, model
                ),
                resume_from_checkpoint,
            )

        def _load_best_model(self):
            self._with_full_rank(
                lambda: super(TuneryTrainer, self)._load_best_model(),
                self.state.best_model_checkpoint,
            )

    hooks = Hooks()
    trainer = TuneryTrainer(
        model=model,
        args=args,
        train_dataset=train_features,
        eval_dataset=val_features,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=macro_f1_from_logits,
        compute_loss_func=loss_func,
        callbacks=[
            hooks,
            EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience),
            # marks each checkpoint complete (before any later callback can fail the run)
            *(trainer_callbacks(max_minutes=None) if checkpoint_dir is not None else ()),
            *callbacks,
        ],
    )
    trainer.remove_callback(PrinterCallback)  # logs go through `on_log` and our logger instead
    try:
        with PeakMemory(device) as mem:
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        hooks.collect()
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    state = trainer.state
    history = [dict(h) for h in state.log_history]
    best = state.best_metric if state.best_metric is not None else float("nan")
    model = trainer.model
    model.eval()
    train_seconds = sum(hooks.step_seconds)
    secs = max(train_seconds, 1e-9)
    step_tokens = [int(t) for t in counter.real]
    real_tokens, padded_tokens = sum(step_tokens), sum(counter.padded)
    return TrainResult(
        model=model,
        best_val_macro_f1=float(best),
        epochs=float(state.epoch or 0.0),
        steps=int(state.global_step),
        train_seconds=round(train_seconds, 3),
        samples_per_s=round(sum(counter.samples) / secs, 1),
        tokens_per_s=round(real_tokens / secs, 1),
        padding_share=round(1 - real_tokens / padded_tokens, 4) if padded_tokens else 0.0,
        peak_memory_mb=mem.peak_mb,
        memory_delta_mb=mem.delta_mb,
        resumed_from=str(resume) if resume else None,
        history=history,
        step_seconds=hooks.step_seconds,
        step_samples=counter.samples,
        step_tokens=step_tokens,
        step_padded=counter.padded,
        settings={
            "pad_to_multiple_of": fast["pad_to_multiple_of"],
            "compile_mode": fast["compile_mode"],
            "dataloader_workers": fast["trainer"]["dataloader_num_workers"],
        },
    )


# --------------------------------------------------------------------------- inference
def predict_proba(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int = 128,
    device: str | None = None,
) -> Any:
    """Class probabilities (n, classes) as float32 numpy, batched by length for little padding."""
    import numpy as np
    import torch

    device = device or next(model.parameters()).device.type
    model.to(device).eval()
    out = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    batches = length_sorted_batches(
        tokenizer, texts, max_length=max_length, batch_size=batch_size, device=device
    )
    with torch.inference_mode():
        for idx, batch in batches:
            logits = model(**batch).logits.float()
            out[idx] = torch.softmax(logits, -1).cpu().numpy()
    return out


def logits_on(model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int) -> Any:
    import torch

    model.eval()
    device = next(model.parameters()).device
    batch = tokenizer(
        list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    ).to(device)
    with torch.inference_mode():
        return model(**batch).logits.float().cpu()


@dataclass
class LoadedClassifier:
    model: Any
    tokenizer: Any
    labels: list[str]
    info: dict[str, Any]

    def predict_proba(self, texts: Sequence[str], *, batch_size: int = 128) -> Any:
        return predict_proba(
            self.model,
            self.tokenizer,
            texts,
            max_length=int(self.info.get("max_length", 128)),
            batch_size=batch_size,
        )


def resolve_model_ref(ref: str | None, root: Path) -> Path | None:
    """A model reference from params as a local finetune output dir.

    Today a path; the registry will resolve `models:/<name>@champion` here (the one plug-in point).
    """
    if ref is None:
        return None
    if ref.startswith("models:/"):
        raise FinetuneError(
            f"{ref}: registry references are resolved by the registry; pass a model directory"
        )
    path = Path(ref) if Path(ref).is_absolute() else root / ref
    if not (path / INFO_FILE).is_file():
        raise FinetuneError(f"{path}: not a finetune output (no {INFO_FILE})")
    return path


def load_classifier(model_dir: Path, *, device: str = "cpu") -> LoadedClassifier:
    """A finetune output ready to predict: `merged/` when there is one, else encoder + adapter."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _quiet_transformers()
    model_dir = Path(model_dir)
    info_path = model_dir / INFO_FILE
    if not info_path.is_file():
        raise FinetuneError(f"{model_dir}: not a finetune output (no {INFO_FILE}); run finetune")
    info = json.loads(info_path.read_text())
    labels = read_labels(model_dir / LABELS_FILE)
    merged = model_dir / MERGED_DIR
    if merged.is_dir():
        model = AutoModelForSequenceClassification.from_pretrained(merged)
        tokenizer = AutoTokenizer.from_pretrained(merged)
    else:
        from peft import PeftModel

        encoder = Path(info["encoder"])
        want = info.get("encoder_fingerprint")
        if want and fingerprint({}, model_files(encoder)) != want:
            raise FinetuneError(
                f"{model_dir}: the adapter does not match the encoder at {encoder} "
                "(the encoder changed since this fine-tune; re-run finetune)"
            )
        base, _ = load_base(encoder, labels)
        try:
            model = PeftModel.from_pretrained(base, str(model_dir / ADAPTER_DIR))
        except (ValueError, RuntimeError) as exc:
            raise FinetuneError(
                f"{model_dir}: the adapter does not match the encoder: {exc}"
            ) from None
        tokenizer = AutoTokenizer.from_pretrained(model_dir / ADAPTER_DIR)
    if model.config.num_labels != len(labels):
        raise FinetuneError(
            f"{model_dir}: the model has {model.config.num_labels} classes but "
            f"{LABELS_FILE} lists {len(labels)}"
        )
    model.to(device).eval()
    return LoadedClassifier(model=model, tokenizer=tokenizer, labels=labels, info=info)


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    box = {"seconds": 0.0}
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box["seconds"] = round(time.perf_counter() - t0, 3)
