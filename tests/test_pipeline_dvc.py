"""`dvc repro` of ingest + prepare in a temporary repo: stages run, skip, and re-run as DVC decides."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import init_repo, make_rows, tool_env
from tunery import tracking
from tunery.errors import EXIT_INPUT


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
    # the stages end through tunery/stage.py's fast exit: their last lines are not lost
    assert "ingest done in" in out and "prepare done in" in out

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
    assert result.returncode == EXIT_INPUT
    assert "bad.csv: row 3: [null_label]" in result.stderr
    assert list((project / "data" / "incoming").iterdir()) == []


def _worker_project(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True
    )
    script = (
        "import os, pathlib, sys; print('stage says', os.environ.get('TUNERY_X'), flush=True); "
        "sys.exit(3) if pathlib.Path('fail').exists() else pathlib.Path('out.txt').write_text('x')"
    )
    stage = {"cmd": f'{sys.executable} -c "{script}"', "deps": ["in.txt"], "outs": ["out.txt"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": stage}}))
    (tmp_path / "in.txt").write_text("1")
    return tmp_path


def test_dvc_worker_runs_dvc_streams_output_and_survives_failures(tmp_path, monkeypatch):
    import os

    from tunery.runner import steps as pipeline

    root = _worker_project(tmp_path)
    monkeypatch.delenv("TUNERY_X", raising=False)
    with pipeline.dvc_worker(root) as worker:
        lines = []
        out = pipeline.dvc_command(
            root, "repro", "s", on_line=lines.append, extra_env={"TUNERY_X": "42"}
        )
        # the stage's own output comes back, in order with DVC's, and saw the extra variable
        assert "Running stage 's'" in out and "stage says 42\n" in lines
        assert out.index("Running stage 's'") < out.index("stage says 42")
        assert (root / "out.txt").read_text() == "x" and (root / "dvc.lock").is_file()
        assert not pipeline.repro_stage(root, "s")  # up to date: DVC skips it
        # a failing stage: the error, and the same worker serves the next command
        (root / "fail").write_text("")
        (root / "in.txt").write_text("2")
        with pytest.raises(pipeline.StageFailed, match="failed"):
            pipeline.dvc_command(root, "repro", "s", on_line=lambda line: None)
        (root / "fail").unlink()
        assert pipeline.repro_stage(root, "s", on_line=lambda line: None)
        # the extra variable was for that command only
        out = pipeline.dvc_command(root, "repro", "--force", "s", on_line=lambda line: None)
        assert "stage says None" in out
        assert worker.proc.poll() is None
    assert worker.proc.poll() is not None  # stopped at the end of the block
    assert os.environ.get("TUNERY_X") is None


def test_dvc_worker_is_stopped_with_its_stage_when_the_caller_gives_up(tmp_path):
    from tunery.runner import steps as pipeline

    root = _worker_project(tmp_path)
    stage = {
        "cmd": f"{sys.executable} -c \"print('started', flush=True); import time; time.sleep(60)\"",
        "outs": ["never.txt"],
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"slow": stage}}))

    class GiveUp(Exception):
        pass

    def on_line(line):
        if line.startswith("started"):
            raise GiveUp  # as a task timeout or Ctrl-C would, while the stage runs

    worker = pipeline.start_dvc_worker(root)
    with pytest.raises(GiveUp):
        pipeline.dvc_command(root, "repro", "slow", on_line=on_line)
    assert worker.proc.poll() is not None
    leftover = subprocess.run(["pgrep", "-f", "time.sleep\\(60\\)"], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""
    # the next command starts a fresh worker
    assert pipeline.start_dvc_worker(root) is not worker
    pipeline.start_dvc_worker(root).close()


def test_init_creates_the_stores_and_run_stops_its_prefect_server(project):
    import re

    import psutil

    from tunery import ui

    init_repo(project)
    result = tunery(project, "init")
    assert "MLflow store ready" in result.stdout and "Prefect database ready" in result.stdout
    home = Path(tool_env(project)["PREFECT_HOME"])
    assert (home / "prefect.db").is_file() and (project / "mlflow.db").is_file()
    assert tunery(project, "init").returncode == 0  # idempotent
    result = tunery(project, "run", "ingest")
    assert "stages run: ingest" in result.stdout
    # The printed link opens where `tunery ui` serves this database (the temporary server's UI
    # is off), and the temporary server this run launched (flows/server.py) is gone afterwards.
    link = re.search(r"View at (\S+)", result.stdout + result.stderr).group(1)
    assert link.startswith(f"{ui.prefect_ui_url()}/runs/flow-run/"), link
    left = [p.cmdline() for p in psutil.process_iter() if _cwd(p) == project.resolve()]
    assert not left, left


def _cwd(proc):
    import psutil

    try:
        return Path(proc.cwd())
    except (psutil.Error, OSError):
        return None


def test_a_taken_in_file_can_be_withdrawn_and_is_recorded(project):
    init_repo(project)
    make_rows(8, offset=300).to_csv(project / "week.csv", index=False)
    tunery(project, "data", "add", "week.csv")
    dvc(project, "repro", "ingest")
    with_it = json.loads((project / "metrics" / "ingest.json").read_text())["data_version"]
    missing = tunery(project, "data", "withdraw", "nope.csv", "--reason", "x", check=False)
    assert missing.returncode != 0 and "week.csv" in missing.stderr  # lists what is there
    out = tunery(project, "data", "withdraw", "week.csv", "--reason", "labels were garbage")
    assert with_it in out.stdout
    assert not (project / "data" / "incoming" / "week.csv").exists()
    assert not (project / "data" / "incoming" / "week.csv.dvc").exists()
    record = json.loads((project / "data" / "withdrawn.jsonl").read_text().splitlines()[-1])
    assert record["in_data_version"] == with_it and record["rows"] == 24
    dvc(project, "repro", "ingest")
    without = json.loads((project / "metrics" / "ingest.json").read_text())
    assert without["data_version"] != with_it and without["incoming_files"] == 0
