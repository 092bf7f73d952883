"""Shared fixtures: a temporary project (params, DVC, MLflow store) and small data fixtures.

Tests never touch the network and never write into the real project: `project` copies the code
it needs into a temporary folder and points every state folder there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLASSES = {
    "animal": "a {} animal that lives in the {} and eats small {}",
    "tool": "a {} hand tool used for {} the {} of wood",
    "food": "a {} dish made from {} and served with {}",
}
WORDS = "red blue green large small quick quiet old young bright dark soft hard warm cold wild tame".split()


def make_rows(n_per_class: int, offset: int = 0) -> pd.DataFrame:
    """Distinct, class-separable texts: deterministic and tiny."""
    rows = []
    for label, pattern in CLASSES.items():
        for i in range(offset, offset + n_per_class):
            a, b, c = WORDS[i % len(WORDS)], WORDS[(i // len(WORDS)) % len(WORDS)], f"item{i}"
            rows.append({"text": pattern.format(a, b, c), "label": label})
    return pd.DataFrame(rows)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """Offline settings and state folders outside the real project, for every test."""
    state = tmp_path_factory.mktemp("state")
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(state / "dvc_site"),
        "ORT_DISABLE_TELEMETRY": "1",
        "PREFECT_HOME": str(state / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("TUNERY_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("TUNERY_TRACKING_JOURNAL", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


def small_params(source_path: str = "data/source") -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"]["experiment"] = "test"
    params["ingest"]["source"] = {
        "kind": "files",
        "path": source_path,
        "text_column": "text",
        "label_column": "label",
    }
    params["ingest"]["min_per_class"] = 5
    return params


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A temporary Tunery project: code, dvc.yaml, small params and a tiny CSV source; git + DVC initialised."""
    root = tmp_path / "proj"
    root.mkdir()
    for name in ("tunery", "tasks", "flows"):
        shutil.copytree(
            REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(small_params(), sort_keys=False))
    (root / "data" / "source").mkdir(parents=True)
    (root / "data" / "incoming").mkdir(parents=True)
    make_rows(40).to_csv(root / "data" / "source" / "train.csv", index=False)
    return root


def init_repo(root: Path) -> None:
    run = lambda *a: subprocess.run(a, cwd=root, check=True, capture_output=True)  # noqa: E731
    run("git", "init", "-q")
    run("git", "config", "user.email", "t@example.com")
    run("git", "config", "user.name", "t")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run(sys.executable, "-m", "dvc", "config", "core.analytics", "false")
    run(sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(root.parent / "remote"))
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")


def tool_env(root: Path) -> dict[str, str]:
    environ = dict(os.environ)
    environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environ["PATH"]])
    environ["PYTHONPATH"] = str(root)
    return environ
