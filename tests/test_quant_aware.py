"""Quantization-aware recovery (`compress.prune.recovery.quant_aware`): the fake quantization
mirrors onnxruntime's dynamic int8 graph, and the recovery runs under it and leaves a float model."""

from __future__ import annotations

import pytest

from tests.test_export import make_finetune_dir
from tunery.config import CompressConfig, Int8Config, PruneConfig, RecoveryConfig

TEXTS = [
    "a red animal that lives in the wild",
    "rice",
    "an old tool made of wood and iron, used by farmers",
    "x",
    "a person who writes books",
    "the state of being tired after a long walk",
    "a plant with yellow flowers",
    "water",
]


def _setup(tmp_path):
    from transformers import AutoTokenizer

    from tunery.data.tokens import unpadded
    from tunery.onnx import export as ox

    ft = make_finetune_dir(tmp_path, train_steps=3)
    model = ox.load_torch_model(ft / "merged").eval()
    tok = AutoTokenizer.from_pretrained(ft / "merged")
    return model, tok, unpadded(tok, TEXTS, max_length=32)


def _logits(model, encoded, names=None):
    import torch

    from tunery.onnx import compress as comp

    with torch.no_grad():
        return comp.run_batches(comp.torch_forward(model), encoded, 4, names or NAMES, 3)


NAMES = ["input_ids", "attention_mask"]


def test_fake_quantized_model_is_closer_to_the_int8_graph_than_the_float_model(tmp_path):
    """The fake-quantized PyTorch model reproduces the deployed int8 graph's rounding (the same
    optimized, token-packed graph `quantize_int8_dynamic` builds); leaving it restores the model."""
    import numpy as np

    from tunery.onnx import compress as comp
    from tunery.onnx import export as ox
    from tunery.onnx.distill import fake_quantized

    model, tok, encoded = _setup(tmp_path)
    with __import__("torch").no_grad():  # a random tiny BERT: spread its activations
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3)
    raw, fp32, int8 = tmp_path / "raw.onnx", tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    names = ox.export_onnx(model, tok, raw, max_length=32)
    _, heads, hidden = ox.model_shape(model)
    ox.optimize(raw, fp32, model_type="bert", num_heads=heads, hidden_size=hidden)
    comp.quantize_int8_dynamic(fp32, int8, **Int8Config().quantize_options())
    quantized = comp.run_batches(comp.onnx_runner(int8, "cpu"), encoded, 4, names, 3)
    before = _logits(model, encoded, names)
    with fake_quantized(model):
        fake = _logits(model, encoded, names)
    after = _logits(model, encoded, names)
    np.testing.assert_array_equal(before, after)
    float_gap = np.abs(before - quantized).mean()
    assert float_gap > 0
    assert np.abs(fake - quantized).mean() < 0.25 * float_gap


def test_quant_aware_recovery_trains_the_student_and_leaves_a_float_model(tmp_path):
    import copy

    import numpy as np
    import torch

    from tunery.onnx.compress import prune_ffn
    from tunery.onnx.distill import RecoveryData, recover

    teacher, _, encoded = _setup(tmp_path)
    labels = _logits(teacher, encoded).argmax(-1)
    data = RecoveryData(encoded, np.asarray(labels), NAMES)
    feeds = [
        {k: np.array([e[k]]) for k in NAMES} for e in encoded
    ]  # one text a feed: calibration for the importance scores
    student = prune_ffn(copy.deepcopy(teacher), feeds, 0.5)
    emb = {n: p.detach().clone() for n, p in student.bert.embeddings.named_parameters()}
    w0 = student.bert.encoder.layer[0].intermediate.dense.weight.detach().clone()
    cfg = RecoveryConfig(steps=4, batch_size=4, lr=1e-3, quant_aware=True)
    student, record = recover(student, teacher, data, cfg)
    assert record["quant_aware"] is True and record["steps"] == 4
    assert not torch.equal(student.bert.encoder.layer[0].intermediate.dense.weight, w0)
    for name, p in student.bert.embeddings.named_parameters():  # frozen, restored unrounded
        assert torch.equal(p, emb[name]), name
    lins = [m for m in student.modules() if isinstance(m, torch.nn.Linear)]
    assert lins and all("forward" not in m.__dict__ for m in lins)  # plain float Linears again


def test_quant_aware_needs_the_int8_options_it_mirrors():
    prune = PruneConfig(
        enabled=True, ffn_fraction=0.5, recovery=RecoveryConfig(steps=1, quant_aware=True)
    )
    CompressConfig(prune=prune)
    with pytest.raises(ValueError, match="quant_aware mirrors"):
        CompressConfig(prune=prune, int8=Int8Config(reduce_range=False))


def test_the_compress_report_says_the_recovery_was_quantization_aware():
    from tunery.onnx.compress import _pruning_line

    rec = {
        "macro_f1_drop_pruned": 0.1,
        "macro_f1_drop_recovered": 0.01,
        "steps": 300,
        "batch_size": 32,
        "temperature": 2.0,
        "kd_weight": 0.5,
        "hidden_weight": 0.0,
        "seconds": 120.0,
    }
    prune = {"ffn_fraction": 0.5}
    line = _pruning_line(
        {"prune": prune, "variants": {"pruned_fp32": {"pruning": {"recovery": rec}}}}
    )
    assert "quantization-aware" not in line
    rec["quant_aware"] = True
    line = _pruning_line(
        {"prune": prune, "variants": {"pruned_fp32": {"pruning": {"recovery": rec}}}}
    )
    assert "quantization-aware (int8 fake-quantized): 120 s)" in line
