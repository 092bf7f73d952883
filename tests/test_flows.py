"""The Prefect pipeline flow on a temporary project, with Prefect's test harness."""

import logging
import re
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from tests.conftest import init_repo, make_rows, small_params


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def flaky_project(project, fail_times: int):
    """Add a stage that fails `fail_times` times (a transient error), then succeeds."""
    dvc = yaml.safe_load((project / "dvc.yaml").read_text())
    keep = {k: v for k, v in dvc["stages"].items() if k in ("ingest", "prepare")}
    script = (
        "import pathlib,sys; c=pathlib.Path('count'); n=int(c.read_text()) if c.exists() else 0; "
        f"c.write_text(str(n+1)); sys.exit(1 if n < {fail_times} else 0) if n < {fail_times} else pathlib.Path('done.txt').write_text('ok')"
    )
    keep["flaky"] = {
        "cmd": f'{sys.executable} -c "{script}"',
        "deps": ["data/prepared"],
        "outs": ["done.txt"],
    }
    dvc["stages"] = keep
    (project / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))


def test_stages_run_in_dvc_order_then_skip(project, harness, monkeypatch):
    from flows.pipeline import pipeline_flow
    from tunery import tracking

    init_repo(project)
    monkeypatch.chdir(project)
    started = time.perf_counter()
    result = pipeline_flow(project=str(project), stages=["ingest", "prepare"])
    elapsed = time.perf_counter() - started
    assert [(r["stage"], r["ran"]) for r in result["stages"]] == [
        ("ingest", True),
        ("prepare", True),
    ]
    children = tracking.child_runs(project, "test", result["run_id"])
    assert [c["name"] for c in children] == ["ingest", "prepare"]
    # The stages ran without mlflow (streamed tracking): their journals were applied to the
    # child runs, metrics and params included, and then removed.
    assert all(c["status"] == "FINISHED" for c in children)
    assert children[0]["metrics"]["rows"] > 0 and "seconds" in children[0]["metrics"]
    from mlflow.tracking import MlflowClient

    params = MlflowClient().get_run(children[1]["run_id"]).data.params
    assert params["prepare.split_salt"] == small_params()["prepare"]["split_salt"]
    assert not list((project / ".cache" / "tunery" / "journal").glob("*.json*"))
    # The flow's own clock: it covers the stage processes it ran and no more than the call took
    # (a clock started late, a stage counted twice, or seconds of the wrong run would break it).
    t = result["timing"]
    assert t["stage_seconds"] == pytest.approx(
        sum(r["process"] for r in result["stages"]), abs=0.02
    )
    assert t["stage_seconds"] <= t["wall_seconds"] <= elapsed + 0.01
    assert all(r["process"] >= r["seconds"] > 0 for r in result["stages"])
    again = pipeline_flow(project=str(project), stages=["ingest", "prepare"])
    assert [r["ran"] for r in again["stages"]] == [False, False]
    assert len(tracking.child_runs(project, "test", again["run_id"])) == 0


def test_transient_failure_is_retried(project, harness, monkeypatch):
    from flows.pipeline import pipeline_flow

    init_repo(project)
    flaky_project(project, fail_times=1)
    monkeypatch.chdir(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["pipeline"] = {"retries": 2, "retry_delay_seconds": 0.0, "register_model": False}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    result = pipeline_flow(project=str(project), stages=["ingest", "prepare", "flaky"])
    assert result["stages"][-1]["ran"]
    assert (project / "count").read_text() == "2"  # failed once, retried once


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_bad_input_is_not_retried(project, harness, monkeypatch):
    from flows.pipeline import pipeline_flow
    from tunery.runner.steps import StageFailed

    init_repo(project)
    bad = make_rows(10)
    bad.loc[0, "text"] = ""
    bad.to_csv(project / "data" / "source" / "train.csv", index=False)
    monkeypatch.chdir(project)
    seen = _Records()
    logging.getLogger("prefect.flow_runs").addHandler(seen)
    try:
        with pytest.raises(StageFailed, match="empty_text") as err:
            pipeline_flow(project=str(project), stages=["ingest"])
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(seen)
    assert err.value.user_error
    # Prefect's "Encountered exception" record keeps the error's text but not the engine's frames.
    failed_records = [r for r in seen.records if "Encountered exception" in r.getMessage()]
    assert failed_records and all(r.exc_info is None for r in failed_records)
    assert "empty_text" in failed_records[0].getMessage()
    from mlflow.tracking import MlflowClient

    from tunery import tracking

    exp = tracking.setup(project, "test")
    failed = MlflowClient().search_runs([exp], filter_string="tags.`tunery.stage` = 'ingest'")
    assert [r.info.status for r in failed] == ["FAILED"]
    assert "empty_text" in failed[0].data.tags["tunery.error"]
    log = subprocess.run(["git", "status"], cwd=project, capture_output=True, text=True).stdout
    assert "data/raw" not in log


def test_retrain_nothing_to_do_then_new_data(project, harness, monkeypatch):
    from flows.retrain import retrain_flow

    init_repo(project)
    dvc = yaml.safe_load((project / "dvc.yaml").read_text())
    dvc["stages"] = {k: v for k, v in dvc["stages"].items() if k in ("ingest", "prepare", "corpus")}
    (project / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["pipeline"] = {"register_model": False}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(project)

    first = retrain_flow(project=str(project))  # nothing ran yet: everything is stale
    assert first["status"] == "retrained" and [r["ran"] for r in first["stages"]] == [
        True,
        True,
        True,
    ]
    assert retrain_flow(project=str(project))["status"] == "nothing to do"

    landing = project / "data" / "landing"
    landing.mkdir()
    make_rows(6, offset=500).to_csv(landing / "week2.csv", index=False)
    result = retrain_flow(project=str(project))
    assert result["status"] == "retrained"
    assert [p.split("/")[-1] for p in result["added"]] == ["week2.csv"]
    assert (
        not (landing / "week2.csv").exists()
        and (project / "data" / "incoming" / "week2.csv.dvc").exists()
    )
    ran = {r["stage"]: r["ran"] for r in result["stages"]}
    assert ran["ingest"] and ran["prepare"]
    assert any((project.parent / "remote").rglob("*")), "the new data version was pushed"
    # 18 new texts on a ~100-text corpus is > 5 %: the snapshot moves (a small shard would not)
    assert ran["corpus"]


def test_bad_landing_file_stops_before_anything_moves(project, harness, monkeypatch, capfd):
    from flows.retrain import retrain_flow

    init_repo(project)
    landing = project / "data" / "landing"
    landing.mkdir()
    make_rows(6, offset=500).to_csv(landing / "a.csv", index=False)
    bad = make_rows(6, offset=600)
    bad.loc[1, "label"] = None
    bad.to_csv(landing / "b.csv", index=False)
    monkeypatch.chdir(project)
    from tunery.errors import DataValidationError

    with pytest.raises(DataValidationError, match=r"b.csv: row 2: \[null_label\]"):
        retrain_flow(project=str(project))
    out = capfd.readouterr()
    # Prefect's console handler may still hold a stream an earlier test's capture closed: its
    # "--- Logging error ---" reports are the harness's, not the flow's
    shown = re.sub(
        r"--- Logging error ---.*?\nArguments: [^\n]*\n", "", out.out + out.err, flags=re.S
    )
    assert "Traceback" not in shown, "a refused file is one line, not a traceback"
    assert sorted(p.name for p in landing.iterdir()) == ["a.csv", "b.csv"]
    assert list((project / "data" / "incoming").iterdir()) == []


def test_schedule_deployment_is_created(harness):
    from prefect.client.orchestration import get_client

    from flows.retrain import deployment

    deployment_id = deployment("/tmp/project", cron="0 3 * * 1").apply()

    async def read():
        async with get_client() as client:
            return await client.read_deployment(deployment_id)

    import asyncio

    got = asyncio.run(read())
    assert got.name == "tunery-retrain"
    assert [s.schedule.cron for s in got.schedules] == ["0 3 * * 1"]
    assert got.parameters == {"project": "/tmp/project"}
    assert got.global_concurrency_limit is not None and got.global_concurrency_limit.limit == 1


def test_low_drift_defers_the_retrain_until_ignored(project, harness, monkeypatch):
    from flows.retrain import retrain_flow
    from tests.tiny import make_tiny_encoder

    init_repo(project)
    dvc = yaml.safe_load((project / "dvc.yaml").read_text())
    dvc["stages"] = {k: v for k, v in dvc["stages"].items() if k in ("ingest", "prepare")}
    (project / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["pipeline"] = {"register_model": False}
    params["retrain"]["drift"] = {"enabled": True, "min_auc": 0.99, "reference_rows": 50}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(project)
    assert retrain_flow(project=str(project))["status"] == "retrained"  # the first data version
    make_tiny_encoder(project / params["pretrain"]["out_dir"])  # what drift embeds with

    landing = project / "data" / "landing"
    landing.mkdir()
    # mostly texts the data has (like the training data), with a few new ones (not all copies)
    pd.concat([make_rows(6, offset=3), make_rows(1, offset=40)]).to_csv(
        landing / "week2.csv", index=False
    )
    deferred = retrain_flow(project=str(project))
    assert deferred["status"] == "deferred" and "min_auc" in deferred["reason"]
    assert 0.0 <= deferred["drift"]["auc"] < 0.99 and deferred["drift"]["new_rows"] == 21
    assert (landing / "week2.csv").exists()  # waits for more data

    forced = retrain_flow(project=str(project), ignore_drift=True)
    assert forced["status"] == "retrained" and not (landing / "week2.csv").exists()
    assert forced["drift"]["triggered"] is False


def test_overhead_splits_the_time_outside_the_stages():
    """Hand-computed: 10 s wall, stage processes 6 s; around them DVC 1.5 s and the stages'
    tracking 0.5 s, the parent run's tracking 1 s: overhead 4 s (40 %) = DVC 1.5 + tracking 1.5 +
    other 1.0."""
    from flows.pipeline import overhead

    results = [
        {"process": 4.0, "dvc": 1.0, "tracking": 0.25},
        {"process": 2.0, "dvc": 0.5, "tracking": 0.25},
    ]
    got = overhead(results, wall=10.0, tracking_seconds=1.0)
    assert got == {
        "wall_seconds": 10.0,
        "stage_seconds": 6.0,
        "failed_attempts_seconds": 0.0,
        "overhead_seconds": 4.0,
        "overhead_share": 0.4,
        "dvc_seconds": 1.5,
        "tracking_seconds": 1.5,
        "other_seconds": 1.0,
    }
    # A wall clock shorter than the stages (clocks of different processes) is no negative time.
    assert overhead(results, wall=5.0, tracking_seconds=0.0)["overhead_seconds"] == 0.0
    # An attempt that timed out and was retried is neither stage time nor overhead.
    retried = [results[0] | {"failed_attempts_seconds": 3600.0}, results[1]]
    got = overhead(retried, wall=3610.0, tracking_seconds=1.0)
    assert got["failed_attempts_seconds"] == 3600.0 and got["overhead_seconds"] == 4.0
