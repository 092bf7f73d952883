"""Prefect as it is deployed: a real `prefect server`, the work pool, `prefect deploy --all` from
the project's prefect.yaml, a `prefect worker` and two triggered retrain runs (slow, a few minutes).

What it shows: the deployment as written runs on a worker that knows the project only through
`TUNERY_PROJECT` (its own working folder is elsewhere); the retrain finishes Completed with a
registered, promoted model; and `concurrency_limit: 1` holds a second triggered run back while the
first runs (it waits as AwaitingConcurrencySlot, then runs: "nothing to do").

The server (sqlite in its own PREFECT_HOME under tmp), the worker and every flow run the worker
starts are stopped at the end, pass or fail (process groups, and their descendants).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time

import pytest

from tests.conftest import REPO, init_repo
from tests.services import (
    BIN,
    FINAL,
    Proc,
    api_get,
    flow_run_id,
    prefect,
    prefect_env,
    prefect_server,
    when,
)
from tests.test_end_to_end import tiny_params

POOL = "tunery"
DEPLOYMENT = "tunery-retrain/tunery-retrain"
RUN_TIMEOUT = 1200.0  # the tiny pipeline takes 2-4 min on 2 busy cores


@pytest.mark.slow
def test_deployed_retrain_runs_on_a_worker_one_at_a_time(project, tmp_path, monkeypatch):
    from tunery import tracking

    init_repo(project)
    tiny_params(project)
    shutil.copy(REPO / "prefect.yaml", project / "prefect.yaml")
    work = tmp_path / "prefect"
    elsewhere = tmp_path / "worker-cwd"  # the worker finds the project through TUNERY_PROJECT
    work.mkdir()
    elsewhere.mkdir()

    with contextlib.ExitStack() as stack:
        api, server = stack.enter_context(prefect_server(work))
        # No TUNERY_PROJECT where `prefect deploy` runs: the deployment keeps the placeholder, and
        # each worker resolves it from its own environment when it starts a flow run.
        client_env = prefect_env(api, work / "client-home")
        prefect("work-pool", "create", POOL, "--type", "process", env=client_env, cwd=project)
        deployed = prefect("deploy", "--all", env=client_env, cwd=project)
        assert "tunery-retrain" in deployed and "tunery-pipeline" in deployed, deployed

        worker_env = prefect_env(
            api,
            work / "worker-home",
            TUNERY_PROJECT=str(project),
            PYTHONPATH=str(project),  # this copy's code, not the installed checkout's
            PREFECT_WORKER_QUERY_SECONDS="2",
            OMP_NUM_THREADS="1",
        )
        worker = Proc(
            [str(BIN / "prefect"), "worker", "start", "--pool", POOL],
            work / "worker.log",
            worker_env,
            cwd=elsewhere,
        )
        stack.callback(worker.stop)

        first = flow_run_id(prefect("deployment", "run", DEPLOYMENT, env=client_env, cwd=project))
        second = flow_run_id(prefect("deployment", "run", DEPLOYMENT, env=client_env, cwd=project))

        seen: dict[str, list[tuple[str, str]]] = {first: [], second: []}
        overlap = []
        deadline = time.monotonic() + RUN_TIMEOUT
        while True:
            runs = {i: api_get(api, f"flow_runs/{i}") for i in (first, second)}
            for i, run in runs.items():
                state = (run["state"]["type"], run["state"]["name"])
                if not seen[i] or seen[i][-1] != state:
                    seen[i].append(state)
            if all(run["state"]["type"] == "RUNNING" for run in runs.values()):
                overlap.append(time.monotonic())
            if all(run["state"]["type"] in FINAL for run in runs.values()):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"runs not done after {RUN_TIMEOUT:.0f} s: {seen}\n{worker.tail()}")
            if not worker.alive() or not server.alive():
                pytest.fail(f"a Prefect process died: {seen}\n{worker.tail()}{server.tail()}")
            time.sleep(1.0)
        a, b = runs[first], runs[second]
        if when(b, "start_time") < when(a, "start_time"):  # whichever the worker took first
            a, b = b, a
            first, second = second, first
        deployment = api_get(api, f"deployments/name/{DEPLOYMENT}")

        states = f"first: {seen[first]}\nsecond: {seen[second]}\n{worker.tail(6000)}"
        assert a["state"]["type"] == "COMPLETED", states
        assert b["state"]["type"] == "COMPLETED", states
        # concurrency_limit 1: the second never ran beside the first; it waited for the slot
        assert not overlap, states
        assert when(b, "start_time") >= when(a, "end_time"), states
        assert ("SCHEDULED", "AwaitingConcurrencySlot") in seen[second], states
        assert deployment["global_concurrency_limit"]["limit"] == 1, deployment
        # the project folder is resolved on the worker, at run time, from TUNERY_PROJECT
        assert "{{ $TUNERY_PROJECT }}" in json.dumps(deployment["pull_steps"]), deployment
        print(
            f"first run {a['total_run_time']:.0f} s, second {b['total_run_time']:.0f} s; "
            f"states {seen}"
        )

    # the first run trained and registered a model; the second found nothing to do
    assert tracking.alias_version(project, "tunery-classifier", "champion") == "1"
    assert [v["version"] for v in tracking.list_versions(project, "tunery-classifier")] == ["1"]
    assert (project / "metrics" / "evaluate.json").is_file()
    assert "nothing to do" in worker.log.read_text(errors="replace")
