"""Prefect's temporary API server, started early and cheaply. Importing this module imports
nothing from prefect.

Without PREFECT_API_URL, Prefect starts a temporary server when the first flow runs
(`prefect.server.api.server.SubprocessASGIServer`): the flow waits for it, and the caller process
first imports `prefect.server` (FastAPI, SQLAlchemy, every server model) only to launch it. On
2 cores that put ~13 s of start-up before the first stage (measured; the flow itself then spends
~2.5 s on nine stages). `start_temporary_server` launches the same server process (uvicorn on
Prefect's app, ephemeral, as SubprocessASGIServer runs it; flows/server_app.py) without that
import, so it starts while the caller imports MLflow and opens its store, and points
PREFECT_API_URL at it for this process only. Measured on the same machine: the first flow starts 7.7 s after the process instead of 14.1.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tunery import orphans, ui
from tunery.env import restored
from tunery.errors import TuneryError


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TemporaryServer:
    """The temporary server process; `wait()` blocks until it answers, `stop()` ends it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._launch()
        atexit.register(self.stop)  # registered before prefect's own exit handlers: runs after
        # them, so the flow's last logs still reach the server

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _launch(self) -> None:
        spec = importlib.util.find_spec("prefect")
        if spec is None or spec.origin is None:
            raise TuneryError("prefect is not installed in this environment; run `make setup`")
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tunery.orphans",  # ends with `tunery`, even after a SIGKILL
                "uvicorn",
                "--app-dir",
                str(Path(spec.origin).parent.parent),
                "--factory",
                "flows.server_app:create_app",  # Prefect's app, ephemeral, by public arguments
                "--host",
                "127.0.0.1",  # localhost only
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env={**orphans.child_env(), "PREFECT_UI_ENABLED": "0"},
        )
        os.environ["PREFECT_API_URL"] = self.api_url
        # Its UI is off; the run's "View at" link opens where `tunery ui` serves this database.
        os.environ.setdefault("PREFECT_UI_URL", ui.prefect_ui_url())

    def wait(self, timeout: float | None = None) -> None:
        import httpx

        timeout = timeout or float(
            os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            code = self.proc.poll()
            if code == 3:  # uvicorn could not bind: the port was taken meanwhile
                self._launch()
                continue
            if code is not None:
                raise TuneryError(
                    f"Prefect's temporary server exited with code {code} while starting; "
                    "its messages are above. Set PREFECT_API_URL to use a running server instead."
                )
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise TuneryError(
            f"Prefect's temporary server did not answer within {timeout:.0f} s "
            "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)"
        )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_temporary_server() -> TemporaryServer | None:
    """Launch the temporary server now, before anything imports prefect (Prefect reads
    PREFECT_API_URL when it first needs a client); None when PREFECT_API_URL names a server,
    or when `tunery ui` serves this project's Prefect database (the run then goes there, live in
    its UI, instead of a second server writing the same SQLite file)."""
    if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return None  # a server is named, or prefect is set up already (and starts its own)
    api_url = ui.running_prefect_api()
    if api_url is not None:
        os.environ["PREFECT_API_URL"] = api_url
        os.environ.setdefault("PREFECT_UI_URL", api_url.removesuffix("/api"))
        return None
    return TemporaryServer()


def init_server_database() -> str | None:
    """Create (or upgrade) the temporary server's database in PREFECT_HOME and register Prefect's
    block types, by starting the server once: both take ~6 s on a fresh database (2 cores), paid
    here at set-up instead of in the first run. Return PREFECT_HOME, or None when PREFECT_API_URL
    names a server (it has its own database)."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    with restored(["PREFECT_API_URL", "PREFECT_UI_URL"]):  # set for the server's lifetime only
        server = TemporaryServer()
        try:
            server.wait()
        finally:
            server.stop()
    from prefect.settings import get_current_settings

    return str(get_current_settings().home)
