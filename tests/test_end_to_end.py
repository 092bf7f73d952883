"""The real pipeline and retrain flows end to end on tiny data (slow: about a minute or two)."""

import json
import time

import pandas as pd
import pytest
import yaml

from tests.conftest import init_repo, make_rows


def tiny_params(project) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tracking"]["log_models"] = False
    params["pipeline"] = {"retries": 0}
    params["registry"]["floor_macro_f1"] = 0.0
    pre = params["pretrain"]
    pre["init"] = "scratch"
    pre["objective"] = "mlm"
    pre["scratch"].update(
        layers=1, hidden=32, heads=2, intermediate=64, max_length=64, vocab_size=300
    )
    pre["max_length"] = 32
    pre["train"].update(batch_size=8, max_steps=4, max_minutes=1.0, save_steps=2, logging_steps=1)
    pre["probe"]["max_train"] = 100
    ft = params["finetune"]
    ft.update(epochs=1.0, batch_size=16, max_length=32, warm_start="champion")
    ft["ablations"]["enabled"] = False
    comp = params["compress"]
    comp.update(variants=["fp32", "int8_dynamic"], max_f1_drop=1.0)
    comp["bench"].update(warmup=1, latency_runs=3, throughput_batches=1)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_pipeline_then_retrain_on_new_data(project, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    from flows.retrain import retrain_flow
    from tunery import metrics_files, tracking
    from tunery.onnx.runtime import Predictor

    init_repo(project)
    tiny_params(project)
    monkeypatch.chdir(project)
    with prefect_test_harness(server_startup_timeout=120):
        first = retrain_flow(project=str(project))
        assert first["status"] == "retrained"
        assert all(r["ran"] for r in first["stages"])
        assert first["registry"]["registered"] and first["registry"]["promoted"]
        assert tracking.alias_version(project, "tunery-classifier", "champion") == "1"
        for stage in (r["stage"] for r in first["stages"]):  # `dvc metrics show`: headlines only
            details = metrics_files.read(project, stage)
            head = json.loads(metrics_files.headline_path(project, stage).read_text())
            assert head == metrics_files.headline(stage, details) and head["seconds"] > 0, stage

        assert retrain_flow(project=str(project))["status"] == "nothing to do"

        (project / "data" / "landing").mkdir()
        make_rows(10, offset=900).to_csv(project / "data" / "landing" / "new.csv", index=False)
        trained_on = len(pd.read_parquet(project / "data" / "prepared" / "train.parquet"))
        cap = yaml.safe_load((project / "params.yaml").read_text())["retrain"]["drift"]
        started = time.perf_counter()
        second = retrain_flow(project=str(project))
        elapsed = time.perf_counter() - started
        ran = {r["stage"]: r["ran"] for r in second["stages"]}
        assert ran["finetune"] and ran["evaluate"] and ran["compress"]
        assert second["registry"]["version"] == "2"  # registered; promoted or not, the gate decided
        info = json.loads((project / "models" / "finetune" / "finetune.json").read_text())
        assert (
            info["warm_start"] and "tunery-classifier-v1" in info["warm_start"]
        )  # from the champion
        assert "gate.decision" in tracking.version_info(project, "tunery-classifier", "2")["tags"]
        # Drift was measured with the first run's encoder before the new file was taken in: the
        # new file's rows against the training split as it was (not as it is after the take-in).
        assert second["drift"]["new_rows"] == 30
        assert second["drift"]["reference_rows"] == min(trained_on, cap["reference_rows"])
        # The new file's test rows are the newest data: the champion (v1) never trained on them.
        newest = second["newest"]
        assert newest["origins"] == "incoming:new.csv" and newest["rows"] > 0
        assert "champion_macro_f1" in newest
        # The flow's clock covers the stages it ran and no more than the call took.
        timing = second["timing"]
        assert 0 < timing["stage_seconds"] <= timing["wall_seconds"] <= elapsed + 0.01

    got = Predictor("models:/tunery-classifier@champion", device="cpu").predict(
        ["a small red animal"]
    )
    assert got.labels[0] in {"animal", "tool", "food"}
