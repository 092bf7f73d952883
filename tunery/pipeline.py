"""Pipeline steps shared by `tunery run` and the Prefect flows: no Prefect import here.

DVC stays the DAG: stages are brought up to date one by one, in `dvc.yaml` order, with
`dvc repro --single-item`, so DVC alone decides what is stale. This module adds what DVC does not
do: the lineage on the MLflow parent run, and the registry step after the stages.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tunery.errors import TuneryError

log = logging.getLogger("tunery.pipeline")


def stage_names(root: Path) -> list[str]:
    """The stages of `dvc.yaml`, in the order written there (a valid run order)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text()).get("stages") or {}
    return list(stages)


def tool_env() -> dict[str, str]:
    """This environment with the venv's bin first, so `dvc` and the stages run our `python`."""
    environ = dict(os.environ)
    environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environ.get("PATH", "")])
    return environ


class StageFailed(TuneryError):
    """A stage (or DVC) failed. `user_error` is set when the stage reported bad input or params:
    re-running cannot help, so the flow does not retry it."""

    def __init__(self, message: str, *, user_error: bool) -> None:
        super().__init__(message)
        self.user_error = user_error


def dvc_command(root: Path, *argv: str, on_line: Callable[[str], None] | None = None) -> str:
    """Run `dvc ARGV...` in the project, streaming its output line by line; raise on failure."""
    exe = shutil.which("dvc", path=tool_env()["PATH"])
    if exe is None:
        raise TuneryError("`dvc` is not installed in this environment; run `make setup`")
    proc = subprocess.Popen(
        [exe, *argv],
        cwd=root,
        env=tool_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        (on_line or (lambda text: print(text, end="", flush=True)))(line)
    if proc.wait() != 0:
        tail = "".join(lines[-15:])
        # Stages print "tunery <stage>: error: ..." for bad input or params (tunery/stage.py).
        user_error = any(line.startswith("tunery ") and ": error: " in line for line in lines)
        raise StageFailed(
            f"`dvc {' '.join(argv)}` failed (exit {proc.returncode}):\n{tail}",
            user_error=user_error,
        )
    return "".join(lines)


def repro_stage(
    root: Path, stage: str, *, force: bool = False, on_line: Callable[[str], None] | None = None
) -> bool:
    """Bring one stage up to date; return whether it actually ran."""
    out = dvc_command(
        root, "repro", "--single-item", *(["--force"] if force else []), stage, on_line=on_line
    )
    return f"Running stage '{stage}'" in out


def git_state(root: Path) -> dict[str, str]:
    def git(*argv: str) -> str:
        try:
            return subprocess.run(
                ["git", *argv], cwd=root, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "HEAD")
    return {"git.commit": commit or "unknown", "git.dirty": str(bool(git("status", "--porcelain")))}


def data_version(root: Path, labelled_path: str) -> str | None:
    """The md5 DVC recorded for the raw dataset in `dvc.lock` (None before the first ingest)."""
    lock_file = root / "dvc.lock"
    if not lock_file.is_file():
        return None
    stages = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {})
    for out in stages.get("ingest", {}).get("outs", []):
        if out.get("path") == labelled_path:
            return out.get("md5")
    return None


def log_lineage(root: Path, run: Any, labelled_path: str) -> dict[str, Any]:
    """params.yaml, dvc.lock, the git commit and the data version, on the pipeline's parent run."""
    tags = git_state(root)
    version = data_version(root, labelled_path)
    if version:
        tags["data_version"] = version
        rows = None
        metrics_file = root / "metrics" / "ingest.json"
        if metrics_file.is_file():
            rows = json.loads(metrics_file.read_text()).get("rows")
        run.log_dataset(
            name="raw",
            digest=version,
            source=labelled_path,
            context="training",
            profile={"rows": rows},
        )
    run.set_tags(tags)
    for name in ("params.yaml", "dvc.yaml", "dvc.lock"):
        if (root / name).is_file():
            run.log_artifact(root / name, "lineage")
    return tags
