"""Predictor, `tunery predict`, device handling (CUDA refused when absent), model-folder checks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tests.test_export import make_data_dir, make_finetune_dir
from tunery.config import ExportConfig
from tunery.errors import EXIT_INPUT, TuneryError

TEXTS = [
    "a red animal that lives in the wild and eats small item3",
    "a warm dish made from rice and served with item9",
    "a hard hand tool used for cutting the edge of wood",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tasks import export

    root = tmp_path_factory.mktemp("inference")
    ft, data = make_finetune_dir(root), make_data_dir(root)
    export.run(ExportConfig(), finetune_dir=ft, data_dir=data, out_dir=root / "onnx")
    return root / "onnx"


@pytest.fixture(scope="module")
def reference(model_dir):
    """PyTorch logits of the merged model for TEXTS."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    merged = model_dir.parent / "finetune" / "merged"
    model = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    tok = AutoTokenizer.from_pretrained(merged)
    with torch.no_grad():
        return model(**tok(TEXTS, padding=True, return_tensors="pt")).logits.numpy()


def test_predictor_matches_pytorch_and_keeps_input_order(model_dir, reference):
    import tunery

    p = tunery.Predictor(model_dir, device="cpu", batch_size=2)
    np.testing.assert_allclose(p.logits(TEXTS), reference, atol=1e-4)
    preds = p.predict(TEXTS)
    classes = json.loads((model_dir / "labels.json").read_text())
    assert preds.classes == classes
    assert preds.labels == [classes[i] for i in reference.argmax(-1)]
    np.testing.assert_allclose(preds.probabilities.sum(-1), 1.0, rtol=1e-5)
    record = preds.records()[0]
    assert set(record) == {"label", "score", "probabilities"}
    assert p.predict([]).labels == []


def test_import_tunery_stays_cheap():
    code = "import sys, tunery; assert 'onnxruntime' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cuda_requested_but_absent_refuses_to_start(model_dir):
    import onnxruntime as ort

    from tunery.onnx.runtime import Predictor

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    with pytest.raises(TuneryError, match="device=cuda.*no CUDAExecutionProvider"):
        Predictor(model_dir, device="cuda")


def test_cuda_provider_listed_but_unusable_refuses(model_dir, monkeypatch):
    """A CUDA provider that cannot take the graph must fail, never fall back to CPU silently."""
    import onnxruntime as ort

    from tunery.onnx import runtime as inference

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    real = ort.InferenceSession

    def fake_session(path, so, providers):
        if providers[0][0] == "CUDAExecutionProvider":
            raise RuntimeError("nodes are assigned to the default CPU EP, but fallback is disabled")
        return real(path, so, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", fake_session)
    with pytest.raises(TuneryError, match="cannot run on CUDA with CPU fallback disabled"):
        inference.Predictor(model_dir, device="cuda")
    # auto may fall back, and says so
    p = inference.Predictor(model_dir, device="auto")
    assert p.device == "cpu"


def test_auto_logs_its_choice(model_dir, caplog):
    from tunery.onnx.runtime import Predictor

    with caplog.at_level("INFO", logger="tunery.inference"):
        p = Predictor(model_dir, device="auto")
    assert p.provider == "CPUExecutionProvider"
    assert "auto: using CPUExecutionProvider" in caplog.text


def test_unknown_device_is_refused(model_dir):
    from tunery.onnx.runtime import Predictor

    with pytest.raises(TuneryError, match="device 'tpu'"):
        Predictor(model_dir, device="tpu")


def test_only_project_model_folders_load(model_dir, tmp_path):
    from tunery.onnx.runtime import Predictor

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(model_dir / "model.onnx", bare / "model.onnx")
    with pytest.raises(TuneryError, match="not a Tunery model folder"):
        Predictor(bare, device="cpu")

    tampered = tmp_path / "tampered"
    shutil.copytree(model_dir, tampered)
    with open(tampered / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(TuneryError, match="sha256 does not match"):
        Predictor(tampered, device="cpu")

    with pytest.raises(TuneryError, match="model folder not found"):
        Predictor(tmp_path / "missing", device="cpu")


def test_registry_uris_need_a_resolver(model_dir, monkeypatch):
    from tunery.onnx import runtime as inference

    monkeypatch.setattr(inference, "_RESOLVERS", {})
    monkeypatch.setattr(inference, "PLUGINS", {})  # not even the registry's
    with pytest.raises(TuneryError, match="no resolver for 'models:/'"):
        inference.Predictor("models:/tunery-classifier@champion", device="cpu")
    inference.register_resolver("models", lambda uri: model_dir)
    p = inference.Predictor("models:/tunery-classifier@champion", device="cpu")
    assert p.metadata["source"] == "models:/tunery-classifier@champion"


def test_length_batches_sort_and_pad():
    from tunery.onnx.runtime import length_batches

    encoded = [{"input_ids": [1] * n, "attention_mask": [1] * n} for n in (5, 2, 9, 3)]
    batches = list(
        length_batches(encoded, 2, ["input_ids", "attention_mask", "token_type_ids"], pad_id=7)
    )
    assert [list(idx) for idx, _ in batches] == [[1, 3], [0, 2]]
    first = batches[0][1]
    assert first["input_ids"].shape == (2, 3) and first["input_ids"][0, 2] == 7
    assert first["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert not first["token_type_ids"].any()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_cli_predict_scores_a_file(model_dir, tmp_path, suffix):
    from tunery.cli import main
    from tunery.onnx.runtime import read_table, write_table

    src, dest = tmp_path / f"in{suffix}", tmp_path / f"out{suffix}"
    write_table(pd.DataFrame({"id": [1, 2, 3], "body": TEXTS}), src)
    with pytest.raises(SystemExit) as done:
        main(
            [
                "predict",
                str(src),
                "-o",
                str(dest),
                "--model",
                str(model_dir),
                "--device",
                "cpu",
                "--text-column",
                "body",
                "--no-progress",
            ]
        )
    assert done.value.code == 0
    out = read_table(dest)
    classes = json.loads((model_dir / "labels.json").read_text())
    assert list(out["id"]) == [1, 2, 3]
    assert set(out["prediction"]) <= set(classes)
    assert {f"prob_{c}" for c in classes} <= set(out.columns)
    np.testing.assert_allclose(out[[f"prob_{c}" for c in classes]].sum(axis=1), 1.0, rtol=1e-5)


def test_cli_predict_bad_input_is_a_clear_error(model_dir, tmp_path, capsys):
    from tunery.cli import main

    src = tmp_path / "in.csv"
    pd.DataFrame({"other": ["x"]}).to_csv(src, index=False)
    with pytest.raises(SystemExit) as done:
        main(
            [
                "predict",
                str(src),
                "-o",
                str(tmp_path / "o.csv"),
                "--model",
                str(model_dir),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
    assert done.value.code == EXIT_INPUT
    assert "no column 'text'" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.gpu
def test_cuda_session_really_runs_on_cuda(model_dir, reference):
    from tunery.onnx.runtime import Predictor

    p = Predictor(model_dir, device="cuda")
    assert p.provider == "CUDAExecutionProvider"
    assert p._run.session.get_providers()[0] == "CUDAExecutionProvider"
    np.testing.assert_allclose(p.logits(TEXTS), reference, atol=1e-3)


@pytest.mark.gpu
def test_cuda_fp16_variant_matches_pytorch(model_dir, reference, tmp_path):
    from tunery.onnx import export as ox
    from tunery.onnx.runtime import Predictor

    dest = tmp_path / "fp16"
    dest.mkdir()
    from transformers import AutoConfig, AutoTokenizer

    model_type, heads, hidden = ox.model_shape(
        AutoConfig.from_pretrained(model_dir.parent / "finetune" / "merged")
    )
    ox.optimize(
        model_dir / "raw.onnx",
        tmp_path / "m16.onnx",
        model_type=model_type,
        num_heads=heads,
        hidden_size=hidden,
        use_gpu=True,
        fp16=True,
    )
    ox.write_model_dir(
        dest,
        onnx_file=tmp_path / "m16.onnx",
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        labels=json.loads((model_dir / "labels.json").read_text()),
        variant="fp16",
        provider="cuda",
        opset=17,
        max_length=32,
        source={},
    )
    p = Predictor(dest, device="auto")
    assert p.device == "cuda"
    np.testing.assert_allclose(p.logits(TEXTS), reference, atol=2e-2)


def test_predictor_serves_the_calibrated_output_when_the_graph_has_it(model_dir, tmp_path):
    """A folder whose graph has `probabilities` (compress): served as is; older ones: softmax."""
    from transformers import AutoTokenizer

    from tunery.onnx import export as ox
    from tunery.onnx.calibration import add_probabilities, probabilities
    from tunery.onnx.runtime import Predictor

    add_probabilities(model_dir / "model.onnx", tmp_path / "cal.onnx", 3.0)
    dest = tmp_path / "calibrated"
    dest.mkdir()
    ox.write_model_dir(
        dest,
        onnx_file=tmp_path / "cal.onnx",
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        labels=json.loads((model_dir / "labels.json").read_text()),
        variant="fp32",
        provider="cpu",
        opset=17,
        max_length=32,
        source={},
        extra={"calibration": {"method": "temperature", "temperature": 3.0}},
    )
    plain, calibrated = Predictor(model_dir, device="cpu"), Predictor(dest, device="cpu")
    assert not plain.calibrated and calibrated.calibrated
    logits = plain.logits(TEXTS)
    np.testing.assert_allclose(calibrated.logits(TEXTS), logits, atol=1e-5)
    got, old = calibrated.predict(TEXTS), plain.predict(TEXTS)
    np.testing.assert_allclose(got.probabilities, probabilities(logits, 3.0), atol=1e-5)
    np.testing.assert_allclose(old.probabilities, probabilities(logits, 1.0), atol=1e-5)
    assert got.labels == old.labels
    assert (got.probabilities.max(-1) < old.probabilities.max(-1)).all()  # T > 1 softens
    assert calibrated.metadata["calibration"]["temperature"] == 3.0
