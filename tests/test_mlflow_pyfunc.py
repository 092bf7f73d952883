"""The registered model as MLflow sees it: a text-in pyfunc on a real local registry.

`mlflow.pyfunc.load_model("models:/NAME@champion")` and `mlflow models serve` run the same
`Predictor` (one implementation of tokenization and post-processing) on the same ONNX file; bad
input is a clear error from `predict` and a 400 from the server, never a crash.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.services import QUIET_ENV, Proc, free_port, http_ok, wait_until
from tests.test_export import make_data_dir, make_finetune_dir
from tunery import mlflow_model, tracking
from tunery.config import ExportConfig
from tunery.errors import TuneryError
from tunery.registry import promotion

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TEXTS = ["a small red animal that lives in the wild", "a hard hand tool", "a warm dish"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A project with a real sqlite registry whose champion is a tiny exported model."""
    from tasks import export

    root = tmp_path_factory.mktemp("pyfunc")
    ft, data = make_finetune_dir(root), make_data_dir(root)
    export.run(ExportConfig(), finetune_dir=ft, data_dir=data, out_dir=root / "deploy")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    (root / "dvc.yaml").write_text("stages: {}\n")
    with tracking.stage_run(root, "pyfunc", "compress", {}) as run:
        version = mlflow_model.register_deployable(run, root / "deploy", "m", finetune_dir=ft)
    tracking.set_alias(root, "m", promotion.CHAMPION, version)
    return {"root": root, "version": version, "run_id": run.run_id}


@pytest.fixture
def champion(registry, monkeypatch):
    import mlflow

    monkeypatch.chdir(registry["root"])
    tracking.setup(registry["root"], "pyfunc")
    return mlflow.pyfunc.load_model("models:/m@champion")


def test_the_champion_takes_text_like_the_predictor(registry, champion):
    from tunery.onnx.runtime import Predictor

    local = Predictor(registry["root"] / "deploy", device="cpu").predict(TEXTS)
    got = champion.predict(pd.DataFrame({"text": TEXTS}))
    assert list(got.columns) == ["label", "score", "probabilities"]
    assert got["label"].tolist() == local.labels
    np.testing.assert_allclose(got["score"], local.probabilities.max(axis=1), atol=1e-6)
    assert set(got["probabilities"][0]) == set(local.classes)
    records = champion.predict([{"text": TEXTS[0]}])  # a list of dicts works too
    assert records["label"][0] == local.labels[0]
    sig = champion.metadata.signature
    assert sig.inputs.input_names() == ["text"]
    assert sig.outputs.input_names() == ["label", "score", "probabilities"]


def test_the_version_points_at_the_deployable_logged_model(registry):
    import mlflow

    mv = tracking._client(registry["root"]).get_model_version("m", registry["version"])
    model = mlflow.get_logged_model(mlflow_model.version_model_id(mv))
    assert model.source_run_id == registry["run_id"] and model.name == "deploy"
    assert model.tags[mlflow_model.KIND_TAG] == "deploy"
    adapter = mlflow.get_logged_model(model.tags[mlflow_model.ADAPTER_TAG])
    assert adapter.name == "adapter" and adapter.source_run_id == registry["run_id"]
    # one copy of the weights: the ONNX file once in the store, no orphan external data
    store = registry["root"] / tracking.ARTIFACT_DIR
    onnx_files = [p for p in store.rglob("*") if p.suffix in (".onnx", ".data")]
    assert [p.name for p in onnx_files] == ["model.onnx"], onnx_files


def test_logging_the_same_deployable_again_reuses_its_logged_model(registry):
    root = registry["root"]
    with tracking.stage_run(root, "pyfunc", "register", {}) as run:
        again = mlflow_model.register_deployable(run, root / "deploy", "m")
    client = tracking._client(root)
    first, second = (client.get_model_version("m", v) for v in (registry["version"], again))
    assert mlflow_model.version_model_id(first) == mlflow_model.version_model_id(second)
    assert len(list((root / tracking.ARTIFACT_DIR).rglob("model.onnx"))) == 1


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (pd.DataFrame({"txt": ["a"]}), "missing inputs ['text']"),
        (pd.DataFrame({"text": ["  "]}), "rows [1]: [text] is empty"),
        (pd.DataFrame({"text": [3]}), "Incompatible input types for column text"),
        ([{"text": None}], "rows [1]: [text] must be text"),
    ],
)
def test_bad_input_is_a_clear_error(champion, table, message):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as exc:
        champion.predict(table)
    assert message in str(exc.value) and exc.value.error_code == "INVALID_PARAMETER_VALUE"


def test_a_model_that_is_not_tunerys_is_refused(registry, monkeypatch, tmp_path):
    """A registered model without Tunery's deployable folder: a clear error, not a KeyError."""
    import mlflow

    from tunery.onnx.runtime import Predictor

    root = registry["root"]
    monkeypatch.chdir(root)
    tracking.setup(root, "pyfunc")
    with tracking.stage_run(root, "pyfunc", "foreign", {}) as run:
        (tmp_path / "f").mkdir()
        (tmp_path / "f" / "weights.txt").write_text("not a tunery model")
        mlflow.log_artifacts(str(tmp_path / "f"), "foreign")
    client = tracking._client(root)
    client.create_registered_model("foreign")
    client.create_model_version("foreign", f"{run.artifact_uri}/foreign", run_id=run.run_id)
    with pytest.raises(TuneryError, match="not a Tunery model"):
        Predictor("models:/foreign/1", device="cpu")


# --------------------------------------------------------------------------- the real server
def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(registry, tmp_path):
    """`mlflow models serve -m models:/m@champion --env-manager local` on 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(QUIET_ENV, MLFLOW_TRACKING_URI=tracking.tracking_uri(registry["root"]))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    port = free_port()
    proc = Proc(
        [
            *(str(BIN / "mlflow"), "models", "serve", "-m", "models:/m@champion"),
            *("--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"),
        ],
        tmp_path / "serve.log",
        env,
        cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{url}/ping"), proc, "mlflow models serve", timeout=120)
        status, body = _post(
            f"{url}/invocations", json.dumps({"dataframe_records": [{"text": TEXTS[0]}]}).encode()
        )
        assert status == 200, body
        [pred] = body["predictions"]
        assert set(pred) == {"label", "score", "probabilities"}
        assert abs(sum(pred["probabilities"].values()) - 1.0) < 1e-5
        for bad, reason in [
            ({"dataframe_records": [{"txt": "a"}]}, "missing inputs"),
            ({"dataframe_records": [{"text": ""}]}, "is empty"),
            ({"dataframe_records": [{"text": 3}]}, "must be text"),  # JSON: an object column
            ({"inputs": "a string"}, ""),
        ]:
            status, body = _post(f"{url}/invocations", json.dumps(bad).encode())
            assert status == 400 and reason in body.get("message", ""), (bad, status, body)
        status, _ = _post(f"{url}/invocations", b"{not json")
        assert status == 400
        assert http_ok(f"{url}/ping") and proc.alive()  # still serving
    finally:
        proc.stop()

    # `mlflow models predict` too, through the same pyfunc
    (tmp_path / "in.json").write_text(json.dumps({"dataframe_records": [{"text": TEXTS[1]}]}))
    subprocess.run(
        [
            *(str(BIN / "mlflow"), "models", "predict", "-m", "models:/m@champion"),
            *("-i", str(tmp_path / "in.json"), "-t", "json", "--env-manager", "local"),
            *("-o", str(tmp_path / "out.json")),
        ],
        env=env,
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=300,
    )
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["predictions"][0]["label"] in {"animal", "food", "tool"}
