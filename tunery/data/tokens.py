"""Texts -> unpadded token features: the text path's one tokenizer call.

Every consumer pads per batch, to its own batch's longest text: the training collators
(`transformers` DataCollatorWithPadding / for language modeling) and the ONNX batcher
(`tunery.onnx.runtime.length_batches`, which sorts by length first). So texts are tokenized once,
truncated to `max_length`, never padded here. This is the processor step of the modality seam
(tunery/modality.py). Imports nothing heavy: it also runs where only the ONNX side is installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# What a sequence-classification encoder (and its ONNX graph) takes, when the tokenizer gives it.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def unpadded(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int,
    special_tokens_mask: bool = False,
    offsets: bool = False,
) -> list[dict[str, list[Any]]]:
    """One dict of id lists per text (the `MODEL_INPUTS` the tokenizer gives, in its order), plus
    `special_tokens_mask` (what MLM masking must never pick) and `offset_mapping` (word
    boundaries for whole-word masking) when asked for."""
    enc = tokenizer(
        list(texts),
        truncation=True,
        max_length=max_length,
        padding=False,
        return_special_tokens_mask=special_tokens_mask,
        return_offsets_mapping=offsets,
    )
    extra = {"special_tokens_mask": special_tokens_mask, "offset_mapping": offsets}
    keys = [k for k in enc if k in MODEL_INPUTS or extra.get(k)]
    return [{k: enc[k][i] for k in keys} for i in range(len(texts))]
