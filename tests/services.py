"""Services the slow tests start for themselves, each bound to 127.0.0.1 on a free port and
stopped in teardown with its whole process group: PostgreSQL (Debian's binaries), an S3-compatible
store (moto's server mode), and the `Proc` helper the MLflow and Prefect servers run under.

Credentials are fake ones for the local stand-ins, given through the environment only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
BUCKET = "tunery-artifacts"
S3_ENV = {
    # Fake credentials for the local S3 stand-in; a real setup exports its own the same way.
    "AWS_ACCESS_KEY_ID": "tunery-test",
    "AWS_SECRET_ACCESS_KEY": "tunery-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no background job runner process
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


# --------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A background process in its own process group, its output in a log file."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str], **kw) -> None:
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(
            argv, stdout=self._out, stderr=subprocess.STDOUT, env=env, start_new_session=True, **kw
        )

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        # Descendants that started a session of their own (a Prefect worker's flow runs, a
        # stage's children) are outside the group: collect them first, kill what is left after.
        import psutil

        try:
            descendants = psutil.Process(self.p.pid).children(recursive=True)
        except psutil.Error:
            descendants = []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.p.pid, sig)
        try:
            self.p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(timeout=15)
        # uvicorn's worker and postgres' backends share the group: make sure none is left
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.p.pid, signal.SIGKILL)
        for child in descendants:
            with contextlib.suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(descendants, timeout=15)
        self._out.close()


def wait_until(ready, proc: Proc, what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            pytest.fail(f"{what} exited with {proc.p.returncode}:\n{proc.tail()}")
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(0.25)
    pytest.fail(f"{what} not ready after {timeout:.0f} s:\n{proc.tail()}")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


# --------------------------------------------------------------------------- PostgreSQL and S3
INITDB_ARGS = ["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"]
POSTGRES_ARGS = ["-h", "127.0.0.1", "-k", ".", "-c", "fsync=off", "-c", "full_page_writes=off"]


def _pg_binaries() -> tuple[Path, Path] | None:
    found = shutil.which("initdb"), shutil.which("postgres")
    if all(found):
        return Path(found[0]), Path(found[1])
    for bindir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir / "initdb", bindir / "postgres"
    return None


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1; yields its `postgresql://` URL."""
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2-binary (dev extra) not installed")
    binaries = _pg_binaries()
    if binaries is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, postgres) not found: apt-get install postgresql"
        )
    initdb, postgres = binaries
    as_user: list[str] = []
    # The cluster lives outside pytest's tmp folders: those are private to root, and PostgreSQL
    # refuses to run as root, so as root it runs as the `postgres` user in a folder it owns.
    base = Path(tempfile.mkdtemp(prefix="tunery-pg-"))
    if os.geteuid() == 0:
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base)
            pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
        os.chown(base, user.pw_uid, user.pw_gid)
        as_user = [shutil.which("runuser") or "/usr/sbin/runuser", "-u", "postgres", "--"]
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    proc = None
    try:
        subprocess.run(
            [*as_user, str(initdb), "-D", str(base / "data"), *INITDB_ARGS],
            check=True,
            capture_output=True,
            env=env,
            cwd=base,
        )
        port = free_port()
        proc = Proc(
            [*as_user, str(postgres), "-D", str(base / "data"), "-p", str(port), *POSTGRES_ARGS],
            base.parent / f"{base.name}.log",
            env,
            cwd=base,
        )

        def connect():
            conn = psycopg2.connect(
                host="127.0.0.1", port=port, user="postgres", dbname="postgres", connect_timeout=2
            )
            conn.autocommit = True
            return conn

        wait_until(lambda: connect().close() or True, proc, "postgres", timeout=60)
        conn = connect()
        conn.cursor().execute("CREATE DATABASE mlflow")
        conn.close()
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        if proc is not None:
            proc.stop(signal.SIGINT)  # PostgreSQL's "fast" shutdown
            with contextlib.suppress(OSError):
                proc.log.unlink()
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def s3_server(workdir: Path, buckets: tuple[str, ...] = (BUCKET,)) -> Iterator[str]:
    """moto's S3-compatible server on 127.0.0.1 with empty buckets; yields its endpoint URL."""
    pytest.importorskip("moto", reason="moto (dev extra) not installed")
    boto3 = pytest.importorskip("boto3", reason="boto3 (dev extra, with moto) not installed")
    port = free_port()
    proc = Proc(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        workdir / "moto.log",
        {**os.environ, **QUIET_ENV},
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{endpoint}/moto-api/"), proc, "moto server", timeout=60)
        s3 = boto3.client("s3", endpoint_url=endpoint, **_boto_creds())
        for bucket in buckets:
            s3.create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        proc.stop()


def _boto_creds() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_ENV["AWS_DEFAULT_REGION"],
    }


def s3_keys(endpoint: str, prefix: str, bucket: str = BUCKET) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, **_boto_creds())
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


# --------------------------------------------------------------------------- MLflow and Prefect servers
@contextlib.contextmanager
def mlflow_server(
    work: Path,
    backend: str,
    artifacts: str,
    env: dict[str, str] | None = None,
    port: int | None = None,
) -> Iterator[tuple[str, Proc]]:
    """`mlflow server` on 127.0.0.1 with proxied artifacts; yields its URI and process. `port`:
    a given one (a server restarted where its clients expect it), else a free one."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    environ.update(QUIET_ENV, **(env or {}))
    port = port or free_port()
    proc = Proc(
        [
            str(BIN / "mlflow"),
            "server",
            *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
            *("--backend-store-uri", backend),
            *("--serve-artifacts", "--artifacts-destination", artifacts),
        ],
        work / f"mlflow-server-{time.monotonic_ns()}.log",
        environ,
        cwd=work,
    )
    try:
        uri = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        wait_until(lambda: http_ok(f"{uri}/health"), proc, "mlflow server")
        print(f"mlflow server up in {time.monotonic() - started:.1f} s")
        yield uri, proc
    finally:
        proc.stop()


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
def prefect_server(work: Path, **extra: str):
    """`prefect server start` on 127.0.0.1 with its own home and sqlite database; yields the API
    URL and the process. `extra`: more of the server's settings (PREFECT_SERVER_API_AUTH_STRING)."""
    port = free_port()
    home = work / "server-home"
    env = prefect_env("", home, **extra)
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


FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def wait_flow_run(api: str, run_id: str, procs: list[Proc], timeout: float) -> dict:
    """Poll a flow run until it is final; fail at once when one of `procs` dies."""
    deadline = time.monotonic() + timeout
    while True:
        run = api_get(api, f"flow_runs/{run_id}")
        if run["state"]["type"] in FINAL:
            return run
        for proc in procs:
            if not proc.alive():
                pytest.fail(f"{proc.log.name}: exited\n{proc.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"flow run {run_id} not done after {timeout:.0f} s: {run['state']}")
        time.sleep(1.0)


def aws_env(folder: Path) -> dict[str, str]:
    """S3_ENV with empty AWS config files in `folder` (s3fs, DVC's S3 filesystem, wants real files
    where botocore takes /dev/null)."""
    empty = folder / "aws-empty"
    empty.touch()
    return {**S3_ENV, "AWS_CONFIG_FILE": str(empty), "AWS_SHARED_CREDENTIALS_FILE": str(empty)}
