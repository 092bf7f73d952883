"""The ASGI app of the run's temporary Prefect server (flows/server.py), for uvicorn's `--factory`.

Prefect's own temporary server (SubprocessASGIServer) runs `prefect.server.api.server:create_app`
and passes `ephemeral` and `final` through its private PREFECT__SERVER_EPHEMERAL/FINAL variables;
this factory passes them as create_app's documented arguments instead: ephemeral (no UI, no
background services: the run's server only records the flow) and final (the last app this process
builds, so Prefect may skip copying its routes).
"""

from __future__ import annotations

from typing import Any


def create_app() -> Any:
    from prefect.server.api.server import create_app as prefect_app

    return prefect_app(ephemeral=True, final=True)
