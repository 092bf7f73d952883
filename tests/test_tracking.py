"""Parent/child MLflow runs on a temporary store, in-process and across processes."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tunery import tracking

REPO = Path(__file__).resolve().parents[1]


def test_stage_runs_are_children_of_the_pipeline_run(tmp_path):
    with tracking.pipeline_run(tmp_path, "exp") as parent:
        with tracking.stage_run(
            tmp_path, "exp", "ingest", {"a": 1, "nested": {"b": [1, 2]}}
        ) as run:
            run.log_metrics({"rows": 10, "skip_me": "text"})
        # a stage started by DVC: another process that only sees the environment
        code = textwrap.dedent(
            f"""
            from pathlib import Path
            from tunery import tracking
            with tracking.stage_run(Path({str(tmp_path)!r}), "exp", "prepare", {{"x": 2}}) as run:
                run.log_metrics({{"train_rows": 7}}, step=0)
            """
        )
        subprocess.run([sys.executable, "-c", code], check=True)
    children = tracking.child_runs(tmp_path, "exp", parent.run_id)
    assert [c["name"] for c in children] == ["ingest", "prepare"]
    assert children[0]["metrics"] == {"rows": 10.0}
    assert children[1]["metrics"] == {"train_rows": 7.0}
    assert all(c["status"] == "FINISHED" for c in children)
    run = MlflowClient(tracking.tracking_uri(tmp_path)).get_run(children[0]["run_id"])
    assert run.data.params == {"ingest.a": "1", "ingest.nested.b": "[1, 2]"}
    assert run.data.tags["tunery.stage"] == "ingest"
    # the store and the artifacts stay inside the project
    assert (tmp_path / "mlflow.db").exists()
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())


def test_a_failing_stage_is_marked_failed(tmp_path):
    try:
        with tracking.stage_run(tmp_path, "exp", "ingest", {}):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    [run] = MlflowClient(tracking.tracking_uri(tmp_path)).search_runs(
        [mlflow.get_experiment_by_name("exp").experiment_id]
    )
    assert run.info.status == "FAILED"


def test_tracking_uri_env_overrides(tmp_path, monkeypatch):
    other = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{other}"


def test_dataset_input_records_the_data_version(tmp_path):
    with tracking.stage_run(tmp_path, "exp", "ingest", {}) as run:
        run.log_dataset(
            name="raw",
            digest="abc123",
            source="data/raw/labelled.parquet",
            context="training",
            profile={"rows": 3},
        )
    got = MlflowClient(tracking.tracking_uri(tmp_path)).get_run(run.run_id)
    [ds] = got.inputs.dataset_inputs
    assert ds.dataset.digest == "abc123" and ds.dataset.name == "raw"


def test_concurrent_writers_to_the_embedded_store_lose_nothing(tmp_path):
    """Two processes start on a fresh sqlite store at once and each log runs, metric curves,
    model versions and promotion-log entries: nothing may be lost or fail.

    The store does not exist yet, so both would run MLflow's schema migrations at once (one used to
    die on "duplicate column"); `tracking` creates it under a file lock, and retries calls that
    still find the database locked after MLflow's own busy timeout.
    """
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from tests.test_registry import deploy_dir
        from tunery import mlflow_model, tracking
        root, who = Path({str(tmp_path)!r}), sys.argv[1]
        with tracking.pipeline_run(root, "exp", name=who) as parent:
            for i in range(2):
                with tracking.stage_run(root, "exp", f"{{who}}-stage{{i}}", {{"i": i}}) as run:
                    for step in range(15):
                        run.log_metrics({{"loss": 1.0 / (step + 1)}}, step=step)
                    (root / f"{{who}}{{i}}").mkdir()
                    d = deploy_dir(root / f"{{who}}{{i}}", "g")
                    v = mlflow_model.register_deployable(run, d, "m")
                    tracking.set_alias(root, "m", f"{{who}}{{i}}", v)
                    tracking.log_decision(root, "exp", {{"action": "gate", "model": "m", "to": v}})
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, who], env=env, cwd=REPO) for who in "ab"]
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    client = MlflowClient(tracking.tracking_uri(tmp_path))
    exp_id = client.get_experiment_by_name("exp").experiment_id
    runs = client.search_runs([exp_id])
    assert sorted(r.info.run_name for r in runs) == sorted(
        ["a", "b", "a-stage0", "a-stage1", "b-stage0", "b-stage1"]
    )
    assert all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        if "-stage" in run.info.run_name:
            assert len(client.get_metric_history(run.info.run_id, "loss")) == 15
    versions = tracking.list_versions(tmp_path, "m")
    assert sorted(int(v["version"]) for v in versions) == [1, 2, 3, 4]
    aliases = {a: v["version"] for v in versions for a in v["aliases"]}
    assert sorted(aliases) == ["a0", "a1", "b0", "b1"] and len(set(aliases.values())) == 4
    assert sorted(e["to"] for e in tracking.decisions(tmp_path, "exp", "m")) == ["1", "2", "3", "4"]
    assert (tmp_path / ("mlflow.db" + tracking.STORE_LOCK_SUFFIX)).exists()


def test_locked_store_calls_are_retried_with_backoff(monkeypatch):
    from mlflow.exceptions import MlflowException

    sleeps = []
    monkeypatch.setattr(tracking.time, "sleep", sleeps.append)
    calls = []

    def flaky(x, *, y):
        calls.append((x, y))
        if len(calls) < 3:
            # what MLflow's sqlalchemy store raises when sqlite gives up waiting
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return x + y

    assert tracking.retry_locked(flaky, 1, y=2) == 3
    assert calls == [(1, 2)] * 3 and len(sleeps) == 2 and sleeps[1] > sleeps[0] / 2

    def broken():
        calls.append("broken")
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: no such run")

    with pytest.raises(MlflowException, match="no such run"):
        tracking.retry_locked(broken)
    assert calls.count("broken") == 1  # other errors are not retried

    def always_locked():
        raise MlflowException("database is locked")

    sleeps.clear()
    with pytest.raises(MlflowException, match="locked"):
        tracking.retry_locked(always_locked)
    assert len(sleeps) == tracking.LOCK_RETRIES - 1
    assert max(sleeps) <= 2 * tracking.LOCK_BACKOFF_MAX_S


def test_setup_does_not_leak_the_store_into_the_environment(tmp_path):
    """MLflow exports the URI it is given; a second project in the same process (or a later test)
    must still get its own store, not the first one's."""
    tracking.setup(tmp_path / "one", "exp")
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert tracking.tracking_uri(tmp_path / "two") == f"sqlite:///{tmp_path / 'two' / 'mlflow.db'}"
    assert tracking.sqlite_file(tracking.tracking_uri(tmp_path / "two")) == (
        tmp_path / "two" / "mlflow.db"
    )
    assert tracking.sqlite_file("http://127.0.0.1:5000") is None
