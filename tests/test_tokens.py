"""The text path's one tokenizer call (tunery/data/tokens.py): unpadded, truncated, the model's
inputs plus what the MLM collators need when asked."""

from __future__ import annotations

import pytest

from tests.conftest import make_rows
from tunery.data.tokens import MODEL_INPUTS, unpadded


@pytest.fixture(scope="module")
def tok():
    from tunery.modeling.factory import train_wordpiece

    return train_wordpiece(make_rows(20)["text"].tolist(), vocab_size=120, max_length=64)


TEXTS = ["a red animal", "rice", "an old tool made of wood " * 8, "x"]


def test_unpadded_truncated_and_the_model_inputs_only(tok):
    got = unpadded(tok, TEXTS, max_length=16)
    lengths = [len(f["input_ids"]) for f in got]
    assert lengths[2] == 16 and len(set(lengths)) > 1  # truncated; each its own length
    assert all(tok.pad_token_id not in f["input_ids"] for f in got)  # never padded
    for text, feature in zip(TEXTS, got, strict=True):
        alone = tok(text, truncation=True, max_length=16)
        assert set(feature) == {k for k in MODEL_INPUTS if k in alone}
        assert all(feature[k] == alone[k] for k in feature)  # no batch effect


def test_the_mlm_extras_only_when_asked(tok):
    plain = unpadded(tok, TEXTS, max_length=16)[0]
    full = unpadded(tok, TEXTS, max_length=16, special_tokens_mask=True, offsets=True)[0]
    assert set(full) - set(plain) == {"special_tokens_mask", "offset_mapping"}
    assert full["special_tokens_mask"][0] == 1 and full["special_tokens_mask"][-1] == 1  # CLS, SEP
    assert len(full["offset_mapping"]) == len(full["input_ids"])
    masked = unpadded(tok, TEXTS, max_length=16, special_tokens_mask=True)[0]
    assert "offset_mapping" not in masked and "special_tokens_mask" in masked
