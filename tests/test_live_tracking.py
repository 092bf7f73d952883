"""Streamed stage tracking: a stage's metrics reach its MLflow run while it runs, and the run
keeps the stage's own start and end times (tunery/runner/journal.py, tunery.runner.steps.LiveStageRun)."""

from __future__ import annotations

import time

from mlflow.tracking import MlflowClient

from tunery import tracking
from tunery.runner import journal
from tunery.runner import steps as pipeline


def wait_for(fn, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_metrics_are_visible_while_the_stage_runs_and_times_are_the_stages(tmp_path):
    stream = tmp_path / "j" / "finetune.jsonl"
    with tracking.pipeline_run(tmp_path, "exp") as parent:
        live = pipeline.LiveStageRun(tmp_path, "exp", stream)
        live.start()
        started = time.time() - 30.0  # the stage process started well before its first line
        stage = journal.JournalRun("finetune", {"epochs": 2}, stream, start=started)
        stage.log_metrics({"train.loss": 1.5}, step=1)
        client = MlflowClient(tracking.tracking_uri(tmp_path))

        def child():
            runs = tracking.child_runs(tmp_path, "exp", parent.run_id)
            return runs and runs[0]["metrics"].get("train.loss") and runs[0]

        running = wait_for(child)  # the stage has not ended: the curve is already there
        assert running["status"] == "RUNNING" and running["name"] == "finetune"
        stage.log_metrics({"train.loss": 0.9}, step=2)
        stage.write(tmp_path / "j" / "finetune.json", status="FINISHED", timing={"seconds": 1.0})
        ended = time.time()
        live.finish()
        assert live.error is None
    run = client.get_run(running["run_id"])
    assert run.info.status == "FINISHED"
    assert abs(run.info.start_time / 1000 - started) < 0.01
    assert abs(run.info.end_time / 1000 - ended) < 1.0
    assert run.data.params == {"finetune.epochs": "2"}
    history = client.get_metric_history(run.info.run_id, "train.loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.5), (2, 0.9)]


def test_a_stage_that_dies_without_its_last_line_is_closed_failed(tmp_path):
    stream = tmp_path / "j" / "export.jsonl"
    with tracking.pipeline_run(tmp_path, "exp") as parent:
        live = pipeline.LiveStageRun(tmp_path, "exp", stream)
        live.start()
        stage = journal.JournalRun("export", {}, stream, start=time.time())
        stage.log_metrics({"x": 1.0})
        stage._out.close()  # SIGKILLed: no _end line
        live.finish()
    [child] = tracking.child_runs(tmp_path, "exp", parent.run_id)
    assert child["status"] == "FAILED" and child["metrics"] == {"x": 1.0}
