"""`tunery ui`: the MLflow UI and the Prefect UI on this project's own stores, on 127.0.0.1.

The MLflow UI reads the project's tracking database (`mlflow.db`, its artifacts beside it); the
Prefect UI is `prefect server start` on the project's Prefect database (`PREFECT_HOME`, which
`tunery/env.py` points into the project), the same database the temporary server of every
`tunery run` writes its flow runs into. Its scheduler and late-run services are off: this
server only shows what happened; `tunery schedule` or a work pool run the schedules.

While `tunery ui` runs, its Prefect server is recorded in `PREFECT_HOME/tunery-ui.json`, and a
`tunery run` started meanwhile sends its flow run there (`running_prefect_api`) instead of
starting a second server on the same SQLite file: the run then shows up live in the UI. The link
every run prints ("View at ...") is `PREFECT_UI_URL`, which the run's temporary server sets to
this module's default address (flows/server.py), so it opens once `tunery ui` is started.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from tunery.io import write_json

HOST = "127.0.0.1"
MLFLOW_PORT = 5000
PREFECT_PORT = 4200
MARKER = "tunery-ui.json"
HEALTH_TIMEOUT_S = 1.0


def prefect_ui_url(host: str = HOST, port: int = PREFECT_PORT) -> str:
    return f"http://{host}:{port}"


def flow_run_url(flow_run_id: str) -> str:
    """Where the Prefect UI shows a flow run (`PREFECT_UI_URL`, the `tunery ui` default)."""
    base = os.environ.get("PREFECT_UI_URL") or prefect_ui_url()
    return f"{base.rstrip('/')}/runs/flow-run/{flow_run_id}"


def mlflow_command(uri: str, artifacts: Path, host: str, port: int) -> tuple[str, list[str]]:
    return "mlflow", [
        "ui",
        "--backend-store-uri",
        uri,
        "--default-artifact-root",
        str(artifacts),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",  # one person's browser: MLflow's default of 4 costs ~1 GB on a small box
        "1",
    ]


def prefect_command(host: str, port: int) -> tuple[str, list[str]]:
    return "prefect", [
        "server",
        "start",
        "--host",
        host,
        "--port",
        str(port),
        "--analytics-off",
        "--no-scheduler",  # it shows runs; schedules belong to `tunery schedule` / a work pool
        "--no-late-runs",
    ]


def prefect_env(environ: dict[str, str], host: str, port: int) -> dict[str, str]:
    """The Prefect server's environment: its own address, not a run's API URL, the UI on."""
    env = {k: v for k, v in environ.items() if k not in {"PREFECT_API_URL", "PREFECT_UI_URL"}}
    env.update(
        PREFECT_SERVER_UI_ENABLED="true",
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
    )
    return env


def _marker() -> Path | None:
    home = os.environ.get("PREFECT_HOME")
    return Path(home) / MARKER if home else None


@contextlib.contextmanager
def recorded(host: str, port: int) -> Iterator[None]:
    """Record this process's Prefect UI server for runs to find; forget it afterwards."""
    marker = _marker()
    if marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_json(marker, {"api_url": f"http://{host}:{port}/api", "pid": os.getpid()})
    try:
        yield
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)


def running_prefect_api() -> str | None:
    """The API URL of this project's `tunery ui` Prefect server when it is up and answers;
    None otherwise (a stale record of a killed `tunery ui` included)."""
    marker = _marker()
    try:
        record = json.loads(marker.read_text()) if marker is not None else None
        os.kill(int(record["pid"]), 0)
    except (OSError, TypeError, ValueError, KeyError):
        return None
    import httpx

    try:
        response = httpx.get(f"{record['api_url']}/health", timeout=HEALTH_TIMEOUT_S)
    except httpx.HTTPError:
        return None
    return record["api_url"] if response.status_code == 200 else None
