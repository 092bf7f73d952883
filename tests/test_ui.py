"""`tunery ui`: the MLflow and Prefect UIs on the project's stores; SIGTERM/SIGINT leave nothing
running; a run started meanwhile finds its Prefect server, a stale record does not fool it."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.services import QUIET_ENV, free_port, http_ok
from tunery import orphans, ui

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~60 s: both servers start twice
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ui_serves_both_uis_and_stops_every_server_on_a_signal(tmp_path, sig):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    port, prefect_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(QUIET_ENV, PYTHONPATH=str(REPO))
    ports = ["--port", str(port), "--prefect-port", str(prefect_port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunery.cli", "ui", *ports],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 180
        while not (_up(port) and _up(prefect_port, "/api/health")):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the UIs did not come up"
            time.sleep(0.3)
        page = http_get(f"http://127.0.0.1:{prefect_port}/runs")
        assert "<html" in page.lower(), page[:300]  # the Prefect UI itself, not only its API
        marker = tmp_path / ".prefect" / ui.MARKER
        assert json.loads(marker.read_text())["api_url"] == f"http://127.0.0.1:{prefect_port}/api"
        family = psutil.Process(proc.pid).children(recursive=True)
        assert len(family) >= 2, "both servers run as children of tunery"
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
        _, alive = psutil.wait_procs(family, timeout=15)
        assert not alive, [p.cmdline() for p in alive]
        assert not _up(port) and not _up(prefect_port, "/api/health")
        assert not marker.exists(), "the record goes with the server"
    finally:  # a failed check above must not leave the servers running
        if proc.poll() is None:
            proc.terminate()  # tunery stops both process groups (checked above when it passes)
            proc.wait(timeout=60)


def test_run_groups_stops_every_group_when_one_ends(tmp_path):
    server = ("http.server", ["0", "--bind", "127.0.0.1"])  # serves until stopped
    quitter = ("json.tool", [str(tmp_path / "missing.json")])  # exits 2: no such file
    assert orphans.run_groups([server, quitter], cwd=str(tmp_path), env=dict(os.environ)) == 2
    # returning at all means the server was stopped, not waited for


def test_a_run_finds_the_ui_server_only_while_it_answers(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    assert ui.running_prefect_api() is None  # no record
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        with ui.recorded("127.0.0.1", port):
            assert ui.running_prefect_api() == f"http://127.0.0.1:{port}/api"
        assert ui.running_prefect_api() is None  # the record went with it
        with ui.recorded("127.0.0.1", free_port()):  # recorded, but nothing answers there
            assert ui.running_prefect_api() is None
    finally:
        server.shutdown()
    (tmp_path / ui.MARKER).write_text(json.dumps({"api_url": "http://x/api", "pid": 2**22 + 7}))
    assert ui.running_prefect_api() is None  # a killed `tunery ui`'s stale record


def test_a_run_sends_its_flow_run_to_the_ui_server(monkeypatch):
    from flows import server

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_UI_URL", raising=False)
    monkeypatch.setattr(server.ui, "running_prefect_api", lambda: "http://127.0.0.1:4321/api")
    monkeypatch.delitem(sys.modules, "prefect", raising=False)  # as before a flow is imported
    assert server.start_temporary_server() is None  # no second server on the same database
    assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:4321/api"
    assert ui.flow_run_url("abc") == "http://127.0.0.1:4321/runs/flow-run/abc"


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/api/health" else 404)
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args: object) -> None:
        pass


def _up(port: int, path: str = "/health") -> bool:
    try:
        return http_ok(f"http://127.0.0.1:{port}{path}")
    except OSError:
        return False


def http_get(url: str) -> str:
    import urllib.request

    request = urllib.request.Request(url, headers={"Accept": "text/html"})  # as a browser asks
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode("utf-8", "replace")
