"""`dvc repro` of ingest + prepare in a temporary repo: stages run, skip, and re-run as DVC decides."""

import json
import subprocess
import sys

import pandas as pd
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import init_repo, make_rows, tool_env
from tunery import tracking


def dvc(root, *args):
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=root,
        env=tool_env(root),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def tunery(root, *args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "tunery.cli", *args],
        cwd=root,
        env=tool_env(root),
        capture_output=True,
        text=True,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def lock(root):
    return yaml.safe_load((root / "dvc.lock").read_text())


def test_repro_skip_rerun_and_data_versions(project):
    init_repo(project)
    # the data stages only: the model stages have their own tests
    out = dvc(project, "repro", "prepare")
    assert "Running stage 'ingest'" in out and "Running stage 'prepare'" in out

    # the data version logged to MLflow is the hash DVC records for the raw dataset
    ingest_metrics = json.loads((project / "metrics" / "ingest.json").read_text())
    outs = {o["path"]: o["md5"] for o in lock(project)["stages"]["ingest"]["outs"]}
    assert ingest_metrics["data_version"] == outs["data/raw/labelled.parquet"]
    splits_before = {
        n: pd.read_parquet(project / "data" / "prepared" / f"{n}.parquet")
        for n in ("train", "val", "test", "holdout")
    }

    # unchanged: nothing runs
    out = dvc(project, "repro", "prepare")
    assert "Running stage" not in out

    # a prepare param: only prepare re-runs
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["prepare"]["fractions"]["val"] = 0.2
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc(project, "repro", "prepare")
    assert "Running stage 'prepare'" in out and "Running stage 'ingest'" not in out
    params["prepare"]["fractions"]["val"] = 0.1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(project, "repro", "prepare")

    # new data through `tunery data add`: a new data version, existing examples keep their split
    new = make_rows(15, offset=100)
    new.to_csv(project / "new.csv", index=False)
    tunery(project, "data", "add", "new.csv", "--push")
    assert (project / "data" / "incoming" / "new.csv.dvc").exists()
    result = tunery(project, "run", "ingest", "prepare")
    assert "stages run: ingest, prepare" in result.stdout
    new_version = json.loads((project / "metrics" / "ingest.json").read_text())["data_version"]
    assert new_version != ingest_metrics["data_version"]
    after = {
        n: pd.read_parquet(project / "data" / "prepared" / f"{n}.parquet") for n in splits_before
    }
    for name, df in splits_before.items():
        assert set(df["text"]) <= set(after[name]["text"]), name
    assert set(after["holdout"]["text"]) == set(splits_before["holdout"]["text"])  # frozen
    assert len(pd.read_parquet(project / "data" / "raw" / "labelled.parquet")) == 120 + 45

    # the pipeline run is a parent with the stages as children
    client = MlflowClient(tracking.tracking_uri(project))
    exp = client.get_experiment_by_name("test")
    parents = client.search_runs(
        [exp.experiment_id], filter_string="tags.`tunery.stage` = 'pipeline'"
    )
    assert len(parents) == 1
    children = tracking.child_runs(project, "test", parents[0].info.run_id)
    assert [c["name"] for c in children] == ["ingest", "prepare"]

    # `dvc push` works against the local remote
    dvc(project, "push", "prepare")
    assert any((project.parent / "remote").rglob("*"))


def test_data_add_rejects_bad_file_and_adds_nothing(project):
    init_repo(project)
    bad = make_rows(5)
    bad.loc[2, "label"] = None
    bad.to_csv(project / "bad.csv", index=False)
    result = tunery(project, "data", "add", "bad.csv", check=False)
    assert result.returncode == 2
    assert "bad.csv: row 3: [null_label]" in result.stderr
    assert list((project / "data" / "incoming").iterdir()) == []
