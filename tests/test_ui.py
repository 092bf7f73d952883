"""`tunery ui`: the MLflow UI on the project's store; SIGTERM/SIGINT leave nothing running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.services import QUIET_ENV, free_port, http_ok

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~35 s: the UI server starts twice
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ui_stops_its_server_and_workers_on_a_signal(tmp_path, sig):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(QUIET_ENV, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunery.cli", "ui", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while not _up(port):
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "mlflow ui did not come up"
        time.sleep(0.3)
    family = psutil.Process(proc.pid).children(recursive=True)
    assert family, "the UI server runs as a child of tunery"
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == 0
    _, alive = psutil.wait_procs(family, timeout=15)
    assert not alive, [p.cmdline() for p in alive]
    assert not _up(port)


def _up(port: int) -> bool:
    try:
        return http_ok(f"http://127.0.0.1:{port}/health")
    except OSError:
        return False
