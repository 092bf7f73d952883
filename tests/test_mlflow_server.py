"""The same Tunery code against a real `mlflow server` (MLFLOW_TRACKING_URI=http://...).

Two server setups, each started once per module and killed in teardown:

- `sqlite`: `mlflow server` on a sqlite file, artifacts proxied by the server (`--serve-artifacts`
  to a local `--artifacts-destination`). Needs nothing beyond the project's dependencies.
- `postgres-s3`: `mlflow server` on a throwaway PostgreSQL cluster (the `initdb`/`postgres`
  binaries, run as the `postgres` user when the tests run as root) with an S3-compatible artifact
  store (moto's server mode). One experiment's artifacts go through the server's proxy, the
  other's straight from the client to `s3://` with credentials taken from the environment.
  Skipped, with the reason, when the PostgreSQL binaries, psycopg2, moto or boto3 are missing.

Everything binds to 127.0.0.1 on free ports; nothing leaves the machine. The default run covers
the sqlite server and the registry/gate/promotion/lineage test (~25 s, most of it the server's
start); the PostgreSQL + S3 setup and the registry-only predictor (it exports a model first) are
marked `slow`: `pytest -m slow tests/test_mlflow_server.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.services import (
    BIN,
    BUCKET,
    QUIET_ENV,
    S3_ENV,
    Proc,
    free_port,
    http_ok,
    postgres_server,
    s3_keys,
    s3_server,
    wait_until,
)
from tests.test_registry import stage_deployable
from tunery import mlflow_model, tracking
from tunery.config import load_params
from tunery.registry import promotion, registration
from tunery.registry.refs import Registry
from tunery.runner import steps as pipeline

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the MLflow server
@pytest.fixture(
    scope="module",
    params=["sqlite", pytest.param("postgres-s3", marks=pytest.mark.slow)],
)
def server(request, tmp_path_factory) -> Iterator[dict]:
    """A running `mlflow server`; yields its URI and what a client needs to reach its artifacts."""
    work = tmp_path_factory.mktemp(f"mlflow-server-{request.param}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(QUIET_ENV)
    client_env: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            backend = f"sqlite:///{work / 'server.db'}"
            artifacts = str(work / "artifacts")
            endpoint = None
        else:
            backend = stack.enter_context(postgres_server())
            endpoint = stack.enter_context(s3_server(work))
            artifacts = f"s3://{BUCKET}/proxied"
            # The server's own credentials: environment only, never in params or the URI.
            env.update(S3_ENV, MLFLOW_S3_ENDPOINT_URL=endpoint)
            client_env = {**S3_ENV, "MLFLOW_S3_ENDPOINT_URL": endpoint}  # for direct s3:// runs
        port = free_port()
        proc = Proc(
            [
                str(BIN / "mlflow"),
                "server",
                *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
                *("--backend-store-uri", backend),
                *("--serve-artifacts", "--artifacts-destination", artifacts),
            ],
            work / "server.log",
            env,
            cwd=work,
        )
        stack.callback(proc.stop)
        uri = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        wait_until(lambda: http_ok(f"{uri}/health"), proc, "mlflow server")
        print(f"mlflow server ({request.param}) up in {time.monotonic() - started:.1f} s")
        yield {
            "backend": request.param,
            "uri": uri,
            "s3": endpoint,
            "client_env": client_env,
            "proc": proc,
        }


@pytest.fixture
def use_server(server, monkeypatch):
    """This test's Tunery code talks to the server: only MLFLOW_TRACKING_URI (+ S3 credentials)."""
    if not server["proc"].alive():
        pytest.fail(f"the mlflow server died:\n{server['proc'].tail()}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server["uri"])
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    # a dead server fails the test in seconds, not after MLflow's ~4 minutes of retries
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    for key, value in {**QUIET_ENV, **server["client_env"]}.items():
        monkeypatch.setenv(key, value)
    yield server
    if not server["proc"].alive():
        pytest.fail(f"the mlflow server died during the test:\n{server['proc'].tail()}")


# --------------------------------------------------------------------------- a project
def make_project(tmp_path: Path, experiment: str, model: str) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"]["experiment"] = experiment
    params["registry"].update(model_name=model, min_delta=0.01)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.yaml").write_text("stages: {}\n")
    return root


def scores(f1: float, version: str | None = None, model: str = "m") -> dict:
    out = {"macro_f1": f1, "per_class_f1": {"a": f1, "b": f1}}
    if version is not None:  # what `evaluate` records when it compared against the registry
        out["path"] = f"models:/{model}/{version}"
    return out


DATA_MD5 = "0123456789abcdef0123456789abcdef"


def pipeline_register(root: Path, params, tag: str, *, challenger, champion) -> dict:
    """One pipeline run's tail, as `flows.pipeline` does it: lineage, then register and gate."""
    stage_deployable(root, tag, challenger=challenger, champion=champion)
    with tracking.pipeline_run(root, params.tracking.experiment) as run:
        pipeline.log_lineage(root, run, "data/raw/labelled.parquet")
        return registration.register_and_gate(root, params, run)


# --------------------------------------------------------------------------- tests
def test_registry_gate_promotion_and_lineage_through_the_server(use_server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    root = make_project(tmp_path, "srv", "m")
    params = load_params(root / "params.yaml")
    (root / "dvc.lock").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "ingest": {"outs": [{"path": "data/raw/labelled.parquet", "md5": DATA_MD5}]}
                }
            }
        )
    )
    git = lambda *a: subprocess.run(["git", *a], cwd=root, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    git(
        "-c",
        "user.email=t@example.com",
        "-c",
        "user.name=t",
        "commit",
        "-q",
        "--allow-empty",
        "-m",
        "x",
    )
    commit = git("rev-parse", "HEAD").stdout.decode().strip()

    direct_s3 = use_server["s3"] is not None
    if direct_s3:
        # This experiment's artifacts go from the client straight to S3 (no proxy): the client
        # needs the S3 endpoint and credentials, from its environment.
        MlflowClient(use_server["uri"]).create_experiment(
            "srv", artifact_location=f"s3://{BUCKET}/direct"
        )

    # 1. first model: registered as challenger, promoted over the floor
    first = pipeline_register(root, params, "one", challenger=scores(0.7), champion=None)
    assert first["registered"] and first["promoted"], first
    v1 = first["version"]
    # unchanged model: nothing registered (the sha256 lookup works through the server)
    again = pipeline_register(root, params, "one", challenger=scores(0.7), champion=None)
    assert again == {**again, "registered": False, "version": v1}
    # 2. a worse challenger is refused; 3. one with a missing metric too
    worse = pipeline_register(
        root, params, "two", challenger=scores(0.65), champion=scores(0.7, v1)
    )
    assert worse["registered"] and not worse["promoted"] and "min_delta" in worse["reason"]
    missing = pipeline_register(
        root, params, "three", challenger={"per_class_f1": {}}, champion=scores(0.7, v1)
    )
    assert missing["registered"] and not missing["promoted"] and "missing" in missing["reason"]
    # 4. a better one is promoted
    better = pipeline_register(
        root, params, "four", challenger=scores(0.8), champion=scores(0.7, v1)
    )
    assert better["promoted"], better
    v2, v3, v4 = worse["version"], missing["version"], better["version"]
    assert len({v1, v2, v3, v4}) == 4
    assert tracking.alias_version(root, "m", promotion.CHAMPION) == v4
    assert tracking.alias_version(root, "m", promotion.CHALLENGER) == v4
    assert tracking.version_info(root, "m", v2)["tags"]["gate.decision"] == "rejected"

    # a challenger evaluated against a champion that has moved since is not promoted
    stale = pipeline_register(
        root, params, "five", challenger=scores(0.9), champion=scores(0.7, v1)
    )
    assert not stale["promoted"] and "moved from version" in stale["reason"]
    assert tracking.alias_version(root, "m", promotion.CHAMPION) == v4

    # manual promotion and rollback, recorded in the promotion log on the server
    promotion.promote(
        Registry.of(params, root), v2, "hotfix for class b", force=True
    )  # the gate rejected v2
    assert tracking.alias_version(root, "m", promotion.CHAMPION) == v2
    back = promotion.rollback(Registry.of(params, root), "v2 misbehaves")
    assert (back["from"], back["to"]) == (v2, v4)
    assert tracking.alias_version(root, "m", promotion.CHAMPION) == v4
    log = tracking.decisions(root, "srv", "m")
    assert [e["action"] for e in log] == ["gate"] * 5 + ["manual_promote", "rollback"]
    assert log[5]["reason"] == "hotfix for class b" and log[6]["to"] == v4
    assert tracking.version_info(root, "m", v2)["tags"]["promotion.rolled_back"] == "v2 misbehaves"
    listed = {v["version"]: v["aliases"] for v in tracking.list_versions(root, "m")}
    assert listed[v4] == ["champion"] and listed[stale["version"]] == ["challenger"]

    # `tunery models` reads the same registry
    from tunery.cli import main

    monkeypatch.chdir(root)
    with pytest.raises(SystemExit) as done:
        main(["models"])
    assert done.value.code == 0

    # lineage: from the version to its run, the data version, params and code
    info = tracking.version_info(root, "m", v1)
    assert info["tags"]["data_version"] == DATA_MD5 and info["tags"]["git.commit"] == commit
    client = MlflowClient(use_server["uri"])
    run = client.get_run(info["run_id"])
    assert run.info.run_id == info["tags"]["pipeline_run_id"]
    assert run.data.tags["data_version"] == DATA_MD5 and run.data.tags["git.commit"] == commit
    [ds] = run.inputs.dataset_inputs
    assert ds.dataset.digest == DATA_MD5
    got = Path(
        client.download_artifacts(info["run_id"], "lineage/dvc.lock", str(tmp_path / "lineage"))
    )
    assert got.read_text() == (root / "dvc.lock").read_text()

    # the registered model comes back whole from the server's artifact store
    dl = tracking.download_model(root, "models:/m@champion", tmp_path / "dl")
    assert "MLmodel" in {p.name for p in dl.iterdir()}  # a pyfunc, the ONNX folder inside it
    deploy = mlflow_model.deploy_folder(dl, "models:/m@champion")
    assert {"model.onnx", "labels.json", "tunery_model.json"} <= {p.name for p in deploy.iterdir()}
    assert json.loads((deploy / "tunery_model.json").read_text())["variant"] == "four"

    # the artifacts are in the server's store, and nothing landed in the project
    expected_scheme = "s3://" if direct_s3 else "mlflow-artifacts:"
    # the version's source is the deployable LoggedModel; its files are in the server's store
    assert info["source"].startswith("models:/m-")
    location = client.get_logged_model(info["source"].removeprefix("models:/")).artifact_location
    assert run.info.artifact_uri.startswith(expected_scheme) and location.startswith(
        expected_scheme
    )
    assert not (root / tracking.DB_FILE).exists() and not (root / tracking.ARTIFACT_DIR).exists()
    if direct_s3:
        keys = s3_keys(use_server["s3"], "direct/")
        assert any(k.endswith("/deploy/model.onnx") for k in keys), keys


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A real deployable model folder (tiny encoder, fine-tuned, exported)."""
    from tasks import export
    from tests.test_export import make_data_dir, make_finetune_dir
    from tunery.config import ExportConfig

    root = tmp_path_factory.mktemp("server-export")
    ft, data = make_finetune_dir(root), make_data_dir(root)
    export.run(ExportConfig(), finetune_dir=ft, data_dir=data, out_dir=root / "deploy")
    return root / "deploy"


@pytest.mark.slow
def test_registry_only_predictor_through_the_server(use_server, exported, tmp_path, monkeypatch):
    import numpy as np

    from tunery.onnx.runtime import Predictor

    root = make_project(tmp_path, "srv-predict", "clf")
    with tracking.stage_run(root, "srv-predict", "register", {}) as run:
        version = mlflow_model.register_deployable(run, exported, "clf")
        artifact_uri = run.artifact_uri
    tracking.set_alias(root, "clf", promotion.CHAMPION, version)
    assert artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server in both setups

    monkeypatch.chdir(root)  # the project whose cache the registry copy goes into
    texts = ["a small red animal that lives in the wild", "a hard hand tool", "a warm dish"]
    local = Predictor(exported, device="cpu").predict(texts)
    remote = Predictor("models:/clf@champion", device="cpu")
    got = remote.predict(texts)
    assert got.labels == local.labels
    np.testing.assert_allclose(got.probabilities, local.probabilities, atol=1e-6)
    assert remote.metadata["model_version"] == version
    assert remote.metadata["registered_model"] == "clf"
    # the local copy is cached per store: another store's version 1 is another model
    assert remote.model_dir.name == f"clf-v{version}-{tracking.store_id(root)}"
    assert not (root / tracking.DB_FILE).exists()
    if use_server["s3"] is not None:  # the proxied artifacts really are in S3
        keys = s3_keys(use_server["s3"], "proxied/")
        assert any(k.endswith("/deploy/model.onnx") for k in keys), keys
