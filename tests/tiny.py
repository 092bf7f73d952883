"""A tiny BERT encoder directory for fast CPU tests (seconds): WordPiece trained on toy texts."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import make_rows


def make_tiny_encoder(
    dest: Path, *, vocab_size: int = 200, hidden: int = 32, layers: int = 2, seed: int = 0
) -> Path:
    """Write a `from_pretrained`-loadable BERT encoder (random weights, MLM head) and its tokenizer."""
    import torch
    from transformers import BertForMaskedLM

    from tunery.modeling.factory import scratch_config, train_wordpiece

    tokenizer = train_wordpiece(
        make_rows(60)["text"].tolist(), vocab_size=vocab_size, max_length=64
    )
    torch.manual_seed(seed)
    config = scratch_config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        layers=layers,
        hidden=hidden,
        heads=2,
        intermediate=2 * hidden,
        max_length=64,
    )
    BertForMaskedLM(config).save_pretrained(dest)  # safetensors by default
    tokenizer.save_pretrained(dest)
    return dest
