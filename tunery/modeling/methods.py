"""The model factory: a sequence classifier on an encoder, wrapped for a PEFT method (or not).

Every method (LoRA, IA3, AdaLoRA, prefix tuning, full) trains the classification head: the head, and
any other module the encoder checkpoint lacks (a BERT pooler after MLM pretraining), are peft's
`modules_to_save`, so they train and are saved with the adapter.

This is the modality seam's "model factory" step (see `tunery.modeling`): text builds an
`AutoModelForSequenceClassification`; another modality brings its own `load_base`.
torch, transformers and peft are imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunery.errors import FinetuneError
from tunery.modeling import finetune_dir

if TYPE_CHECKING:  # pydantic is not on the GPU machine; the bench passes a look-alike there
    from tunery.config import FinetuneConfig

log = logging.getLogger("tunery.finetuning")

METHODS = ("lora", "ia3", "adalora", "prefix", "full")
PEFT_METHODS = ("lora", "ia3", "adalora", "prefix")
MERGEABLE = ("lora", "ia3", "adalora")  # peft can fold these into the base weights
PEFT_TYPE = {"lora": "LORA", "ia3": "IA3", "adalora": "ADALORA", "prefix": "PREFIX_TUNING"}
ALL_LINEAR = "all-linear"  # a target_modules shorthand (see `linear_targets`)


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


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the load report is ours to log (below), in one line


def load_base(
    encoder: Path, labels: Sequence[str], *, init: str = "pretrained", seed: int = 0
) -> tuple[Any, list[str]]:
    """A sequence classifier on the encoder, and the modules the encoder checkpoint lacked."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, set_seed

    quiet_transformers()
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
    if not finetune_dir.is_finetune_dir(warm_start):
        raise FinetuneError(f"{warm_start}: not a finetune output (no {finetune_dir.INFO_FILE})")
    info = finetune_dir.read_info(warm_start)
    if info.get("method") != method:
        raise FinetuneError(
            f"{warm_start}: warm start from a {info.get('method')!r} fine-tune, "
            f"but finetune.method is {method!r}"
        )
    old_labels = finetune_dir.labels(warm_start)
    if list(old_labels) != list(labels):
        raise FinetuneError(
            f"{warm_start}: its labels {old_labels} differ from the data's {list(labels)}; "
            "a new label set needs a fresh fine-tune (finetune.warm_start: null)"
        )
    adapter = warm_start / finetune_dir.ADAPTER_DIR
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
