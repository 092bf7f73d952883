"""Starting Prefect's temporary server early. Importing this module imports nothing from prefect."""

from __future__ import annotations

import os
import threading


def prestart_server() -> threading.Thread | None:
    """Start Prefect's temporary API server in the background, so that its ~10 s start-up overlaps
    the caller's own preparation (importing mlflow, opening the store). The flow's client then finds
    the server already running: `SubprocessASGIServer()` is a per-port singleton and the client uses
    the one without a port. Nothing to do when PREFECT_API_URL names a server."""
    if os.environ.get("PREFECT_API_URL"):
        return None

    def start() -> None:
        try:
            from prefect.server.api.server import SubprocessASGIServer

            SubprocessASGIServer().start()
        except Exception:  # the flow starts its own server as usual
            pass

    thread = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    thread.start()
    return thread
