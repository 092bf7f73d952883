"""A worker killed mid-flow: the flow run ends Crashed, not Running forever, and the next run of the
deployment proceeds (flows/zombies.py: heartbeats + Prefect's "crash zombie flows" automation).

Fast: the automation's definition and prefect.yaml agree (heartbeat frequency, build step).
Slow (~5 min on 2 busy cores): a real `prefect server`, `prefect deploy --all` (which creates the
automation), a worker; a retrain run is triggered and a second one queues behind it on
`concurrency_limit: 1`; the worker and everything it started are SIGKILLed mid-run (a machine
that died); the run becomes Crashed within a bounded wait, and a new worker runs the queued one
to Completed.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import time

import pytest
import yaml

from tests.conftest import REPO, init_repo
from tests.services import (
    BIN,
    Proc,
    api_get,
    flow_run_id,
    prefect,
    prefect_env,
    prefect_server,
    wait_flow_run,
)
from tests.test_end_to_end import tiny_params

POOL = "tunery"
DEPLOYMENT = "tunery-retrain/tunery-retrain"
CRASH_TIMEOUT = 240.0  # 90 s without a heartbeat, plus the automation's evaluation and 2 busy cores
RUN_TIMEOUT = 900.0


def test_prefect_yaml_sends_the_heartbeats_the_automation_expects():
    from flows import zombies

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for deployment in config["deployments"]:
        env = deployment["work_pool"]["job_variables"]["env"]
        assert int(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) == zombies.HEARTBEAT_S, deployment
    steps = [step["prefect.deployments.steps.run_shell_script"] for step in config["build"]]
    assert [s["script"] for s in steps] == ["python -m flows.zombies"]
    auto = zombies.automation()
    trigger = auto.trigger
    assert trigger.posture == "Proactive" and trigger.for_each == {"prefect.resource.id"}
    assert trigger.within.total_seconds() == zombies.MISSED_AFTER_S >= 3 * zombies.HEARTBEAT_S
    assert "prefect.flow-run.heartbeat" in trigger.after
    assert set(zombies.FINAL_EVENTS) <= trigger.expect
    assert auto.actions[0].state == "CRASHED"


def running_for(api: str, run_id: str, seconds: float, worker: Proc, timeout: float) -> None:
    """Wait until the run has been Running for `seconds` (a stage is under way)."""
    deadline = time.monotonic() + timeout
    since = None
    while time.monotonic() < deadline:
        state = api_get(api, f"flow_runs/{run_id}")["state"]["type"]
        assert state in ("SCHEDULED", "PENDING", "RUNNING"), f"{state}\n{worker.tail()}"
        if state == "RUNNING":
            since = since or time.monotonic()
            if time.monotonic() - since >= seconds:
                return
        if not worker.alive():
            pytest.fail(f"the worker died on its own:\n{worker.tail()}")
        time.sleep(1.0)
    pytest.fail(f"run {run_id} not running after {timeout:.0f} s:\n{worker.tail()}")


@pytest.mark.slow
def test_a_killed_worker_leaves_a_crashed_run_and_the_next_run_proceeds(project, tmp_path):
    from flows import zombies
    from tunery import tracking

    init_repo(project)
    tiny_params(project)
    shutil.copy(REPO / "prefect.yaml", project / "prefect.yaml")
    work = tmp_path / "prefect"
    elsewhere = tmp_path / "worker-cwd"
    work.mkdir()
    elsewhere.mkdir()

    with contextlib.ExitStack() as stack:
        api, server = stack.enter_context(prefect_server(work))
        client_env = prefect_env(api, work / "client-home")
        prefect("work-pool", "create", POOL, "--type", "process", env=client_env, cwd=project)
        deployed = prefect("deploy", "--all", env=client_env, cwd=project)
        # the build step made the automation: one, however many deployments ran the step
        automations = [a for a in api_post(api, "automations/filter") if a["name"] == zombies.NAME]
        assert len(automations) == 1 and automations[0]["enabled"], deployed
        # the deployment carries the heartbeat setting to whichever worker runs it
        deployment = api_get(api, f"deployments/name/{DEPLOYMENT}")
        heartbeat = deployment["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]
        assert int(heartbeat) == zombies.HEARTBEAT_S, deployment["job_variables"]

        def start_worker(name: str) -> Proc:
            worker = Proc(
                [str(BIN / "prefect"), "worker", "start", "--pool", POOL],
                work / f"{name}.log",
                prefect_env(
                    api,
                    work / f"{name}-home",
                    TUNERY_PROJECT=str(project),
                    PYTHONPATH=str(project),
                    PREFECT_WORKER_QUERY_SECONDS="2",
                    OMP_NUM_THREADS="1",
                ),
                cwd=elsewhere,
            )
            stack.callback(worker.stop)
            return worker

        worker = start_worker("worker-1")
        first = flow_run_id(prefect("deployment", "run", DEPLOYMENT, env=client_env, cwd=project))
        running_for(api, first, 20.0, worker, timeout=300.0)
        second = flow_run_id(prefect("deployment", "run", DEPLOYMENT, env=client_env, cwd=project))

        worker.stop(signal.SIGKILL)  # the worker, its flow run and the stages: a dead machine
        killed = time.monotonic()
        crashed = wait_flow_run(api, first, [server], timeout=CRASH_TIMEOUT)
        took = time.monotonic() - killed
        assert crashed["state"]["type"] == "CRASHED", crashed["state"]
        assert "no heartbeat" in (crashed["state"]["message"] or ""), crashed["state"]
        # the queued run was held back all along: the zombie held the concurrency slot
        assert api_get(api, f"flow_runs/{second}")["state"]["type"] == "SCHEDULED"

        worker = start_worker("worker-2")
        done = wait_flow_run(api, second, [server, worker], timeout=RUN_TIMEOUT)
        assert done["state"]["type"] == "COMPLETED", f"{done['state']}\n{worker.tail(6000)}"
        print(
            f"crashed {took:.0f} s after the kill; the next run took {done['total_run_time']:.0f} s"
        )

    assert tracking.alias_version(project, "tunery-classifier", "champion") == "1"


def api_post(api: str, path: str, body: dict | None = None) -> list | dict:
    import json
    import urllib.request

    request = urllib.request.Request(
        f"{api}/{path}",
        data=json.dumps(body or {}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())
