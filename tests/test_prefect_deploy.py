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
import os
import re
import shutil
import subprocess
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import REPO, init_repo
from tests.services import BIN, Proc, free_port, http_ok, wait_until
from tests.test_end_to_end import tiny_params

POOL = "tunery"
DEPLOYMENT = "tunery-retrain/tunery-retrain"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
RUN_TIMEOUT = 1200.0  # the tiny pipeline takes 2-4 min on 2 busy cores


def prefect_env(api_url: str, home: Path, **extra: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    environ.update(
        PATH=os.pathsep.join([str(BIN), environ["PATH"]]),
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        **extra,
    )
    return environ


def prefect(*args: str, env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(
        [str(BIN / "prefect"), "--no-prompt", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@contextlib.contextmanager
def prefect_server(work: Path):
    """`prefect server start` on 127.0.0.1 with its own home and sqlite database; yields the API URL."""
    port = free_port()
    home = work / "server-home"
    env = prefect_env("", home)
    env.pop("PREFECT_API_URL")
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{work / 'server.db'}"
    proc = Proc(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        work / "server.log",
        env,
        cwd=work,
    )
    try:
        api = f"http://127.0.0.1:{port}/api"
        started = time.monotonic()
        wait_until(lambda: http_ok(f"{api}/health"), proc, "prefect server", timeout=180)
        print(f"prefect server up in {time.monotonic() - started:.1f} s")
        yield api, proc
    finally:
        proc.stop()


def flow_run_id(output: str) -> str:
    found = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert found, output
    return found.group(1)


def when(run: dict, key: str) -> datetime:
    return datetime.fromisoformat(run[key])


def api_get(api: str, path: str) -> dict:
    with urllib.request.urlopen(f"{api}/{path}", timeout=10) as r:
        return json.loads(r.read())


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
