"""The store profile (tunery/profile.py): one environment file switches Prefect, MLflow and the DVC
default remote; `tunery check` shows it and asks each store whether it answers; a store that does
not is a named error (the store and its URL), exit 1, and nothing is run or written.

Fast: refused ports on 127.0.0.1 (nothing listens), no servers. The stores themselves answering
are in the slow tests: the S3 remote here, all of them in tests/test_scale_out.py.
"""

from __future__ import annotations

import base64
import configparser
import http.server
import json
import os
import shutil
import threading
import types
from typing import ClassVar

import pytest

from tests.conftest import REPO
from tests.services import free_port
from tunery import cli, profile
from tunery.errors import EXIT_FAILED, EXIT_INPUT


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A DVC project folder as the cwd, and none of the profile's variables in the environment
    (restored afterwards: applying a profile writes os.environ)."""
    for key in (*profile.KEYS, "TUNERY_ENV_FILE"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text(
        "[core]\n    remote = local\n['remote \"local\"']\n    url = ../.dvc-storage\n"
    )
    source = tmp_path / "data" / "source"
    source.mkdir(parents=True)
    (source / "a.csv").write_text("text,label\nan animal,animal\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_main(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    return done.value.code


def check_argv(project) -> list[str]:
    return ["check", "--set", f"ingest.source.path={project / 'data' / 'source'}"]


def refused() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def test_example_file_documents_every_key_and_holds_no_secret():
    text = (REPO / profile.EXAMPLE_FILE).read_text()
    for key in profile.KEYS:
        assert key in text, key
    values = profile.read_env_file(REPO / profile.EXAMPLE_FILE)
    assert not any("SECRET" in k or "PASSWORD" in k for k in values)
    assert ".env" in (REPO / ".gitignore").read_text().split()


def test_env_file_parsing_and_precedence(project, monkeypatch):
    (project / ".env").write_text(
        "# the team's stores\n"
        "TUNERY_PROFILE=team\n"
        "export PREFECT_API_URL='http://prefect:4200/api'\n"
        'MLFLOW_TRACKING_URI="http://mlflow:5000"  # proxied artifacts\n'
        "\n"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://other:5000")  # the environment wins
    prof, added = profile.load(project)
    assert prof.name == "team" and prof.source == str(project / ".env")
    assert prof.values == {
        "PREFECT_API_URL": "http://prefect:4200/api",
        "MLFLOW_TRACKING_URI": "http://other:5000",
    }
    assert added == {"TUNERY_PROFILE": "team", "PREFECT_API_URL": "http://prefect:4200/api"}
    (project / ".env").write_text("PREFECT_API_URL http://x\n")
    with pytest.raises(Exception, match=r"\.env: line 1: \[env_syntax\]"):
        profile.load(project)
    assert run_main(check_argv(project)) == EXIT_INPUT


def test_no_file_is_the_embedded_profile(project, capsys):
    assert profile.load(project)[0] == profile.Profile("embedded", None, {})
    assert run_main(check_argv(project)) == 0
    out = capsys.readouterr().out
    assert "profile: embedded" in out and "prefect: embedded" in out


def test_the_dvc_remote_is_switched_in_config_local(project, monkeypatch):
    (project / ".env").write_text(
        "TUNERY_DVC_REMOTE=s3://bucket/dvc\nTUNERY_DVC_ENDPOINT=http://127.0.0.1:9000\n"
    )
    profile.apply(project)
    config = configparser.ConfigParser()
    config.read(project / ".dvc" / "config.local")
    assert config["core"]["remote"] == "profile"
    assert dict(config["'remote \"profile\"'"]) == {
        "url": "s3://bucket/dvc",
        "endpointurl": "http://127.0.0.1:9000",
    }
    before = (project / ".dvc" / "config.local").stat().st_mtime_ns
    profile.apply(project)  # unchanged: not rewritten
    assert (project / ".dvc" / "config.local").stat().st_mtime_ns == before
    assert "profile" not in (project / ".dvc" / "config").read_text()  # git's file untouched


@pytest.mark.parametrize(
    ("key", "store"),
    [
        ("PREFECT_API_URL", "Prefect server"),
        ("MLFLOW_TRACKING_URI", "MLflow tracking server"),
        ("MLFLOW_REGISTRY_URI", "MLflow registry"),
    ],
)
def test_a_refused_server_is_named_by_check(project, key, store, capsys):
    url = refused() + ("/api" if key == "PREFECT_API_URL" else "")
    (project / ".env").write_text(f"TUNERY_PROFILE=team\n{key}={url}\n")
    assert run_main([*check_argv(project), "--json"]) == EXIT_FAILED
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tunery: error: {store} at {url} does not answer")
    assert "refused" in err[0].lower() and "Traceback" not in captured.err
    assert json.loads(captured.out)["exit_code"] == EXIT_FAILED


def test_a_refused_s3_remote_is_named(project):
    endpoint = refused()
    (project / ".env").write_text(f"TUNERY_DVC_REMOTE=s3://b/p\nTUNERY_DVC_ENDPOINT={endpoint}\n")
    profile.apply(project)
    with pytest.raises(profile.StoreUnavailable) as err:
        profile.verify(project)
    assert err.value.store == "DVC remote (S3)" and err.value.url == f"s3://b/p via {endpoint}"


def test_run_with_a_store_down_runs_and_writes_nothing(project, monkeypatch, capsys):
    monkeypatch.setitem(
        __import__("sys").modules,
        "flows.pipeline",
        types.SimpleNamespace(pipeline_flow=lambda **kw: pytest.fail("ran")),
    )
    monkeypatch.setattr(cli, "_start_flow_services", lambda *a: pytest.fail("started"))
    url = refused()
    (project / ".env").write_text(f"MLFLOW_TRACKING_URI={url}\n")
    before = (project / "params.yaml").read_text()
    assert run_main(["run", "--set", "finetune.epochs=1"]) == EXIT_FAILED
    assert f"MLflow tracking server at {url} does not answer" in capsys.readouterr().err
    assert (project / "params.yaml").read_text() == before  # the override was not written


def test_a_password_in_a_url_is_never_shown():
    assert profile.shown("http://u:hunter2@h:5000/x") == "http://u:***@h:5000/x"
    err = profile.StoreUnavailable("MLflow", profile.shown("http://u:pw@h"), "refused")
    assert "pw" not in str(err)


def use_remote(project, url: str, endpoint: str) -> None:
    """A profile with this DVC remote, applied afresh (what the last one put in the environment
    would win over the file otherwise)."""
    for key in ("TUNERY_DVC_REMOTE", "TUNERY_DVC_ENDPOINT"):
        os.environ.pop(key, None)
    (project / ".env").write_text(f"TUNERY_DVC_REMOTE={url}\nTUNERY_DVC_ENDPOINT={endpoint}\n")
    profile.apply(project)


@pytest.mark.slow
def test_an_s3_remote_that_answers_and_one_that_refuses_the_credentials(project, monkeypatch):
    from tests.services import BUCKET, S3_ENV, s3_server

    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    # moto checks credentials after its first action (the test's create_bucket): these fake
    # keys are unknown to it from then on, as wrong keys are to a real store
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "1")
    with s3_server(project) as endpoint:
        use_remote(project, f"s3://{BUCKET}/dvc", endpoint)
        with pytest.raises(profile.StoreUnavailable, match="access denied: check the credentials"):
            profile.verify(project)
    monkeypatch.delenv("INITIAL_NO_AUTH_ACTION_COUNT")
    with s3_server(project) as endpoint:
        use_remote(project, f"s3://{BUCKET}/dvc", endpoint)
        assert profile.verify(project)["dvc_remote"] == f"s3://{BUCKET}/dvc answers"
        use_remote(project, "s3://no-such-bucket/dvc", endpoint)
        with pytest.raises(profile.StoreUnavailable, match="no bucket 'no-such-bucket'"):
            profile.verify(project)


# --------------------------------------------------------------------------- credentials
class _AuthHandler(http.server.BaseHTTPRequestHandler):
    """Answers /health (and /api/health) to anyone, everything else only to `expected`."""

    expected = ""  # the Authorization header that is let in
    seen: ClassVar[list[tuple[str, str | None]]] = []

    def do_GET(self):
        self.seen.append((self.path, self.headers.get("Authorization")))
        health = self.path in ("/health", "/api/health")
        ok = health or self.headers.get("Authorization") == self.expected
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}" if ok else b'{"error_code": "UNAUTHENTICATED"}')

    def log_message(self, *args):
        pass


@pytest.fixture
def auth_server():
    """A local HTTP server that wants credentials, as an MLflow (basic-auth app) or a Prefect
    server (PREFECT_SERVER_API_AUTH_STRING) does: health answers without them, reads do not."""
    handler = type("Handler", (_AuthHandler,), {"seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    ("key", "store", "good", "bad", "header", "named"),
    [
        (
            "MLFLOW_TRACKING_URI",
            "MLflow tracking server",
            {"MLFLOW_TRACKING_USERNAME": "ann", "MLFLOW_TRACKING_PASSWORD": "right"},
            {"MLFLOW_TRACKING_USERNAME": "ann", "MLFLOW_TRACKING_PASSWORD": "wrong"},
            basic("ann:right"),
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
        ),
        (
            "MLFLOW_REGISTRY_URI",
            "MLflow registry",
            {"MLFLOW_TRACKING_TOKEN": "t0ken"},
            {},
            "Bearer t0ken",
            "MLFLOW_TRACKING_TOKEN",
        ),
        (
            "PREFECT_API_URL",
            "Prefect server",
            {"PREFECT_API_AUTH_STRING": "admin:right"},
            {"PREFECT_API_AUTH_STRING": "admin:wrong"},
            basic("admin:right"),
            "PREFECT_API_AUTH_STRING",
        ),
    ],
)
def test_refused_credentials_are_named_at_start(
    project, auth_server, monkeypatch, capsys, key, store, good, bad, header, named
):
    base, handler = auth_server
    handler.expected = header
    url = base + ("/api" if key == "PREFECT_API_URL" else "")
    for var in {*good, *bad, "MLFLOW_TRACKING_TOKEN", "PREFECT_API_KEY"}:
        monkeypatch.delenv(var, raising=False)
    (project / ".env").write_text(f"{key}={url}\n")
    for var, value in bad.items():
        monkeypatch.setenv(var, value)
    assert run_main(check_argv(project)) == EXIT_FAILED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"tunery: error: {store} at {url} refused the credentials (HTTP 401)")
    assert named in err[0] and "nothing was run" in err[0]
    assert "wrong" not in err[0]  # a secret is never printed
    # health answered without credentials; the read that needs them was asked with them
    assert handler.seen[0] == (("/api" if key == "PREFECT_API_URL" else "") + "/health", None)
    for var, value in good.items():
        monkeypatch.setenv(var, value)
    assert run_main(check_argv(project)) == 0
    assert f"{url} answers" in capsys.readouterr().out
    assert handler.seen[-1][1] == header


def test_a_health_path_that_wants_credentials_is_not_a_refusal(project, auth_server):
    # /x/health is not this server's health path: it says 401, but that is a wrong URL (a
    # path prefix too many), not wrong credentials, and the error says which path answered what
    base, handler = auth_server
    handler.expected = "never"
    (project / ".env").write_text(f"MLFLOW_TRACKING_URI={base}/x\n")
    profile.apply(project)
    with pytest.raises(profile.StoreUnavailable, match=r"/health answered HTTP 401") as err:
        profile.verify(project)
    assert not isinstance(err.value, profile.CredentialsRefused)


@pytest.mark.slow
def test_a_prefect_server_with_an_auth_string_refuses_a_wrong_one(project, tmp_path, monkeypatch):
    from tests.services import prefect_server

    monkeypatch.delenv("PREFECT_API_KEY", raising=False)
    with prefect_server(tmp_path, PREFECT_SERVER_API_AUTH_STRING="admin:right") as (api, _):
        (project / ".env").write_text(f"PREFECT_API_URL={api}\n")
        profile.apply(project)
        for wrong in (None, "admin:wrong"):
            if wrong is None:
                monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
            else:
                monkeypatch.setenv("PREFECT_API_AUTH_STRING", wrong)
            with pytest.raises(profile.CredentialsRefused, match="PREFECT_API_AUTH_STRING"):
                profile.verify(project)
        monkeypatch.setenv("PREFECT_API_AUTH_STRING", "admin:right")
        assert profile.verify(project)["prefect"] == f"{api} answers"
