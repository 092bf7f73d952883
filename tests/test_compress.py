"""compress: every variant checked on the task against PyTorch; the selection rule; the deploy folder."""

from __future__ import annotations

import json

import pytest

from tests.test_export import make_data_dir, make_finetune_dir
from tunery.config import BenchConfig, CompressConfig, ExportConfig, PruneConfig
from tunery.errors import TuneryError

SMALL_BENCH = BenchConfig(warmup=1, latency_runs=5, throughput_batch=16, throughput_batches=1)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    from tasks import compress, export

    root = tmp_path_factory.mktemp("compress")
    ft, data = make_finetune_dir(root), make_data_dir(root)
    export.run(ExportConfig(), finetune_dir=ft, data_dir=data, out_dir=root / "onnx")
    cfg = CompressConfig(prune=PruneConfig(enabled=True, ffn_fraction=0.25), bench=SMALL_BENCH)
    metrics = compress.run(
        cfg,
        finetune_dir=ft,
        export_dir=root / "onnx",
        data_dir=data,
        variants_dir=root / "variants",
        out_dir=root / "deploy",
        report_dir=root / "reports",
        plot_path=root / "plots" / "tradeoff.png",
    )
    return root, metrics, json.loads((root / "reports" / "report.json").read_text())


def test_every_variant_is_checked_and_timed(compressed):
    root, _, report = compressed
    assert set(report["variants"]) >= {"fp32", "fp16", "int8_dynamic", "int8_static"}
    for name, v in report["variants"].items():
        assert set(v["parity"]) == {
            "agreement",
            "accuracy",
            "macro_f1",
            "accuracy_delta",
            "macro_f1_delta",
            "max_abs_logit_diff",
        }, name
        assert v["size_mb"] > 0
        cpu = v["bench"]["cpu"]
        assert cpu["latency_p50_ms"] > 0 and cpu["latency_p95_ms"] >= cpu["latency_p50_ms"]
        assert cpu["throughput"] > 0 and cpu["throughput_batch"] == 16
    assert report["reference_bench"]["cpu"]["throughput"] > 0
    assert (root / "reports" / "report.md").read_text().count("| fp16 |") == 1
    assert (root / "plots" / "tradeoff.png").stat().st_size > 1000


def test_variant_parity_with_pytorch(compressed):
    _, _, report = compressed
    v = report["variants"]
    assert v["fp32"]["parity"]["max_abs_logit_diff"] < 1e-4
    assert v["fp16"]["parity"]["max_abs_logit_diff"] < 1e-2
    for name in ("fp32", "fp16", "int8_dynamic", "int8_static", "pruned_fp32"):
        assert v[name]["parity"]["agreement"] >= 0.9, name
    for name in ("int8_dynamic", "int8_static"):
        assert 0 < v[name]["parity"]["max_abs_logit_diff"] < 0.5, name
    assert v["int8_dynamic"]["size_mb"] < v["fp32"]["size_mb"]
    assert v["pruned_fp32"]["size_mb"] < v["fp32"]["size_mb"]


def test_each_variant_and_the_deploy_folder_load_on_their_own(compressed):
    from tunery.inference import Predictor

    root, metrics, report = compressed
    texts = ["a red animal that lives in the wild", "a warm dish made from rice"]
    for name in report["variants"]:
        p = Predictor(root / "variants" / name, device="cpu")
        assert p.metadata["variant"] == name
        assert len(p.predict(texts).labels) == 2
    deploy = Predictor(root / "deploy", device="auto")
    assert deploy.metadata["variant"] == report["selected"] == metrics["selected"]
    assert deploy.device == "cpu"
    manifest = json.loads((root / "deploy" / "tunery_model.json").read_text())
    assert manifest["provider"] == "cpu" and manifest["max_length"] == 32
    assert manifest["selection"]["eligible"][0] == report["selected"]


def test_selected_variant_follows_the_rule(compressed):
    _, _, report = compressed
    from tunery.compression import select

    best, _ = select(report["variants"], target="cpu", max_f1_drop=0.005, rank_by="throughput")
    assert best == report["selected"]
    assert "fp16" not in report["eligible"]  # made for CUDA, not the cpu target


def _variant(targets, f1_delta, throughput, p50):
    return {
        "targets": targets,
        "parity": {"macro_f1_delta": f1_delta},
        "bench": {t: {"throughput": throughput, "latency_p50_ms": p50} for t in ("cpu", "cuda")},
    }


def test_selection_rule_fastest_within_budget():
    from tunery.compression import select

    variants = {
        "fp32": _variant(["cpu", "cuda"], 0.0, 100, 5.0),
        "int8_dynamic": _variant(["cpu"], -0.004, 300, 2.0),
        "int8_static": _variant(["cpu"], -0.02, 500, 1.0),  # fastest, but over budget
        "fp16": _variant(["cuda"], -0.001, 900, 0.5),  # fastest, but not a CPU variant
    }
    assert select(variants, target="cpu", max_f1_drop=0.005, rank_by="throughput") == (
        "int8_dynamic",
        ["int8_dynamic", "fp32"],
    )
    assert (
        select(variants, target="cpu", max_f1_drop=0.05, rank_by="throughput")[0] == "int8_static"
    )
    assert select(variants, target="cuda", max_f1_drop=0.005, rank_by="latency_p50")[0] == "fp16"
    assert select(variants, target="cpu", max_f1_drop=0.0, rank_by="throughput")[0] == "fp32"


def test_selection_fails_when_nothing_is_within_budget():
    from tunery.compression import select

    variants = {"int8_dynamic": _variant(["cpu"], -0.1, 300, 2.0)}
    with pytest.raises(TuneryError, match="within compress.max_f1_drop"):
        select(variants, target="cpu", max_f1_drop=0.005, rank_by="throughput")
    timed_elsewhere = {"fp32": {**_variant(["cpu"], 0.0, 1, 1), "bench": {"cuda": {"error": "x"}}}}
    with pytest.raises(TuneryError):
        select(timed_elsewhere, target="cpu", max_f1_drop=0.005, rank_by="throughput")


def test_cuda_target_without_cuda_fails_and_writes_nothing(compressed, tmp_path):
    from tasks import compress

    root, _, _ = compressed
    cfg = CompressConfig(variants=["fp32"], target_provider="cuda", bench=SMALL_BENCH)
    with pytest.raises(TuneryError, match="target_provider is 'cuda'"):
        compress.run(
            cfg,
            finetune_dir=root / "finetune",
            export_dir=root / "onnx",
            data_dir=root / "prepared",
            variants_dir=tmp_path / "v",
            out_dir=tmp_path / "d",
            report_dir=tmp_path / "r",
            plot_path=tmp_path / "p.png",
        )
    assert not (tmp_path / "d").exists() and not (tmp_path / "v").exists()


def test_pruning_keeps_a_plain_smaller_model():
    import numpy as np
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from tunery.compression import prune_ffn

    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=40,
            num_labels=3,
        )
    ).eval()
    feed = {"input_ids": np.random.default_rng(0).integers(5, 50, (4, 7)).astype(np.int64)}
    pruned = prune_ffn(model, [feed], 0.25)
    assert pruned.config.intermediate_size == 30
    assert model.config.intermediate_size == 40  # the original is untouched
    layer = pruned.bert.encoder.layer[0]
    assert layer.intermediate.dense.weight.shape == (30, 16)
    assert layer.output.dense.weight.shape == (16, 30)
    with torch.no_grad():
        out = pruned(input_ids=torch.from_numpy(feed["input_ids"])).logits
    assert out.shape == (4, 3)
