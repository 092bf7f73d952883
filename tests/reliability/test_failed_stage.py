"""A stage that fails leaves the last good outputs, metrics and dvc.lock as they were."""

import hashlib

import pandas as pd
import yaml

from tests.conftest import init_repo
from tests.test_pipeline_dvc import dvc, lock


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _repro_may_fail(project):
    import subprocess
    import sys

    from tests.conftest import tool_env

    return subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "prepare"],
        cwd=project,
        env=tool_env(project),
        capture_output=True,
        text=True,
    )


def test_failed_stage_keeps_the_last_good_outputs(project):
    init_repo(project)
    dvc(project, "repro", "prepare")
    kept = [
        project / "data" / "raw" / "labelled.parquet",
        project / "data" / "prepared" / "train.parquet",
        project / "metrics" / "ingest.json",
        project / "metrics" / "prepare.json",
        project / "reports" / "metrics" / "ingest.json",
        project / "plots" / "prepare" / "lengths.png",
    ]
    before = {p: _digest(p) for p in kept}
    lock_before = lock(project)

    # A source file that breaks ingest (a null label): the stage fails under `dvc repro`.
    bad = pd.read_csv(project / "data" / "source" / "train.csv")
    bad.loc[3, "label"] = None
    bad.to_csv(project / "data" / "source" / "train.csv", index=False)
    failed = _repro_may_fail(project)
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
    failed = _repro_may_fail(project)
    assert failed.returncode != 0
    assert {p: _digest(p) for p in kept} == good


def test_sigkill_of_the_caller_ends_the_dvc_worker_and_its_stage(tmp_path):
    """`kill -9` of the process that runs the pipeline: the DVC worker and the stage it runs end
    within seconds (no training left running, no DVC lock held for the next run)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.test_pipeline_dvc import _worker_project

    root = _worker_project(tmp_path)
    marker = f"sleep-{os.getpid()}-{time.time_ns()}"
    stage = {
        "cmd": f"{sys.executable} -c \"print('started', flush=True); import time; "
        f'time.sleep(120)" {marker}',
        "outs": ["never.txt"],
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"slow": stage}}))
    caller = (
        "import sys; from pathlib import Path; from tunery.runner import steps as pipeline; "
        "root = Path(sys.argv[1]); pipeline.start_dvc_worker(root); "
        "pipeline.dvc_command(root, 'repro', 'slow')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", caller, str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[2])},
    )
    for line in proc.stdout:
        if line.startswith("started"):
            break
    stage_pids = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    assert stage_pids.strip(), "the stage never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
        if not left.strip():
            break
        time.sleep(0.2)
    assert not left.strip(), f"left running after the caller's SIGKILL: {left.split()}"


def test_adapter_config_is_written_in_a_stable_order(tmp_path):
    """peft writes target_modules in set (hash) order; the stage sorts it, so two identical
    fine-tunes give byte-identical folders and the same DVC hash."""
    import json

    from tunery.modeling.save import sort_adapter_config

    one, two = tmp_path / "one.json", tmp_path / "two.json"
    cfg = {"r": 8, "target_modules": ["value", "query", "dense", "key"], "modules_to_save": None}
    one.write_text(json.dumps(cfg))
    two.write_text(json.dumps({**cfg, "target_modules": ["key", "dense", "value", "query"]}))
    sort_adapter_config(one)
    sort_adapter_config(two)
    assert one.read_bytes() == two.read_bytes()
    assert json.loads(one.read_text())["target_modules"] == ["dense", "key", "query", "value"]
