"""The encoder folder (the pretrain stage's output) and the factories that build an encoder.

    <pretrain.out_dir>/  config.json + model.safetensors + tokenizer files: `from_pretrained`
                         loadable with AutoModel, AutoModelForSequenceClassification and
                         AutoTokenizer; the tokenizer returns token_type_ids.

`write_encoder` is its one writer (atomic, reloaded and checked); `check_output` its check.
Initialisation: `scratch` (a BERT built from params + a WordPiece tokenizer trained on the corpus)
or `base` (a model folder, `package:<module>`, or a hub id; its own tokenizer).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunery.io import atomic_dir

if TYPE_CHECKING:
    from tunery.config import PretrainConfig

log = logging.getLogger("tunery.pretrain")


def build_tokenizer(cfg: PretrainConfig, texts: list[str], folder: Path, *, main: bool) -> Any:
    """Scratch: the corpus WordPiece, trained once and kept beside the checkpoints; base: its own."""
    from tunery.modeling import factory as models

    if cfg.init == "base":
        return None
    saved = folder / "tokenizer"
    if (saved / "tokenizer.json").is_file():
        return models.load_tokenizer(str(saved), max_length=cfg.scratch.max_length)
    s = cfg.scratch
    tok = models.train_wordpiece(
        texts, vocab_size=s.vocab_size, max_length=s.max_length, lowercase=s.lowercase
    )
    if main:
        with atomic_dir(saved) as tmp:
            tok.save_pretrained(tmp)
    return tok


def build_encoder(cfg: PretrainConfig, tok: Any, *, head: str) -> tuple[Any, Any, dict[str, Any]]:
    """(model with `head`, tokenizer, info) for the configured initialisation."""
    from transformers import AutoModel, AutoModelForMaskedLM, set_seed

    from tunery.modeling import factory as models

    set_seed(cfg.train.seed)
    if cfg.init == "base":
        model, tok, info = models.load_encoder(
            cfg.base, head=head, max_length=cfg.max_length, attn_implementation="sdpa"
        )
        if head == "mlm" and info["new_weights"]:
            check_fresh_head(cfg, info["new_weights"])
            log.warning(
                "base %s has no (complete) MLM head: %d head tensor(s) freshly initialised; "
                "the encoder is frozen for the first %d step(s) while it trains",
                cfg.base,
                len(info["new_weights"]),
                cfg.mlm.head_warmup_steps,
            )
        return model, tok, info
    config = scratch_model_config(cfg, tok)
    auto = AutoModelForMaskedLM if head == "mlm" else AutoModel
    kwargs = {} if head == "mlm" else {"add_pooling_layer": False}
    model = auto.from_config(config, attn_implementation="sdpa", **kwargs)
    return model, tok, {"source": "scratch", "new_weights": []}


def check_fresh_head(cfg: PretrainConfig, new_weights: list[str]) -> None:
    """MLM through a random head with the encoder trained from step 0 only damages the base."""
    from tunery.modeling.factory import ModelError

    if cfg.mlm.head_warmup_steps == 0:
        raise ModelError(
            cfg.base,
            "no_mlm_head",
            f"objective mlm needs an MLM head and this base has none ({len(new_weights)} head "
            "tensor(s) would be random); set pretrain.mlm.head_warmup_steps > 0 to train a fresh "
            "head with the encoder frozen first, or use pretrain.objective: simcse",
        )


def scratch_model_config(cfg: PretrainConfig, tok: Any) -> Any:
    from tunery.modeling import factory as models

    s = cfg.scratch
    return models.scratch_config(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        layers=s.layers,
        hidden=s.hidden,
        heads=s.heads,
        intermediate=s.intermediate,
        max_length=s.max_length,
        dropout=s.dropout,
    )


def random_twin(model: Any, *, head: str, seed: int) -> Any:
    """The same architecture with freshly initialised weights: the probe's reference."""
    from transformers import AutoModel, AutoModelForMaskedLM, set_seed

    set_seed(seed + 1)
    auto = AutoModelForMaskedLM if head == "mlm" else AutoModel
    twin = auto.from_config(model.config, attn_implementation="sdpa")
    return twin.to(next(model.parameters()).device)


def check_output(folder: Path, model: Any, tok: Any, *, texts: list[str], max_length: int) -> None:
    """The written encoder must reload and reproduce the in-memory embeddings."""
    import numpy as np
    from transformers import AutoModel, AutoTokenizer

    from tunery.modeling import objectives as pt
    from tunery.modeling.factory import ModelError

    reloaded = AutoModel.from_pretrained(folder).to(next(model.parameters()).device)
    rtok = AutoTokenizer.from_pretrained(folder)
    if "token_type_ids" not in rtok("x"):
        raise ModelError(
            folder, "tokenizer_contract", "the saved tokenizer returns no token_type_ids"
        )
    if not texts:
        return
    a = pt.embed(model, tok, texts, max_length=max_length)
    b = pt.embed(reloaded, rtok, texts, max_length=max_length)
    diff = float(np.abs(a - b).max())
    if diff > 1e-3:
        raise ModelError(folder, "reload_mismatch", f"reloaded encoder differs by {diff:.2e}")


def write_encoder(
    out_dir: Path, cfg: PretrainConfig, model: Any, tok: Any, *, check_texts: list[str]
) -> None:
    """The output: written beside its destination, reloaded and checked, then moved into place."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        check_output(tmp, model, tok, texts=check_texts, max_length=cfg.max_length)
        if cfg.init == "base":
            from tunery.modeling.factory import carry_base_tensors

            carried = carry_base_tensors(tmp, cfg.base, f"{model.base_model_prefix}.")
            if carried:
                log.info("kept the base's %s (the %s head has none)", carried, cfg.objective)
