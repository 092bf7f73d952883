"""Offline, self-contained process settings, applied by the project itself.

`configure()` is called by the CLI and by every stage entry point (never at import time). It only
sets variables the user has not set, so an explicit `MLFLOW_TRACKING_URI` or `PREFECT_API_URL`
still wins; so does one from the project's store profile (`.env`, tunery/profile.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

MARKERS = ("params.yaml", "dvc.yaml")


def find_root(start: Path | None = None) -> Path:
    """The project root: the nearest folder (from `start` or the cwd upwards) with params.yaml and dvc.yaml."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if all((folder / m).is_file() for m in MARKERS):
            return folder
    return here


def _dvc_dir(root: Path) -> Path:
    """The `.dvc` folder of the DVC repository `root` belongs to (`root/.dvc` when none yet)."""
    for folder in (root, *root.parents):
        if (folder / ".dvc").is_dir():
            return folder / ".dvc"
    return root / ".dvc"


def project_defaults(root: Path) -> dict[str, str]:
    """The variables that keep every tool offline and its state inside the project."""
    return {
        # No model or data hub at run time: models and data come from local paths or packages.
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(root / ".cache" / "huggingface"),
        # Prefect: its own temporary server on sqlite, state in the project, no telemetry.
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # MLflow: otherwise `import mlflow` writes a telemetry id into the home folder.
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        # DVC: no analytics/updater daemons, site cache inside the project instead of /var/tmp/dvc.
        "DVC_NO_ANALYTICS": "1",
        # The DVC repository's own .dvc (a pipeline folder such as vision/ sits inside it): a
        # .dvc folder made in the pipeline folder would turn it into a DVC sub-repository.
        "DVC_SITE_CACHE_DIR": str(_dvc_dir(root) / "site_cache"),
        # onnxruntime writes a device id under the home folder otherwise.
        "ORT_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def configure(root: Path | None = None) -> Path:
    """Apply the store profile (`.env`, see tunery/profile.py) and `project_defaults` to this
    process (and so its children); return the project root."""
    from tunery import profile

    root = find_root(root)
    profile.apply(root)
    for key, value in project_defaults(root).items():
        os.environ.setdefault(key, value)
    return root


@contextlib.contextmanager
def restored(keys: Iterable[str], updates: Mapping[str, str] | None = None) -> Iterator[None]:
    """Set `updates` in this process's environment for the block; afterwards the variables in
    `keys` and `updates` are as they were before it (set, changed or removed inside or not)."""
    updates = dict(updates or {})
    saved = {key: os.environ.get(key) for key in {*keys, *updates}}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
