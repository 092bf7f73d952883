"""Model and tokenizer factories shared by the training stages.

- `train_wordpiece` + `scratch_config`: a BERT-style encoder built from params, with a WordPiece
  tokenizer trained on the corpus.
- `resolve_model_ref` / `load_tokenizer` / `load_encoder`: a base encoder from a local folder, an
  installed package (`package:<module>`, whose `get_model_path()` names the folder) or a hub id
  (only where a hub is configured and reachable), validated before use: a folder that is not a
  model, or a tokenizer that does not fit the model, fails with the path and the rule.

Heavy libraries (torch, transformers, tokenizers) are imported inside the functions.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tunery.errors import TuneryError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("tunery.models")

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# BERT-style encoders take segment ids; transformers 5 tokenizers only return them when asked.
MODEL_INPUT_NAMES = ["input_ids", "token_type_ids", "attention_mask"]
PACKAGE_PREFIX = "package:"

Head = Literal["none", "mlm", "classification"]


class ModelError(TuneryError):
    """A model, tokenizer or checkpoint breaks a rule; names the path and the rule."""

    def __init__(self, path: str | Path, rule: str, detail: str) -> None:
        self.path, self.rule, self.detail = str(path), rule, detail
        super().__init__(f"{path}: [{rule}] {detail}")


# --------------------------------------------------------------------------- scratch
def train_wordpiece(
    texts: Iterable[str], *, vocab_size: int, max_length: int, lowercase: bool = True
) -> PreTrainedTokenizerBase:
    """A BERT WordPiece tokenizer trained on `texts` (returns token_type_ids, knows its max length)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        texts,
        trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS),
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
        model_input_names=MODEL_INPUT_NAMES,
    )


def scratch_config(
    *,
    vocab_size: int,
    pad_token_id: int,
    layers: int,
    hidden: int,
    heads: int,
    intermediate: int,
    max_length: int,
    dropout: float = 0.1,
) -> PretrainedConfig:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_length,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        pad_token_id=pad_token_id,
    )


# --------------------------------------------------------------------------- base encoders
def resolve_model_ref(ref: str) -> str:
    """A local model folder for `ref` (a path or `package:<module>`), or `ref` itself as a hub id.

    A path that exists must be a model folder (config.json inside); a hub id is only accepted when
    the hub is not switched off (`HF_HUB_OFFLINE`), since nothing downloads in offline runs.
    """
    if ref.startswith(PACKAGE_PREFIX):
        module_name = ref[len(PACKAGE_PREFIX) :]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ModelError(
                ref, "package_missing", f"cannot import {module_name!r} ({exc}); install it"
            ) from None
        getter = getattr(module, "get_model_path", None)
        if getter is None:
            raise ModelError(ref, "not_a_model_package", "the package has no get_model_path()")
        return _check_model_dir(Path(getter()))
    path = Path(ref).expanduser()
    # A hub id looks like `name` or `org/name`; anything else is meant as a folder.
    if path.exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        return _check_model_dir(path)
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelError(
            ref,
            "hub_offline",
            "not a local folder, and the model hub is off (HF_HUB_OFFLINE=1): use a local path or "
            "package:<module>",
        )
    return ref


def _check_model_dir(path: Path) -> str:
    if not path.is_dir():
        raise ModelError(path, "not_a_model", "no such folder")
    if not (path / "config.json").is_file():
        raise ModelError(path, "not_a_model", "no config.json: this folder is not a model")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(
            path / "config.json", "not_a_model", f"unreadable config ({exc})"
        ) from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelError(path / "config.json", "not_a_model", "config.json has no model_type")
    if not any((path / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
        raise ModelError(path, "not_a_model", "no model.safetensors (safetensors weights only)")
    return str(path)


def load_tokenizer(ref: str, *, max_length: int | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder, returning token_type_ids and with a finite max length."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(ref)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(ref, "tokenizer_unreadable", f"cannot load a tokenizer ({exc})") from None
    if not tok.is_fast:
        raise ModelError(ref, "tokenizer_not_fast", "a fast (tokenizers) tokenizer is needed")
    names = list(tok.model_input_names)
    if "token_type_ids" not in names:
        tok.model_input_names = [*names[:1], "token_type_ids", *names[1:]]
    # Some saved tokenizers carry a sentinel of 1e30 as their max length.
    if max_length is not None and tok.model_max_length > max_length:
        tok.model_max_length = max_length
    return tok


def check_tokenizer_fits(
    config: PretrainedConfig, tok: PreTrainedTokenizerBase, where: str
) -> None:
    """Every id the tokenizer can emit must index the model's embeddings."""
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tok) > vocab:
        raise ModelError(
            where,
            "tokenizer_mismatch",
            f"the tokenizer has {len(tok)} tokens but the model's embedding has {vocab}: "
            "they are not a pair",
        )
    for name in ("pad_token_id", "mask_token_id", "cls_token_id", "sep_token_id"):
        tid = getattr(tok, name, None)
        if tid is not None and vocab is not None and tid >= vocab:
            raise ModelError(
                where, "tokenizer_mismatch", f"{name}={tid} is outside the model's vocab ({vocab})"
            )
    if tok.pad_token_id is None:
        raise ModelError(where, "tokenizer_mismatch", "the tokenizer has no padding token")


def model_max_length(config: PretrainedConfig) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def load_encoder(
    ref: str,
    *,
    head: Head = "none",
    num_labels: int | None = None,
    max_length: int | None = None,
    attn_implementation: str | None = "sdpa",
    dtype: Any = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Load `ref` (path, `package:<module>` or hub id) with the requested head and its tokenizer.

    Returns (model, tokenizer, info); `info["new_weights"]` lists freshly initialised weights
    (e.g. an MLM head the base never had), which is logged.
    """
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
    )

    folder = resolve_model_ref(ref)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(folder, "not_a_model", f"unreadable config ({exc})") from None
    limits = [x for x in (max_length, model_max_length(config)) if x]
    tok = load_tokenizer(folder, max_length=min(limits) if limits else None)
    check_tokenizer_fits(config, tok, folder)
    cls = {
        "none": AutoModel,
        "mlm": AutoModelForMaskedLM,
        "classification": AutoModelForSequenceClassification,
    }[head]
    kwargs: dict[str, Any] = {"output_loading_info": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if dtype is not None:
        kwargs["dtype"] = dtype
    if head == "classification":
        if not num_labels:
            raise ValueError("num_labels is required for a classification head")
        kwargs["num_labels"] = num_labels
    try:
        model, loading = cls.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(folder, "weights_unreadable", f"cannot load the weights ({exc})") from None
    new = sorted(loading.get("missing_keys", []))
    if new:
        log.info(
            "%s: %d weight tensor(s) freshly initialised for the %s head (%s%s)",
            ref,
            len(new),
            head,
            ", ".join(new[:3]),
            ", ..." if len(new) > 3 else "",
        )
    return model, tok, {"source": ref, "folder": folder, "new_weights": new}


def carry_base_tensors(folder: Path, base_ref: str, prefix: str) -> list[str]:
    """Copy into `folder`'s safetensors the base's tensors its own save lacks; return their names.

    An MLM model (`BertForMaskedLM`) has no pooler, so an encoder continued with MLM from a base
    that had one would be saved without it, and every fine-tune from it would start from a random
    pooler while the same fine-tune from the base starts from the trained one: the comparison
    between the two would not be fair. The base's tensors are written under the saved model's
    prefix (`bert.` + `pooler.dense.weight`); nothing the training changed is overwritten.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base = resolve_model_ref(base_ref)
    [base_file] = sorted(Path(base).glob("model.safetensors")) or [None]
    [own_file] = sorted(Path(folder).glob("model.safetensors")) or [None]
    if base_file is None or own_file is None:  # sharded or non-safetensors: leave it as it is
        return []
    own = load_file(own_file)
    with safe_open(base_file, framework="pt") as f:
        names = {k.removeprefix(prefix): k for k in f.keys()}  # noqa: SIM118 (a safe_open handle)
        missing = {
            prefix + short: f.get_tensor(full)
            for short, full in names.items()
            if short.startswith("pooler.") and prefix + short not in own
        }
    if missing:
        save_file({**own, **missing}, own_file, metadata={"format": "pt"})
    return sorted(missing)
