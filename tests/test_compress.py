"""compress: every variant checked on the task against PyTorch; the selection rule; the deploy folder."""

from __future__ import annotations

import json

import pytest

from tests.conftest import make_rows
from tests.test_export import make_data_dir, make_finetune_dir
from tunery.config import BenchConfig, CompressConfig, ExportConfig, PruneConfig, RecoveryConfig
from tunery.errors import TuneryError
from tunery.onnx import compress_report

SMALL_BENCH = BenchConfig(warmup=1, latency_runs=5, throughput_batch=16, throughput_batches=1)
VAL_PER_CLASS = 8  # val rows per class written beside make_data_dir's train/test


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    from tasks import compress, export

    root = tmp_path_factory.mktemp("compress")
    ft, data = make_finetune_dir(root), make_data_dir(root)
    make_rows(VAL_PER_CLASS, offset=80).to_parquet(data / "val.parquet")
    export.run(ExportConfig(), finetune_dir=ft, data_dir=data, out_dir=root / "onnx")
    cfg = CompressConfig(
        variants=["fp32", "fp16", "int8_dynamic", "int8_static"],
        prune=PruneConfig(enabled=True, ffn_fraction=0.25),
        bench=SMALL_BENCH,
    )
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
    return root, metrics, compress_report.read(root / "reports")


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
            "macro_f1_delta_ci95",
            "max_abs_logit_diff",
        }, name
        lo, hi = v["parity"]["macro_f1_delta_ci95"]
        assert lo <= hi, name
        assert v["size_mb"] > 0
        cpu = v["bench"]["cpu"]
        assert cpu["latency_p50_ms"] > 0 and cpu["latency_p95_ms"] >= cpu["latency_p50_ms"]
        assert cpu["throughput"] > 0 and cpu["throughput_batch"] == 16
    assert report["reference_bench"]["cpu"]["throughput"] > 0
    assert (root / "reports" / compress_report.MARKDOWN_FILE).read_text().count("| fp16 |") == 1
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
    from tunery.onnx.runtime import Predictor

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
    from tunery.onnx.compress import select

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
    from tunery.onnx.compress import select

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
    from tunery.onnx.compress import select

    variants = {"int8_dynamic": _variant(["cpu"], -0.1, 300, 2.0)}
    with pytest.raises(TuneryError, match="within compress.max_f1_drop"):
        select(variants, target="cpu", max_f1_drop=0.005, rank_by="throughput")
    timed_elsewhere = {"fp32": {**_variant(["cpu"], 0.0, 1, 1), "bench": {"cuda": {"error": "x"}}}}
    with pytest.raises(TuneryError):
        select(timed_elsewhere, target="cpu", max_f1_drop=0.005, rank_by="throughput")


def test_cuda_target_without_cuda_fails_and_writes_nothing(compressed, tmp_path):
    root, _, _ = compressed
    cfg = CompressConfig(variants=["fp32"], target_provider="cuda", bench=SMALL_BENCH)
    with pytest.raises(TuneryError, match="target_provider is 'cuda'"):
        _run_compress(root, tmp_path, cfg)
    assert not (tmp_path / "d").exists() and not (tmp_path / "v").exists()


def test_pruning_keeps_a_plain_smaller_model():
    import numpy as np
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from tunery.onnx.compress import prune_ffn

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


def _bert(heads: int = 4, hidden: int = 16, layers: int = 2):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=40,
        num_labels=3,
        attn_implementation="eager",
    )
    return BertForSequenceClassification(config).eval()


def _feeds(n: int = 3, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        ids = rng.integers(5, 50, (4, 9)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[1, 6:] = 0  # padding: ignored by the importance scores and refits
        mask[3, 4:] = 0
        feeds.append({"input_ids": ids * mask, "attention_mask": mask})
    return feeds


def test_head_pruning_removes_the_least_important_heads_per_layer():
    import torch

    from tunery.onnx.compress import prune_heads

    model, feeds = _bert(), _feeds()
    pruned = prune_heads(model, feeds, 1)
    for layer in pruned.bert.encoder.layer:
        attn = layer.attention.self
        assert attn.num_attention_heads == 3 and attn.all_head_size == 12
        assert (
            attn.query.weight.shape == attn.key.weight.shape == attn.value.weight.shape == (12, 16)
        )
        assert layer.attention.output.dense.weight.shape == (16, 12)
    assert model.bert.encoder.layer[0].attention.self.query.weight.shape == (16, 16)  # untouched
    with torch.no_grad():
        out = pruned(**{k: torch.from_numpy(v) for k, v in feeds[0].items()}).logits
    assert out.shape == (4, 3)
    with pytest.raises(TuneryError, match="cannot remove 4 of 4"):
        prune_heads(model, feeds, 4)


def test_head_pruning_refit_reproduces_the_attention_output_best():
    """On the calibration tokens, least squares beats the mean shift, which beats no refit."""
    import torch

    from tunery.onnx.compress import prune_heads

    model, feeds = _bert(), _feeds()

    def first_layer_error(pruned) -> float:
        outs = {}
        for name, m in (("ref", model), ("got", pruned)):
            dense = m.bert.encoder.layer[0].attention.output.dense
            h = dense.register_forward_hook(lambda _m, _i, o, name=name: outs.__setitem__(name, o))
            with torch.no_grad():
                m(**{k: torch.from_numpy(v) for k, v in feeds[0].items()})
            h.remove()
        real = torch.from_numpy(feeds[0]["attention_mask"]).bool()
        return float(((outs["ref"] - outs["got"])[real] ** 2).mean())

    errors = {
        refit: first_layer_error(prune_heads(model, feeds, 2, refit=refit, ridge=1e-8))
        for refit in ("none", "mean", "lstsq")
    }
    assert errors["lstsq"] < errors["mean"] < errors["none"], errors
    with pytest.raises(TuneryError, match="refit"):
        prune_heads(model, feeds, 1, refit="magic")


def test_dropping_layers_keeps_a_plain_model_with_the_chosen_layers():
    import torch

    from tunery.onnx.compress import drop_layers, kept_layers

    assert kept_layers(6, 2) == [0, 1, 2, 3]  # top: the last layers go
    assert kept_layers(6, 2, "spread") == [0, 2, 3, 5]
    assert kept_layers(6, 3, "spread") == [0, 2, 5] and kept_layers(6, 5, "spread") == [5]
    assert kept_layers(6, 0, "spread") == list(range(6))
    with pytest.raises(TuneryError, match="at least one must stay"):
        kept_layers(3, 3)
    model, feeds = _bert(layers=3), _feeds()
    dropped = drop_layers(model, [0, 2])
    assert dropped.config.num_hidden_layers == 2 and model.config.num_hidden_layers == 3
    assert len(dropped.bert.encoder.layer) == 2 and len(model.bert.encoder.layer) == 3
    originals = [model.bert.encoder.layer[i] for i in (0, 2)]
    for new, old in zip(dropped.bert.encoder.layer, originals, strict=True):
        for (name, a), b in zip(new.state_dict().items(), old.state_dict().values(), strict=True):
            assert torch.equal(a, b), name  # each kept layer as it was
    feed = {k: torch.from_numpy(v) for k, v in feeds[0].items()}
    with torch.no_grad():
        out = dropped(**feed, output_hidden_states=True)
    assert out.logits.shape == (4, 3) and len(out.hidden_states) == 3
    with pytest.raises(TuneryError, match="not a set of layers"):
        drop_layers(model, [0, 3])


def test_build_pruned_exports_a_fused_smaller_graph_matching_pytorch(tmp_path):
    import numpy as np
    import onnx
    import torch
    from transformers import AutoTokenizer

    from tests.test_export import make_finetune_dir
    from tunery.data.tokens import unpadded
    from tunery.onnx import export as ox
    from tunery.onnx.compress import CalibrationReader, build_pruned, prune_ffn, prune_heads
    from tunery.onnx.runtime import create_session

    ft = make_finetune_dir(tmp_path, train_steps=3)
    model = ox.load_torch_model(ft / "merged")
    tok = AutoTokenizer.from_pretrained(ft / "merged")
    texts = ["a red animal that lives in the wild", "rice", "an old tool made of wood", "x"]
    feeds = CalibrationReader(
        unpadded(tok, texts, max_length=32), ["input_ids", "attention_mask"]
    )._feeds
    info = build_pruned(
        model, tok, feeds, tmp_path / "p.onnx", heads=1, ffn_fraction=0.25, max_length=32
    )
    assert info["heads_per_layer"] == 1 and info["ffn_neurons_per_layer"] == 48
    graph = onnx.load(tmp_path / "p.onnx").graph
    attention = [n for n in graph.node if n.op_type == "Attention"]
    assert len(attention) == 2
    assert all(a.i == 1 for n in attention for a in n.attribute if a.name == "num_heads")
    reference = prune_ffn(prune_heads(model, feeds, 1), feeds, 0.25)
    session, _ = create_session(tmp_path / "p.onnx", "cpu")
    batch = tok(texts, padding=True, return_tensors="np")
    feed = {i.name: batch[i.name].astype(np.int64) for i in session.get_inputs()}
    got = session.run(None, feed)[0]
    with torch.no_grad():
        want = reference(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.raises(TuneryError, match="prune"):
        build_pruned(model, tok, feeds, tmp_path / "q.onnx")


def test_int8_graph_for_cpu_runs_layer_norm_unfused(tmp_path):
    """SkipLayerNormalization -> Sum + LayerNormalization: same logits, and onnxruntime keeps it so."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from tasks import export
    from tests.test_export import make_data_dir, make_finetune_dir
    from tunery.onnx.compress import plain_layer_norms, quantize_int8_dynamic

    ft, data = make_finetune_dir(tmp_path, train_steps=3), make_data_dir(tmp_path)
    export.run(ExportConfig(), finetune_dir=ft, data_dir=data, out_dir=tmp_path / "onnx")
    fused = tmp_path / "onnx" / "model.onnx"
    model = onnx.load(fused)
    n_skip = sum(n.op_type == "SkipLayerNormalization" for n in model.graph.node)
    assert n_skip and plain_layer_norms(model) == n_skip
    ops = [n.op_type for n in model.graph.node]
    assert "SkipLayerNormalization" not in ops and ops.count("LayerNormalization") >= n_skip
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "plain.onnx")

    rng = np.random.default_rng(0)
    ids = rng.integers(5, 100, (3, 7)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": 0 * ids}

    def run(path, optimized=None):
        so = ort.SessionOptions()
        if optimized:
            so.optimized_model_filepath = str(optimized)
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return s.run(
            None, {k: v for k, v in feed.items() if k in {i.name for i in s.get_inputs()}}
        )[0]

    np.testing.assert_allclose(run(tmp_path / "plain.onnx"), run(fused), atol=1e-5)
    run(tmp_path / "plain.onnx", optimized=tmp_path / "seen.onnx")  # what onnxruntime runs
    assert "SkipLayerNormalization" not in {
        n.op_type for n in onnx.load(tmp_path / "seen.onnx").graph.node
    }

    quantize_int8_dynamic(fused, tmp_path / "q_plain.onnx")
    quantize_int8_dynamic(
        fused, tmp_path / "q_fused.onnx", plain_layer_norm=False, pack_tokens=False
    )
    quantize_int8_dynamic(fused, tmp_path / "q_excl.onnx", exclude=["classifier"])
    ops_of = {
        k: [(n.op_type, n.name) for n in onnx.load(tmp_path / f"q_{k}.onnx").graph.node]
        for k in ("plain", "fused", "excl")
    }
    types = {k: [t for t, _ in v] for k, v in ops_of.items()}
    assert "SkipLayerNormalization" not in types["plain"] and "Sum" in types["plain"]
    assert "SkipLayerNormalization" in types["fused"]
    assert "NonZero" in types["plain"] and "NonZero" not in types["fused"]  # pack_tokens
    assert not list(tmp_path.glob("*.packed.onnx"))  # the intermediate graph is removed

    def float_classifier(k):
        return any(t in ("MatMul", "Gemm") and "classifier" in n for t, n in ops_of[k])

    assert float_classifier("excl") and not float_classifier("plain")


def test_throughput_batches_are_length_sorted():
    from tunery.onnx.compress import bench_inputs

    encoded = [{"input_ids": [1] * n} for n in (9, 2, 7, 3, 8, 1, 5, 4)]
    singles, groups = bench_inputs(encoded, runs=3, batch=3, batches=2)
    assert len(singles) == 3
    lengths = [len(e["input_ids"]) for g in groups for e in g]
    assert lengths == sorted(lengths) and [len(g) for g in groups] == [3, 3]


def _run_compress(root, tmp_path, cfg):
    from tasks import compress

    return compress.run(
        cfg,
        finetune_dir=root / "finetune",
        export_dir=root / "onnx",
        data_dir=root / "prepared",
        variants_dir=tmp_path / "v",
        out_dir=tmp_path / "d",
        report_dir=tmp_path / "r",
        plot_path=tmp_path / "p.png",
    )


@pytest.mark.parametrize("prune", [{"heads": 1}, {"layers": 1}], ids=["heads", "layers"])
def test_pruned_variant_outside_the_budget_is_not_kept_or_selected(
    compressed, tmp_path, monkeypatch, prune
):
    from tunery.onnx import compress as comp

    root, _, _ = compressed
    real_runner, real_parity = comp.onnx_runner, comp.parity
    checking: list[str] = []

    def runner(path, device, threads=0):
        checking.append(path.name)
        return real_runner(path, device, threads)

    def parity(ref, logits, y):
        p = real_parity(ref, logits, y)
        if checking[-1].startswith("pruned_"):  # pretend pruning cost 2 points of macro-F1
            p = {**p, "macro_f1_delta": -0.02, "macro_f1": p["macro_f1"] - 0.02}
        return p

    monkeypatch.setattr(comp, "onnx_runner", runner)
    monkeypatch.setattr(comp, "parity", parity)
    cfg = CompressConfig(
        variants=["fp32", "int8_dynamic"],
        prune=PruneConfig(enabled=True, **prune, recovery=RecoveryConfig(steps=2, batch_size=4)),
        max_f1_drop=0.01,
        bench=SMALL_BENCH,
    )
    metrics = _run_compress(root, tmp_path, cfg)
    report = compress_report.read(tmp_path / "r")
    assert report["rejected"] == ["pruned_fp32", "pruned_int8_dynamic"]
    assert not any(n.startswith("pruned_") for n in report["variants"])
    assert (
        not report["selected"].startswith("pruned_") and metrics["selected"] == report["selected"]
    )
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["fp32", "int8_dynamic"]
    rejected = report["rejected_variants"]["pruned_int8_dynamic"]
    assert rejected["parity"]["macro_f1_delta"] == -0.02
    assert rejected["bench"]["cpu"]["throughput"] > 0  # timed: what it would have bought
    recovery = rejected["pruning"]["recovery"]
    assert recovery["steps"] == 2 and "macro_f1_drop_recovered" in recovery
    md = (tmp_path / "r" / compress_report.MARKDOWN_FILE).read_text()
    assert "Rejected (outside the accuracy budget" in md
    rows = [line for line in md.splitlines() if line.startswith("| pruned_int8_dynamic |")]
    assert len(rows) == 1 and "| -0.0200 |" in rows[0] and rows[0].endswith("no: over budget |")
    assert "after distillation recovery (2 steps" in md
    if prune.get("layers"):
        assert rejected["pruning"]["layers"] == 1 and rejected["pruning"]["kept_layers"] == [1]
        assert "1 encoder layers dropped (spread: kept 1)" in md


def test_pruned_variant_within_the_budget_is_kept_and_can_be_selected(compressed, tmp_path):
    root, _, _ = compressed
    cfg = CompressConfig(
        variants=["fp32"],
        prune=PruneConfig(enabled=True, heads=1),
        max_f1_drop=1.0,
        bench=SMALL_BENCH,
    )
    _run_compress(root, tmp_path, cfg)
    report = compress_report.read(tmp_path / "r")
    assert report["rejected"] == []
    assert {"pruned_fp32", "pruned_int8_dynamic"} <= set(report["eligible"])
    assert report["prune"]["heads"] == 1
    assert (tmp_path / "v" / "pruned_int8_dynamic" / "model.onnx").is_file()


def test_a_selected_pruned_variant_is_deployed_with_its_own_temperature(
    compressed, tmp_path, monkeypatch
):
    """The pruned, recovered int8 model, when selected, is calibrated on its own val logits and
    the temperature is in the deployed graph (probabilities = Softmax(logits / T))."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from tunery.onnx import calibration as cal
    from tunery.onnx import compress as comp
    from tunery.onnx import variants as vs
    from tunery.onnx.runtime import softmax

    root, _, _ = compressed
    real_select, real_calibrate, fitted = comp.select, vs.calibrate, {}

    def select(variants, **kw):  # as if the pruned int8 variant were the fastest
        return real_select({k: v for k, v in variants.items() if k.startswith("pruned_int8")}, **kw)

    def calibrate(setup, logits):
        j = setup.judge
        fitted.update(logits=logits, encoded=j.encoded, val_rows=j.val_rows, y=j.y_true)
        return real_calibrate(setup, logits)

    monkeypatch.setattr(comp, "select", select)
    monkeypatch.setattr(vs, "calibrate", calibrate)
    cfg = CompressConfig(
        variants=["fp32"],
        prune=PruneConfig(
            enabled=True, heads=1, ffn_fraction=0.25, recovery=RecoveryConfig(steps=3, batch_size=4)
        ),
        max_f1_drop=1.0,
        bench=SMALL_BENCH,
    )
    metrics = _run_compress(root, tmp_path, cfg)
    assert metrics["selected"] == "pruned_int8_dynamic"
    manifest = json.loads((tmp_path / "d" / "tunery_model.json").read_text())
    temperature = manifest["calibration"]["temperature"]
    assert manifest["variant"] == "pruned_int8_dynamic"
    assert temperature == compress_report.read(tmp_path / "r")["calibration"]["temperature"]
    kept = onnx.load(str(tmp_path / "v" / "pruned_int8_dynamic" / "model.onnx"))
    deployed = onnx.load(str(tmp_path / "d" / "model.onnx"))
    t_init = {i.name: numpy_helper.to_array(i) for i in deployed.graph.initializer}
    assert float(t_init["tunery_temperature"]) == pytest.approx(temperature)
    assert len(deployed.graph.node) == len(kept.graph.node) + 2  # the pruned graph + Div, Softmax
    runner = comp.onnx_runner(tmp_path / "d" / "model.onnx", "cpu")
    ids = np.array([[101, 7, 8, 102]], np.int64)
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": 0 * ids}
    logits, probs = runner.session.run(None, {k: inputs[k] for k in runner.input_names})
    np.testing.assert_allclose(probs, softmax(logits / temperature), atol=1e-5)
    # T was fitted on the pruned variant's own logits on every judged row, val + test (batches
    # as the stage runs them: dynamic int8 scales activations per batch)
    pruned_logits = comp.run_batches(runner, fitted["encoded"], 64, runner.input_names, 3)
    np.testing.assert_allclose(fitted["logits"], pruned_logits, atol=1e-4)
    assert fitted["val_rows"] < len(fitted["y"])
    assert cal.calibrate(pruned_logits, fitted["y"], 3)["temperature"] == (
        pytest.approx(temperature)
    )


def test_prune_config_needs_something_to_prune():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="layers, heads and/or ffn_fraction"):
        PruneConfig(enabled=True)
    assert PruneConfig(enabled=False).heads == 0
    assert PruneConfig(enabled=True, layers=2).layer_choice == "spread"
    with pytest.raises(ValidationError, match="layer_choice"):
        PruneConfig(enabled=True, layers=1, layer_choice="bottom")
    with pytest.raises(ValidationError, match="layers"):
        PruneConfig(enabled=True, layers=-1)


def test_judged_on_val_and_test_with_a_paired_interval(compressed):
    root, metrics, report = compressed
    judged = report["judged"]
    assert judged["splits"] == ["val", "test"]
    assert judged["rows"] == {"val": 3 * VAL_PER_CLASS, "test": 30}
    assert report["eval_rows"] == metrics["judged_rows"] == 3 * VAL_PER_CLASS + 30
    assert judged["bootstrap"] == {"resamples": 1000, "seed": 0, "level": 0.95, "paired": True}
    assert report["variants"]["fp32"]["parity"]["macro_f1_delta_ci95"] == [0.0, 0.0]
    md = (root / "reports" / compress_report.MARKDOWN_FILE).read_text()
    assert "Judged on 54 texts (val 24 + test 30)" in md and "paired bootstrap" in md


def test_paired_bootstrap_interval():
    import numpy as np
    from sklearn.metrics import f1_score

    from tunery.onnx.compress import _macro_f1_weighted, bootstrap_f1_delta

    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    ref = np.where(rng.random(300) < 0.8, y, rng.integers(0, 3, 300))
    worse = np.where(rng.random(300) < 0.85, ref, rng.integers(0, 3, 300))
    w = np.ones((1, 300))
    want = f1_score(y, worse, average="macro", labels=[0, 1, 2], zero_division=0)
    assert abs(_macro_f1_weighted(y, worse, w, 3)[0] - want) < 1e-12
    delta = want - f1_score(y, ref, average="macro", labels=[0, 1, 2], zero_division=0)
    lo, hi = bootstrap_f1_delta(y, ref, worse, 3, resamples=500, seed=0)
    assert lo < delta < hi < 0.0  # a real drop: the interval excludes 0
    assert bootstrap_f1_delta(y, ref, worse, 3, resamples=500, seed=0) == [lo, hi]
    assert bootstrap_f1_delta(y, ref, ref, 3) == [0.0, 0.0]  # paired: identical models, no spread


def test_deployed_graph_serves_calibrated_probabilities(compressed):
    import numpy as np
    import onnxruntime as ort

    from tunery.onnx.calibration import probabilities
    from tunery.onnx.runtime import Predictor

    root, metrics, report = compressed
    manifest = json.loads((root / "deploy" / "tunery_model.json").read_text())
    c = manifest["calibration"]
    assert c == report["calibration"] == metrics["calibration"]
    assert set(c) >= {"method", "temperature", "fitted_on", "rows", "val_ece_before"}
    assert c["fitted_on"] == "val+test" and c["rows"] == 3 * VAL_PER_CLASS + 30
    assert c["fallback"] is None and c["temperature"] != 1.0
    assert c["val_nll_after"] < c["val_nll_before"]
    assert manifest["outputs"] == ["logits", "probabilities"]
    s = ort.InferenceSession(
        str(root / "deploy" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    assert [o.name for o in s.get_outputs()] == ["logits", "probabilities"]

    texts = ["a red animal that lives in the wild", "a warm dish made from rice", "old tool"]
    deploy = Predictor(root / "deploy", device="cpu")
    variant = Predictor(root / "variants" / report["selected"], device="cpu")
    assert deploy.calibrated and not variant.calibrated
    logits = deploy.logits(texts)
    np.testing.assert_allclose(logits, variant.logits(texts), atol=1e-5)  # logits unchanged
    preds = deploy.predict(texts)
    np.testing.assert_allclose(
        preds.probabilities, probabilities(logits, c["temperature"]), atol=1e-5
    )
    assert preds.labels == variant.predict(texts).labels
    assert deploy.metadata["calibration"]["temperature"] == c["temperature"]


def test_a_judged_set_too_small_to_fit_keeps_t_1(compressed, tmp_path, monkeypatch):
    """The fit pools val + test (33 rows here); when even that is too few rows per class, the
    deployed graph keeps T = 1 and the report says why."""
    import shutil

    from tunery.onnx import calibration as cal

    root, _, _ = compressed
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train", "test"):
        shutil.copy(root / "prepared" / f"{name}.parquet", data / f"{name}.parquet")
    make_rows(1, offset=200).to_parquet(data / "val.parquet")  # 3 val rows + 30 test rows
    monkeypatch.setattr(cal, "MIN_ROWS_PER_CLASS", 12.0)  # 36 rows needed for 3 classes
    from tasks import compress

    cfg = CompressConfig(variants=["fp32"], bench=SMALL_BENCH)
    metrics = compress.run(
        cfg,
        finetune_dir=root / "finetune",
        export_dir=root / "onnx",
        data_dir=data,
        variants_dir=tmp_path / "v",
        out_dir=tmp_path / "d",
        report_dir=tmp_path / "r",
        plot_path=tmp_path / "p.png",
    )
    c = metrics["calibration"]
    assert c["temperature"] == 1.0 and c["rows"] == 33 and c["fitted_on"] == "val+test"
    assert "val+test split too small" in c["fallback"]
    manifest = json.loads((tmp_path / "d" / "tunery_model.json").read_text())
    assert manifest["calibration"]["fallback"] == c["fallback"]
    assert (
        "Fallback: val+test split too small"
        in (tmp_path / "r" / compress_report.MARKDOWN_FILE).read_text()
    )


def _float_weight_nodes(path) -> int:
    """Quantizable nodes (MatMul/Gemm/Attention/EmbedLayerNorm) still on float weight initializers."""
    import onnx

    graph = onnx.load(path).graph
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    ops = ("MatMul", "Gemm", "Attention", "EmbedLayerNormalization")
    return sum(n.op_type in ops and any(i in floats for i in n.input) for n in graph.node)


@pytest.mark.parametrize("cap, ok", [(8, True), (1, False)])
def test_int8_fallback_keeps_sensitive_nodes_in_float(compressed, tmp_path, monkeypatch, cap, ok):
    """A parity that costs 2 points unless >= 2 more nodes than plain int8 run in float."""
    from tunery.config import Int8Config
    from tunery.onnx import compress as comp

    root, _, _ = compressed
    plain = tmp_path / "plain.onnx"
    comp.quantize_int8_dynamic(root / "onnx" / "model.onnx", plain)
    base = _float_weight_nodes(plain)
    real_runner, real_parity = comp.onnx_runner, comp.parity
    checking: list = []

    def runner(path, device, threads=0):
        checking.append(path)
        return real_runner(path, device, threads)

    def parity(ref, logits, y):
        p = real_parity(ref, logits, y)
        if "int8" in checking[-1].name and _float_weight_nodes(checking[-1]) < base + 2:
            p = {**p, "macro_f1_delta": -0.02, "macro_f1": p["macro_f1"] - 0.02}
        return p

    monkeypatch.setattr(comp, "onnx_runner", runner)
    monkeypatch.setattr(comp, "parity", parity)
    cfg = CompressConfig(
        variants=["fp32", "int8_dynamic"],
        int8=Int8Config(max_fallback_nodes=cap),
        max_f1_drop=0.01,
        bench=SMALL_BENCH,
    )
    _run_compress(root, tmp_path, cfg)
    report = compress_report.read(tmp_path / "r")
    fb = report["variants"]["int8_dynamic"]["int8_fallback"]
    assert fb["quantized_macro_f1_delta"] == -0.02
    assert fb["sensitivity"] and all(v >= 0 for v in fb["sensitivity"].values())
    assert fb["within_budget"] is ok
    md = (tmp_path / "r" / compress_report.MARKDOWN_FILE).read_text()
    if ok:
        assert [t["float_nodes"] for t in fb["tries"]] == [1, 2]
        assert fb["float_nodes"] == list(fb["sensitivity"])[:2]
        assert "int8_dynamic" in report["eligible"]  # selectable; tiny-model speed decides
        kept = tmp_path / "v" / "int8_dynamic" / "model.onnx"
        assert _float_weight_nodes(kept) == base + 2
        assert "within budget with 2 node(s) in float" in md
    else:
        assert [t["float_nodes"] for t in fb["tries"]] == [1]
        assert report["selected"] == "fp32" and "int8_dynamic" not in report["eligible"]
        assert "not within budget at the cap" in md


def test_a_failing_quantization_is_recorded_not_fatal(compressed, tmp_path, monkeypatch):
    from tunery.onnx import compress as comp

    def broken(*_a, **_k):
        raise RuntimeError("Unsupported operator: NotAnOp")

    monkeypatch.setattr(comp, "quantize_int8_static", broken)
    root, _, _ = compressed
    cfg = CompressConfig(variants=["fp32", "int8_static"], max_f1_drop=0.01, bench=SMALL_BENCH)
    metrics = _run_compress(root, tmp_path, cfg)
    report = compress_report.read(tmp_path / "r")
    assert "NotAnOp" in report["failed"]["int8_static"] and metrics["failed"] == report["failed"]
    assert report["selected"] == "fp32" and "int8_static" not in report["variants"]
    assert (
        "Failed (recorded, not selectable): int8_static"
        in (tmp_path / "r" / compress_report.MARKDOWN_FILE).read_text()
    )


def test_compress_report_refuses_a_broken_report_and_writes_nothing(tmp_path):
    good = {
        "selected": "fp32",
        "parity_passed": True,
        "variants": {"fp32": {"parity": {"macro_f1_delta": 0.0}}},
    }
    compress_report.check(good)
    for broken, rule in (
        ({**good, "selected": "int8_dynamic"}, "not among its variants"),
        ({**good, "variants": {"fp32": {"parity": {}}}}, "no parity.macro_f1_delta"),
        ({**good, "parity_passed": "yes"}, "parity_passed must be true or false"),
    ):
        with pytest.raises(TuneryError, match=rule):
            compress_report.write(tmp_path / "r", broken, "# report")
        assert not (tmp_path / "r").exists()


def test_compress_report_reads_what_is_there_or_nothing(tmp_path):
    assert compress_report.read(tmp_path / "none") == {}
    assert compress_report.parity_passed(compress_report.read(tmp_path / "none")) is None
    compress_report.path_in(tmp_path).write_text("{not json")
    assert compress_report.read(tmp_path) == {}  # the gate then fails closed
    report = {
        "target_provider": "cpu",
        "parity_passed": False,
        "reference_bench": {"cpu": {"throughput": 100.0}},
        "variants": {
            "int8_dynamic": {
                "parity": {"macro_f1_delta": -0.01},
                "bench": {"cpu": {"throughput": 250.0}, "cuda": {"error": "no GPU"}},
            }
        },
    }
    compress_report.path_in(tmp_path).write_text(json.dumps(report))
    got = compress_report.read(tmp_path)
    assert compress_report.parity_passed(got) is False
    assert compress_report.served_numbers(got, "int8_dynamic") == {
        "throughput": 250.0,
        "reference_throughput": 100.0,
        "macro_f1_delta": -0.01,
    }
    assert compress_report.served_numbers(got, "fp16") == {
        "throughput": None,
        "reference_throughput": 100.0,
        "macro_f1_delta": None,
    }
    report.update(
        selected="int8_dynamic",
        eligible=["int8_dynamic"],
        rejected_variants={
            "pruned_int8_dynamic": {
                "parity": {"macro_f1_delta": -0.011},
                "bench": {"cpu": {"throughput": 380.0}},
            }
        },
    )
    assert compress_report.candidates(report) == [
        {"variant": "int8_dynamic", "speedup": 2.5, "macro_f1_delta": -0.01, "status": "selected"},
        {
            "variant": "pruned_int8_dynamic",
            "speedup": 3.8,
            "macro_f1_delta": -0.011,
            "status": "over budget",
        },
    ]


def _kl_to(teacher, student, feeds) -> float:
    import torch
    import torch.nn.functional as F

    total = 0.0
    with torch.no_grad():
        for feed in feeds:
            f = {k: torch.from_numpy(v) for k, v in feed.items()}
            t, s = teacher(**f).logits, student(**f).logits
            total += float(F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean"))
    return total / len(feeds)


def _recovery_data(teacher, feeds):
    """The feeds' rows as unpadded texts, labelled by the teacher."""
    import numpy as np
    import torch

    from tunery.onnx.distill import RecoveryData

    encoded, labels = [], []
    for f in feeds:
        with torch.no_grad():
            pred = teacher(**{k: torch.from_numpy(v) for k, v in f.items()}).logits.argmax(-1)
        for r in range(len(f["input_ids"])):
            real = f["attention_mask"][r] > 0
            encoded.append({k: v[r][real].tolist() for k, v in f.items()})
            labels.append(int(pred[r]))
    return RecoveryData(encoded, np.array(labels), ["input_ids", "attention_mask"])


def test_distillation_recovery_brings_the_pruned_model_back_towards_the_teacher():
    import torch

    from tunery.config import RecoveryConfig
    from tunery.onnx.compress import prune_ffn, prune_heads
    from tunery.onnx.distill import recover

    teacher, feeds = _bert(), _feeds(n=4)
    with torch.no_grad():  # a random tiny BERT predicts ~uniformly: spread its logits
        for p in teacher.parameters():
            if p.dim() == 2:
                p.mul_(10)
    data = _recovery_data(teacher, feeds)
    student = prune_ffn(prune_heads(teacher, feeds, 2, refit="none"), feeds, 0.5, compensate=False)
    before = _kl_to(teacher, student, feeds)
    cfg = RecoveryConfig(steps=30, batch_size=8, lr=3.0e-3, kd_weight=1.0, hidden_weight=1.0)
    student, record = recover(student, teacher, data, cfg)
    assert _kl_to(teacher, student, feeds) < 0.5 * before
    assert record["steps"] == 30 and record["last_loss"] < record["first_loss"]
    assert not student.training
    layer = student.bert.encoder.layer[0]  # recovery trains the pruned shapes, adds nothing
    assert layer.attention.self.query.weight.shape == (8, 16)
    assert layer.intermediate.dense.weight.shape == (20, 16)
    assert teacher.bert.encoder.layer[0].intermediate.dense.weight.shape == (40, 16)
    with pytest.raises(TuneryError, match="fewer than one batch"):
        recover(student, teacher, data, RecoveryConfig(steps=1, batch_size=64))


@pytest.mark.parametrize("layers", [0, 1])
def test_build_pruned_exports_the_recovered_model(tmp_path, layers):
    """What `recover` returns is what is exported: the ONNX graph matches the recovered model."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from tunery.config import RecoveryConfig
    from tunery.data.tokens import unpadded
    from tunery.onnx import export as ox
    from tunery.onnx.compress import CalibrationReader, build_pruned
    from tunery.onnx.distill import recover
    from tunery.onnx.runtime import create_session

    ft = make_finetune_dir(tmp_path, train_steps=3)
    model = ox.load_torch_model(ft / "merged")
    tok = AutoTokenizer.from_pretrained(ft / "merged")
    texts = ["a red animal that lives in the wild", "rice", "an old tool made of wood", "x"]
    feeds = CalibrationReader(unpadded(tok, texts, max_length=32), ["input_ids", "attention_mask"])
    data = _recovery_data(model, feeds._feeds)
    kept = {}

    def recovered(pruned, teacher_layers):
        kept["layers"] = teacher_layers
        cfg = RecoveryConfig(steps=4, batch_size=4, hidden_weight=1.0)
        kept["model"], record = recover(pruned, model, data, cfg, teacher_layers=teacher_layers)
        return kept["model"], record

    info = build_pruned(
        model,
        tok,
        feeds._feeds,
        tmp_path / "p.onnx",
        ffn_fraction=0.5,
        layers=layers,
        layer_choice="spread",
        recover=recovered,
    )
    assert info["recovery"]["steps"] == 4 and info["ffn_neurons_per_layer"] == 32
    assert info["kept_layers"] == kept["layers"] == ([1] if layers else [0, 1])
    assert info["layers"] == 2 - layers == kept["model"].config.num_hidden_layers
    assert info["fused_operators"]["Attention"] == 2 - layers  # the graph has the kept layers
    session, _ = create_session(tmp_path / "p.onnx", "cpu")
    batch = tok(texts, padding=True, return_tensors="np")
    feed = {i.name: batch[i.name].astype(np.int64) for i in session.get_inputs()}
    with torch.no_grad():
        want = kept["model"](**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
    np.testing.assert_allclose(session.run(None, feed)[0], want, atol=1e-4)
