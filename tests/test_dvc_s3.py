"""DVC's default remote on an S3-compatible store (moto's server on 127.0.0.1; slow, minutes).

A project whose only DVC remote is `s3://` runs the retrain flow (the new data it takes in is
pushed by the flow itself), then takes in a second data version; `dvc push --all-commits` sends
every data version and cached output of every commit. A second clone with an empty cache then
gets the champion's data version back from the remote alone: its commit is found from the
registered version's lineage (`lineage/dvc.lock`), `dvc pull` fetches it, and the files' md5s are
the ones the lock and the registry recorded.

Credentials are fake and given through the environment only (AWS_ACCESS_KEY_ID, ...): neither
`.dvc/config` nor anything in git holds them.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, init_repo, make_rows, tool_env
from tests.services import S3_ENV, s3_keys, s3_server
from tests.test_end_to_end import tiny_params

DVC_BUCKET = "tunery-dvc"


def sh(root: Path, *argv: str) -> str:
    done = subprocess.run(argv, cwd=root, env=tool_env(root), capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(argv)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def dvc(root: Path, *argv: str) -> str:
    return sh(root, sys.executable, "-m", "dvc", *argv)


def commit(root: Path, message: str) -> str:
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-q", "-m", message)
    return sh(root, "git", "rev-parse", "HEAD").strip()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def lock_outs(lock: dict) -> dict[str, str]:
    """path -> md5 of every stage output in a dvc.lock."""
    return {
        out["path"]: out["md5"]
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
    }


@pytest.mark.slow
def test_dvc_remote_on_s3_push_then_pull_the_champion_into_an_empty_clone(
    project, tmp_path, monkeypatch
):
    pytest.importorskip("dvc_s3", reason="dvc-s3 (dev extra) not installed")
    from mlflow.tracking import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline_flow
    from flows.retrain import retrain_flow
    from tunery import tracking

    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    # s3fs (DVC's S3 filesystem) wants these to be files, not /dev/null: empty ones
    empty = tmp_path / "aws-empty"
    empty.touch()
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    with s3_server(tmp_path, buckets=(DVC_BUCKET,)) as endpoint:
        init_repo(project)
        shutil.copy(REPO / ".gitignore", project / ".gitignore")
        # The S3 remote replaces the local folder: the URL and endpoint in .dvc/config (in git),
        # the credentials in the environment only.
        dvc(project, "remote", "remove", "local")
        dvc(project, "remote", "add", "-d", "s3", f"s3://{DVC_BUCKET}/store")
        dvc(project, "remote", "modify", "s3", "endpointurl", endpoint)
        tiny_params(project)
        config = (project / ".dvc" / "config").read_text()
        assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in config
        assert S3_ENV["AWS_ACCESS_KEY_ID"] not in config
        commit(project, "project")
        monkeypatch.chdir(project)

        with prefect_test_harness(server_startup_timeout=120):
            # data version 1: the base data and a first landed file (pushed by the flow), trained
            landing = project / "data" / "landing"
            landing.mkdir()
            make_rows(6, offset=700).to_csv(landing / "week1.csv", index=False)
            first = retrain_flow(project=str(project))
            assert first["status"] == "retrained" and first["registry"]["promoted"], first
            champion_commit = commit(project, "run 1")
            # data version 2: taken in and prepared, not trained
            make_rows(6, offset=800).to_csv(landing / "week2.csv", index=False)
            from tunery import retrain
            from tunery.config import load_params

            params = load_params(project / "params.yaml")
            retrain.take_in(project, params, retrain.landing_files(project, params))
            pipeline_flow(project=str(project), stages=["ingest", "prepare", "corpus"])
            commit(project, "data version 2")

        pushed = dvc(project, "push", "--all-commits")
        status = dvc(project, "status", "--cloud", "--all-commits")
        assert "in sync" in status, status
        keys = s3_keys(endpoint, "store/", bucket=DVC_BUCKET)
        print(f"dvc push --all-commits: {pushed.strip().splitlines()[-1]}; {len(keys)} objects")
        assert keys

        # the champion's data version, and its lineage, from the registry
        version = tracking.alias_version(project, "tunery-classifier", "champion")
        info = tracking.version_info(project, "tunery-classifier", version)
        data_version = info["tags"]["data_version"]
        lineage = Path(
            MlflowClient(tracking.tracking_uri(project)).download_artifacts(
                info["run_id"], "lineage/dvc.lock", str(tmp_path / "lineage")
            )
        )
        champion_lock = yaml.safe_load(lineage.read_text())
        assert lock_outs(champion_lock)["data/raw/labelled.parquet"] == data_version
        head_lock = yaml.safe_load((project / "dvc.lock").read_text())
        assert lock_outs(head_lock)["data/raw/labelled.parquet"] != data_version  # moved on

        # a second clone, empty cache, nothing but git and the S3 remote
        clone = tmp_path / "clone"
        sh(tmp_path, "git", "clone", "-q", str(project), str(clone))
        assert not (clone / ".dvc" / "cache").exists()
        found = [
            c
            for c in sh(clone, "git", "log", "--format=%H", "--", "dvc.lock").split()
            if sh(clone, "git", "show", f"{c}:dvc.lock") == lineage.read_text()
        ]
        assert found == [champion_commit]
        sh(clone, "git", "checkout", "-q", champion_commit)
        dvc(clone, "pull")
        for path, digest in lock_outs(champion_lock).items():
            target = clone / path
            assert target.exists(), path
            if target.is_file():
                assert md5(target) == digest, path
        assert md5(clone / "data" / "raw" / "labelled.parquet") == data_version
        assert "up to date" in dvc(clone, "status"), "every output matches the champion's lock"
        # the incoming file of data version 1 came back too; version 2's is not in this commit
        assert (clone / "data" / "incoming" / "week1.csv").is_file()
        assert not (clone / "data" / "incoming" / "week2.csv.dvc").exists()
