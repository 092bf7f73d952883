"""All of the scale-out profile at once (slow: about ten minutes on 2 busy cores).

The services, each started here on 127.0.0.1 and stopped at the end, pass or fail: PostgreSQL,
an S3-compatible store (moto; one bucket for MLflow's artifacts, one for DVC), an MLflow server
on PostgreSQL with artifacts proxied to S3, a Prefect server, and a Prefect worker. One `.env`
file in the project (the profile, tunery.env.example) switches the project to them; the fine-tune
stage runs under `torchrun --nproc-per-node 2`. The test:

1. `tunery check --json` shows the profile and every store answering; with the MLflow server's
   port refused instead, a named error and exit 1;
2. the pipeline deployment, then a retrain with a new file, both run by the worker: a model
   registered and promoted on the MLflow server, its files in S3, the new data version in the
   DVC remote on S3, fine-tuning on two processes, nothing in the project's embedded stores;
3. the same two runs on the embedded defaults (one process, temporary Prefect server, sqlite,
   local DVC remote), for the wall-time comparison printed at the end.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, init_repo, make_rows, tool_env
from tests.services import (
    BIN,
    BUCKET,
    Proc,
    aws_env,
    flow_run_id,
    free_port,
    mlflow_server,
    postgres_server,
    prefect,
    prefect_env,
    prefect_server,
    s3_keys,
    s3_server,
    wait_flow_run,
)
from tests.test_end_to_end import tiny_params
from tests.test_finetune_ddp import stage_metrics

DVC_BUCKET = "tunery-dvc"
RUN_TIMEOUT = 1500.0


def cli(root: Path, *argv: str, env: dict[str, str], check: bool = True):
    done = subprocess.run(
        [sys.executable, "-m", "tunery.cli", *argv],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    if check:
        assert done.returncode == 0, (
            f"tunery {' '.join(argv)}:\n{done.stdout}\n{done.stderr[-4000:]}"
        )
    return done


def land(root: Path, name: str, offset: int) -> None:
    (root / "data" / "landing").mkdir(exist_ok=True)
    make_rows(10, offset=offset).to_csv(root / "data" / "landing" / name, index=False)


def commit(root: Path, message: str) -> None:
    for argv in (["git", "add", "-A"], ["git", "commit", "-q", "-m", message]):
        subprocess.run(argv, cwd=root, check=True, capture_output=True)


@pytest.mark.slow
def test_the_whole_profile_at_once_against_the_embedded_default(project, tmp_path):
    pytest.importorskip("dvc_s3", reason="dvc-s3 (dev extra) not installed")
    from mlflow.tracking import MlflowClient

    init_repo(project)
    tiny_params(project)
    for name in ("prefect.yaml", ".gitignore"):
        shutil.copy(REPO / name, project / name)
    embedded = tmp_path / "embedded" / "proj"  # the same project on the embedded defaults
    shutil.copytree(project, embedded, symlinks=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dvc",
            "remote",
            "modify",
            "local",
            "url",
            str(embedded.parent / "remote"),
        ],
        cwd=embedded,
        check=True,
        capture_output=True,
    )
    dvc = yaml.safe_load((project / "dvc.yaml").read_text())
    dvc["stages"]["finetune"]["cmd"] = "torchrun --standalone --nproc-per-node 2 -m tasks.finetune"
    (project / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))

    work = tmp_path / "services"
    elsewhere = tmp_path / "worker-cwd"
    work.mkdir()
    elsewhere.mkdir()
    aws = aws_env(work)  # fake credentials for the S3 stand-in: environment only
    timings: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        started = time.monotonic()
        database = stack.enter_context(postgres_server())
        endpoint = stack.enter_context(s3_server(work, buckets=(BUCKET, DVC_BUCKET)))
        mlflow_uri, mlflow_proc = stack.enter_context(
            mlflow_server(
                work,
                database,
                f"s3://{BUCKET}/proxied",
                {**aws, "MLFLOW_S3_ENDPOINT_URL": endpoint},
            )
        )
        api, prefect_proc = stack.enter_context(prefect_server(work))
        timings["services_start"] = time.monotonic() - started

        profile = (
            "TUNERY_PROFILE=scale-out-test\n"
            f"PREFECT_API_URL={api}\n"
            f"MLFLOW_TRACKING_URI={mlflow_uri}\n"
            f"TUNERY_DVC_REMOTE=s3://{DVC_BUCKET}/store\n"
            f"TUNERY_DVC_ENDPOINT={endpoint}\n"
        )
        (project / ".env").write_text(profile)
        commit(project, "the project")
        assert (
            ".env"
            not in subprocess.run(
                ["git", "ls-files"], cwd=project, capture_output=True, text=True
            ).stdout.split()
        )

        # 1. the profile in force, every store answering; then one refused
        env = {**tool_env(project), **aws}
        doc = json.loads(cli(project, "check", "--json", env=env).stdout)
        assert doc["profile"]["name"] == "scale-out-test", doc
        answers = doc["profile"]["answers"]
        assert answers["prefect"] == f"{api} answers", answers
        assert answers["MLFLOW_TRACKING_URI"] == f"{mlflow_uri} answers", answers
        assert answers["dvc_remote"] == f"s3://{DVC_BUCKET}/store answers", answers
        down = f"http://127.0.0.1:{free_port()}"
        refused = cli(project, "check", env={**env, "MLFLOW_TRACKING_URI": down}, check=False)
        assert refused.returncode == 1
        assert f"MLflow tracking server at {down} does not answer" in refused.stderr

        # 2. the pipeline and a retrain, deployed and run by a worker
        client_env = prefect_env(api, work / "client-home")
        prefect("work-pool", "create", "tunery", "--type", "process", env=client_env, cwd=project)
        prefect("deploy", "--all", env=client_env, cwd=project)
        worker = Proc(
            [str(BIN / "prefect"), "worker", "start", "--pool", "tunery"],
            work / "worker.log",
            prefect_env(
                api,
                work / "worker-home",
                TUNERY_PROJECT=str(project),
                PYTHONPATH=str(project),
                PREFECT_WORKER_QUERY_SECONDS="2",
                OMP_NUM_THREADS="1",
                **aws,
            ),
            cwd=elsewhere,
        )
        stack.callback(worker.stop)
        watched = [worker, mlflow_proc, prefect_proc]
        runs = {}
        for name, deployment in (
            ("pipeline", "tunery-pipeline/tunery-pipeline"),
            ("retrain", "tunery-retrain/tunery-retrain"),
        ):
            if name == "retrain":
                land(project, "new.csv", offset=900)
            t0 = time.monotonic()
            run_id = flow_run_id(
                prefect("deployment", "run", deployment, env=client_env, cwd=project)
            )
            run = wait_flow_run(api, run_id, watched, RUN_TIMEOUT)
            timings[f"scale_out_{name}"] = time.monotonic() - t0
            assert run["state"]["type"] == "COMPLETED", (
                f"{name}: {run['state']}\n{worker.tail(8000)}"
            )
            runs[name] = run

        # what the runs left in the shared stores, and nothing in the embedded ones
        client = MlflowClient(mlflow_uri)
        versions = client.search_model_versions("name='tunery-classifier'")
        assert len(versions) >= 1
        champion = client.get_model_version_by_alias("tunery-classifier", "champion")
        assert champion.tags["data_version"]
        keys = s3_keys(endpoint, "proxied/")
        assert any(k.endswith("/deploy/model.onnx") for k in keys), keys[:20]
        assert s3_keys(endpoint, "store/", bucket=DVC_BUCKET), "the new data version was pushed"
        assert stage_metrics(project, "finetune")["world_size"] == 2
        assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists()
        assert not (project.parent / "remote").exists()  # the local DVC remote was not used
        assert "new.csv" in worker.log.read_text(errors="replace")

    # 3. the embedded defaults: the same runs with no profile and one training process
    env = tool_env(embedded)
    t0 = time.monotonic()
    cli(embedded, "run", env=env)
    timings["embedded_pipeline"] = time.monotonic() - t0
    land(embedded, "new.csv", offset=900)
    t0 = time.monotonic()
    cli(embedded, "retrain", env=env)
    timings["embedded_retrain"] = time.monotonic() - t0
    assert (embedded / "mlflow.db").exists()

    scale = timings["scale_out_pipeline"] + timings["scale_out_retrain"]
    local = timings["embedded_pipeline"] + timings["embedded_retrain"]
    print(
        "wall (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
        + f"; scale-out pipeline + retrain {scale:.0f} vs embedded {local:.0f} ({scale / local:.2f}x)"
    )
    (tmp_path.parent / "scale-out-timings.json").write_text(json.dumps(timings, indent=2))
