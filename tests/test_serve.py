"""The HTTP server: /predict, /health, /metadata, and bad requests answered with 4xx."""

from __future__ import annotations

import pytest

from tests.test_export import make_data_dir, make_finetune_dir
from tunery.config import ExportConfig


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from tasks import export
    from tunery.onnx.http import create_app
    from tunery.onnx.runtime import Predictor

    root = tmp_path_factory.mktemp("serve")
    ft, data = make_finetune_dir(root), make_data_dir(root)
    export.run(ExportConfig(), finetune_dir=ft, data_dir=data, out_dir=root / "onnx")
    app = create_app(Predictor(root / "onnx", device="cpu"), max_batch=4, max_chars=200)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "provider": "CPUExecutionProvider"}


def test_metadata(client):
    meta = client.get("/metadata").json()
    assert meta["variant"] == "fp32"
    assert meta["provider"] == "CPUExecutionProvider"
    assert meta["labels"] == ["animal", "food", "tool"]
    assert len(meta["model_version"]) == 12 and meta["max_batch"] == 4


def test_predict_a_batch(client):
    r = client.post("/predict", json={"texts": ["a red animal", "a warm dish made from rice"]})
    assert r.status_code == 200
    body = r.json()
    assert body["variant"] == "fp32"
    assert len(body["predictions"]) == 2
    first = body["predictions"][0]
    assert first["label"] in {"animal", "food", "tool"}
    assert abs(sum(first["probabilities"].values()) - 1.0) < 1e-5
    assert first["score"] == max(first["probabilities"].values())


@pytest.mark.parametrize(
    ("payload", "status", "reason"),
    [
        ({"texts": []}, 422, "at least 1"),
        ({"texts": ["a"] * 5}, 422, "at most 4"),
        ({"texts": "a single string"}, 422, "valid list"),
        ({"texts": [3]}, 422, "valid string"),
        ({"texts": ["  "]}, 422, "texts[0] is empty"),
        ({"texts": ["x" * 201]}, 413, "max 200"),
        ({"text": ["a"]}, 422, "texts"),
        ({"texts": ["a"], "extra": 1}, 422, "extra"),
    ],
)
def test_bad_requests_get_4xx_with_a_reason(client, payload, status, reason):
    r = client.post("/predict", json=payload)
    assert r.status_code == status
    assert reason in str(r.json()["detail"])


def test_malformed_json_and_wrong_method(client):
    r = client.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert client.get("/predict").status_code == 405
    assert client.get("/health").status_code == 200  # still alive


def test_default_bind_is_localhost():
    from tunery.cli import build_parser

    args = build_parser().parse_args(["serve-model"])
    assert args.host == "127.0.0.1"
    from tunery.onnx.http import DEFAULT_HOST

    assert DEFAULT_HOST == "127.0.0.1"
