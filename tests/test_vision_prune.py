"""Pruning and distillation recovery of the image ViT (tunery/vision/prune.py, recovery.py) on a
tiny ViT (CPU, seconds): shapes and configs of the pruned models, the recovery's loss going
down, a pruned model exporting to ONNX that matches it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tunery.config import RecoveryConfig
from tunery.errors import TuneryError
from tunery.vision import prune
from tunery.vision.finetune import logits
from tunery.vision.params import VisionPruneConfig
from tunery.vision.processor import ProcessorConfig
from tunery.vision.vit import VitSpec, build_classifier

GREY = ProcessorConfig()
SPEC = VitSpec(patch_size=7, hidden_size=32, num_layers=3, num_heads=4, mlp_ratio=2)


def model_and_images(n: int = 32) -> tuple:
    model = build_classifier(GREY, [str(i) for i in range(4)], spec=SPEC, seed=0).eval()
    x = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return model, x


def test_drop_layers_keeps_the_chosen_layers_weights():
    model, x = model_and_images()
    pruned = prune.drop_layers(model, [0, 2])
    assert len(pruned.vit.layers) == 2 and pruned.config.num_hidden_layers == 2
    assert torch.equal(pruned.vit.layers[1].mlp.fc1.weight, model.vit.layers[2].mlp.fc1.weight)
    assert len(model.vit.layers) == 3  # a copy: the teacher is untouched
    assert logits(pruned, x).shape == (32, 4)
    with pytest.raises(TuneryError, match="not a set of layers"):
        prune.drop_layers(model, [0, 3])


def test_prune_ffn_and_heads_shrink_every_layer_and_still_run():
    model, x = model_and_images()
    batches = [x[:16], x[16:]]
    ffn = prune.prune_ffn(model, batches, 0.5)
    assert {ly.mlp.fc1.out_features for ly in ffn.vit.layers} == {32}
    assert ffn.config.intermediate_size == 32
    heads = prune.prune_heads(model, batches, 1)
    attn = heads.vit.layers[0].attention
    assert attn.q_proj.out_features == 24 and attn.o_proj.in_features == 24
    assert heads.config.num_attention_heads == 3 and heads.config.head_dim == 8
    for m in (ffn, heads):
        assert np.isfinite(logits(m, x).numpy()).all()
    with pytest.raises(TuneryError, match="attention heads"):
        prune.prune_heads(model, batches, 4)


def test_pruned_model_saves_and_reloads_with_its_new_shape(tmp_path):
    from transformers import ViTForImageClassification

    model, x = model_and_images()
    pruned = prune.prune_ffn(prune.prune_heads(model, [x], 2), [x], 0.25)
    pruned.save_pretrained(tmp_path)
    again = ViTForImageClassification.from_pretrained(tmp_path, attn_implementation="eager")
    assert torch.allclose(logits(again.eval(), x), logits(pruned, x), atol=1e-5)


def test_recovery_brings_the_student_towards_the_teacher():
    from tunery.vision.recovery import recover

    model, x = model_and_images(64)
    student = prune.drop_layers(model, [0, 2])
    before = torch.nn.functional.mse_loss(logits(student, x), logits(model, x))
    cfg = RecoveryConfig(steps=30, batch_size=16, lr=3e-3, kd_weight=1.0, hidden_weight=1.0)
    student, record = recover(student, model, x, cfg, teacher_layers=[0, 2])
    after = torch.nn.functional.mse_loss(logits(student, x), logits(model, x))
    assert after < before and record["last_loss"] < record["first_loss"]
    assert record["steps"] == 30 and record["images"] == 64 and not student.training
    with pytest.raises(TuneryError, match="fewer than one batch"):
        recover(student, model, x[:8], cfg)


def test_build_pruned_exports_a_graph_of_the_pruned_model(tmp_path):
    pytest.importorskip("onnxruntime")
    from tunery.vision.export import onnx_logits

    model, x = model_and_images()
    cfg = VisionPruneConfig(enabled=True, layers=1, ffn_fraction=0.5, heads=1)
    info = prune.build_pruned(model, [x], x, cfg, tmp_path / "pruned.onnx")
    assert info["kept_layers"] == [0, 2]  # spread: the first and the last kept
    assert info["heads_per_layer"] == 3 and info["ffn_neurons_per_layer"] == 32
    assert "recovery" not in info  # recovery.steps 0: the pruned weights as they are
    assert onnx_logits(tmp_path / "pruned.onnx", x).shape == (32, 4)
    with pytest.raises(TuneryError, match="to prune something"):
        prune.build_pruned(model, [x], x, VisionPruneConfig(), tmp_path / "none.onnx")


def test_cpu_clock_needs_one_thread_and_the_bench_records_both_clocks():
    from pydantic import ValidationError

    from tunery.vision import deploy
    from tunery.vision.params import VisionCompressConfig

    with pytest.raises(ValidationError, match="threads 1"):
        VisionCompressConfig(clock="cpu", bench={"threads": 0})
    cfg = VisionCompressConfig(clock="cpu", bench={"threads": 1, "throughput_repeats": 2})
    x = torch.zeros(8, 1, 28, 28)
    timed = deploy.bench(lambda feed: sum(range(20000)), x, cfg.bench, cfg.clock)
    assert timed["throughput_clock"] == "cpu"
    assert timed["throughput"] > 0 and timed["throughput_wall"] > 0
