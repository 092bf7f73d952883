"""Parent/child MLflow runs on a temporary store, in-process and across processes."""

import subprocess
import sys
import textwrap

import mlflow
from mlflow.tracking import MlflowClient

from tunery import tracking


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
    """Two processes logging at once to one sqlite store (MLflow sets a 20 s busy timeout)."""
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from tunery import tracking
        who = sys.argv[1]
        with tracking.pipeline_run(Path({str(tmp_path)!r}), "exp", name=who) as parent:
            for i in range(3):
                with tracking.stage_run(Path({str(tmp_path)!r}), "exp", f"{{who}}-stage{{i}}", {{"i": i}}) as run:
                    for step in range(15):
                        run.log_metrics({{"loss": 1.0 / (step + 1)}}, step=step)
        """
    )
    # create the store first so both writers start on a migrated database
    tracking.setup(tmp_path, "exp")
    procs = [subprocess.Popen([sys.executable, "-c", code, who]) for who in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    client = MlflowClient(tracking.tracking_uri(tmp_path))
    runs = client.search_runs([mlflow.get_experiment_by_name("exp").experiment_id])
    assert len(runs) == 2 + 6
    for run in runs:
        if run.info.run_name.endswith(tuple(f"stage{i}" for i in range(3))):
            assert len(client.get_metric_history(run.info.run_id, "loss")) == 15
