"""A stage that fails leaves the last good outputs, metrics and dvc.lock as they were."""

import hashlib

import pandas as pd
import yaml

from tests.conftest import init_repo
from tests.test_pipeline_dvc import dvc, lock


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_failed_stage_keeps_the_last_good_outputs(project):
    import subprocess
    import sys

    from tests.conftest import tool_env

    init_repo(project)
    dvc(project, "repro", "prepare")
    kept = [
        project / "data" / "raw" / "labelled.parquet",
        project / "data" / "prepared" / "train.parquet",
        project / "metrics" / "ingest.json",
        project / "metrics" / "prepare.json",
        project / "plots" / "prepare" / "lengths.png",
    ]
    before = {p: _digest(p) for p in kept}
    lock_before = lock(project)

    # A source file that breaks ingest (a null label): the stage fails under `dvc repro`.
    bad = pd.read_csv(project / "data" / "source" / "train.csv")
    bad.loc[3, "label"] = None
    bad.to_csv(project / "data" / "source" / "train.csv", index=False)
    failed = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "prepare"],
        cwd=project,
        env=tool_env(project),
        capture_output=True,
        text=True,
    )
    assert failed.returncode != 0 and "null_label" in failed.stdout + failed.stderr
    assert {p: _digest(p) for p in kept if p.exists()} == before, "an output was changed"
    assert all(p.exists() for p in kept), [str(p) for p in kept if not p.exists()]
    assert lock(project) == lock_before

    # Bad params (a string where a number goes) fail the same way and delete nothing.
    params = yaml.safe_load((project / "params.yaml").read_text())
    bad.loc[3, "label"] = bad.loc[4, "label"]
    bad.to_csv(project / "data" / "source" / "train.csv", index=False)
    dvc(project, "repro", "prepare")  # good again
    good = {p: _digest(p) for p in kept}
    params["prepare"]["fractions"]["val"] = "a tenth"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    failed = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "prepare"],
        cwd=project,
        env=tool_env(project),
        capture_output=True,
        text=True,
    )
    assert failed.returncode != 0
    assert {p: _digest(p) for p in kept} == good
