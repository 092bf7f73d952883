"""The modality seam (tunery/modality.py): the text implementation, step by step, on a tiny BERT."""

from __future__ import annotations

from tests.conftest import make_rows
from tests.tiny import make_tiny_encoder
from tunery.modality import TEXT, Modality


def test_text_is_a_modality_and_its_steps_fit_together(tmp_path):
    assert isinstance(TEXT, Modality)
    encoder = make_tiny_encoder(tmp_path / "enc")
    rows = make_rows(3)
    labels = sorted(rows["label"].unique())
    rows.to_parquet(tmp_path / "train.parquet")

    split = TEXT.read_split(tmp_path / "train.parquet", labels)  # data source
    assert len(split) == len(rows) and set(split.labels) == set(range(len(labels)))
    processor = TEXT.processor(encoder)  # the tokenizer
    model, new = TEXT.load_base(encoder, labels)  # model factory: a fresh head on the encoder
    assert model.config.num_labels == len(labels) and any("classifier" in n for n in new)
    names = TEXT.onnx_inputs(processor, model)
    assert {"input_ids", "attention_mask"} <= set(names)
    # What the predictor feeds the session is exactly what the exported graph takes.
    fed = TEXT.predictor_inputs(processor, split.texts[:4], max_length=16)
    assert len(fed) == 4 and all(set(f) == set(names) for f in fed)
    assert all(len(f["input_ids"]) <= 16 for f in fed)
