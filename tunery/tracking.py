"""The MLflow wrapper: the only module that imports `mlflow`.

Embedded default: a sqlite store (`mlflow.db`) and an artifact folder (`mlartifacts/`) inside the
project. `MLFLOW_TRACKING_URI` points the same code at a tracking server instead.

A pipeline run is a parent MLflow run; every stage runs in a child run named after the stage. The
parent's id travels to stage processes (started by DVC) through `TUNERY_PARENT_RUN_ID`, so the
hierarchy holds across processes.

Nothing here assumes a local store: artifact URIs may be `file:`, `mlflow-artifacts:` (a server
proxying its artifact store) or `s3:`, and every read goes through MLflow. Concurrent writers to the
embedded sqlite store (two pipeline runs, or a pipeline and `tunery promote`): the first use of the
store in each process creates/migrates it under an inter-process file lock beside the database
(`mlflow.db-tunery.lock`), and every store call is retried with backoff when sqlite still answers
"database is locked" after MLflow's own 20 s busy timeout. A tracking server needs neither.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow.tracking import MlflowClient

from tunery import env
from tunery.errors import TuneryError

log = logging.getLogger("tunery.tracking")

PARENT_ENV = "TUNERY_PARENT_RUN_ID"
DB_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
STORE_LOCK_SUFFIX = "-tunery.lock"  # beside the sqlite file: mlflow.db-tunery.lock


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / DB_FILE).resolve()}"


def registry_uri(root: Path) -> str:
    """The model registry: `MLFLOW_REGISTRY_URI` when set, else the tracking store."""
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri(root)


# --------------------------------------------------------------------------- concurrent writers
T = TypeVar("T")
LOCK_RETRIES = 8
LOCK_BACKOFF_S = 0.25
LOCK_BACKOFF_MAX_S = 5.0
_LOCKED = re.compile(r"database (table )?is locked", re.IGNORECASE)


def is_locked_error(exc: BaseException) -> bool:
    """sqlite's "database is locked", however MLflow or SQLAlchemy wrapped it."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _LOCKED.search(str(current)):
            return True
        current = current.__cause__  # MLflow/SQLAlchemy wrap the sqlite error as the cause
    return False


# --------------------------------------------------------------------------- a server that went away
class StoreUnreachable(TuneryError):
    """The MLflow server stopped answering during a call (down, restarting, network gone), after
    MLflow's own retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES, ..._BACKOFF_FACTOR: ~2 min by default)."""

    def __init__(self, server: str, call: str, detail: str) -> None:
        self.server, self.call = server, call
        super().__init__(
            f"the MLflow server at {server} stopped answering ({call}: {detail}). What was written "
            "before stays as it was, and no alias moved without its decision in the promotion "
            "log. When `tunery check` says it answers again, re-run (`tunery run`): DVC skips the "
            "stages that finished, and registration picks up the version it left ungated"
        )


# MLflow's REST client words a transport failure (refused, reset, timed out, after its retries)
# so, and only so; an HTTP error status reads "failed with error code N".
_UNREACHABLE = re.compile(r"API request to (\S+?) failed with (?:timeout )?exception (.*)", re.S)


def unreachable(exc: BaseException, call: str) -> StoreUnreachable | None:
    """`exc` as a StoreUnreachable when it says the MLflow server did not answer, else None."""
    if isinstance(exc, StoreUnreachable):
        return exc
    found = _UNREACHABLE.search(str(exc)) if isinstance(exc, mlflow.MlflowException) else None
    if found is None:
        return None
    url, detail = found.groups()
    parts = url.split("/", 3)
    server = "/".join(parts[:3]) if len(parts) >= 3 else url  # scheme://host:port
    reason = re.search(
        r"(Connection refused|Connection aborted|Read timed out|timed out|"
        r"Remote end closed connection|Connection reset)",
        detail,
    )
    return StoreUnreachable(server, call, reason.group(1) if reason else detail[:200])


@contextlib.contextmanager
def store_errors(call: str) -> Iterator[None]:
    """Inside the block, MLflow's "the server did not answer" becomes a StoreUnreachable."""
    try:
        yield
    except mlflow.MlflowException as exc:
        named = unreachable(exc, call)
        if named is None:
            raise
        raise named from exc


def retry_locked(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call `fn`, retrying with jittered exponential backoff while the store says it is locked.

    Safe for writes: a locked sqlite transaction is rolled back whole, so a retry never doubles.
    A server that does not answer is a StoreUnreachable (MLflow has retried already).
    """
    delay = LOCK_BACKOFF_S
    for attempt in range(1, LOCK_RETRIES + 1):
        try:
            with store_errors(getattr(fn, "__name__", "call")):
                return fn(*args, **kwargs)
        except Exception as exc:
            if attempt == LOCK_RETRIES or not is_locked_error(exc):
                raise
            wait = delay * (1 + random.random())
            log.warning(
                "%s: the MLflow store is locked by another writer; retry %d/%d in %.1f s",
                getattr(fn, "__name__", "call"),
                attempt,
                LOCK_RETRIES - 1,
                wait,
            )
            time.sleep(wait)
            delay = min(delay * 2, LOCK_BACKOFF_MAX_S)
    raise AssertionError("unreachable")


class _RetryingClient:
    """An `MlflowClient` whose every call goes through `retry_locked`."""

    def __init__(self, client: MlflowClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        return functools.wraps(attr)(functools.partial(retry_locked, attr))


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH` store URI; None for anything else."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


_PREPARED: set[str] = set()


def _prepare_store(uri: str) -> None:
    """Create or migrate an embedded sqlite store once per process, one process at a time.

    Two processes creating a fresh store at once would both run MLflow's schema migrations and
    one would fail ("duplicate column"); the file lock makes the second wait and find it done.
    """
    if uri in _PREPARED:
        return
    db = sqlite_file(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db.with_name(db.name + STORE_LOCK_SUFFIX), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                client = MlflowClient(uri, registry_uri=uri)
                retry_locked(client.search_experiments, max_results=1)
                retry_locked(client.search_registered_models, max_results=1)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    _PREPARED.add(uri)


_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def _connect(root: Path) -> tuple[str, str]:
    """Point MLflow (tracking and registry) at the project's store, prepared; return both URIs.

    `mlflow.set_tracking_uri`/`set_registry_uri` also export MLFLOW_TRACKING_URI/REGISTRY_URI
    into this process's environment; those are put back as they were, so only a URI the user set
    counts as "the user's choice" (another project's store in the same process, or the next test,
    must not inherit this one's).
    """
    uri, reg = tracking_uri(root), registry_uri(root)
    for each in {uri, reg}:
        _prepare_store(each)
    with env.restored(_URI_VARS):
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(reg)
    return uri, reg


def setup(root: Path, experiment: str) -> str:
    """Point MLflow at the project's store and make sure the experiment exists; return its id."""
    uri, reg = _connect(root)
    client = _RetryingClient(MlflowClient(uri, registry_uri=reg))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        # With a sqlite store the default artifact root is ./mlruns relative to the *cwd*; pin it
        # inside the project unless a server decides where artifacts go.
        location = None
        if uri.startswith("sqlite:"):
            location = (root / ARTIFACT_DIR).resolve().as_uri()
        try:
            exp_id = client.create_experiment(experiment, artifact_location=location)
        except mlflow.exceptions.MlflowException:
            # Another process created it between our lookup and create.
            exp_id = client.get_experiment_by_name(experiment).experiment_id
    else:
        exp_id = exp.experiment_id
    retry_locked(mlflow.set_experiment, experiment_id=exp_id)
    return exp_id


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = (
            value
            if isinstance(value, (int, float, str, bool)) or value is None
            else json.dumps(value)
        )


def flatten_params(section: str, values: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _flatten(section, values, out)
    return out


class Run:
    """A handle on the active MLflow run that stage code logs through."""

    def __init__(self, run: mlflow.ActiveRun) -> None:
        self._run = run

    @property
    def run_id(self) -> str:
        return self._run.info.run_id

    @property
    def artifact_uri(self) -> str:
        return self._run.info.artifact_uri

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            retry_locked(mlflow.log_params, dict(items[i : i + 100]))

    def log_metrics(
        self, metrics: Mapping[str, float], step: int | None = None, timestamp: int | None = None
    ) -> None:
        """`timestamp` (epoch ms): when the value was measured, if not now (streamed stages)."""
        numeric = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if numeric:
            retry_locked(
                mlflow.log_metrics, numeric, step=step, timestamp=timestamp, run_id=self.run_id
            )

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        retry_locked(mlflow.set_tags, {k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        with store_errors("log_artifact"):
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=artifact_path)
            else:
                mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        with store_errors("log_dict"):
            mlflow.log_dict(dict(data), name)

    def log_model_folder(
        self, kind: str, path: str | Path, *, metrics: Mapping[str, float] | None = None
    ) -> str:
        """A stage's model folder as a LoggedModel of this run (see `tunery.mlflow_model`)."""
        from tunery import mlflow_model  # the model side of MLflow; imports this module

        model_id = mlflow_model.log_output(
            kind, Path(path), run_id=self.run_id, experiment_id=self._run.info.experiment_id
        )
        mlflow_model.link_metrics(self.run_id, model_id, metrics or {})
        return model_id

    def log_deployable(
        self,
        path: str | Path,
        *,
        finetune_dir: str | Path | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> str:
        """The deployable folder as this run's text-in pyfunc LoggedModel; its model id."""
        from tunery import mlflow_model

        model_id = mlflow_model.log_deployable(
            Path(path),
            run_id=self.run_id,
            experiment_id=self._run.info.experiment_id,
            finetune_dir=Path(finetune_dir) if finetune_dir else None,
        )
        mlflow_model.link_metrics(self.run_id, model_id, metrics or {})
        return model_id

    def log_dataset(
        self, *, name: str, digest: str, source: str, context: str, profile: Mapping[str, Any]
    ) -> None:
        """Record a data version (its DVC hash as digest) as an input of this run."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(
            name=name,
            digest=digest,
            source_type="dvc",
            source=json.dumps({"path": source, "md5": digest}),
            profile=json.dumps(dict(profile)),
        )
        _RetryingClient(MlflowClient()).log_inputs(
            self.run_id,
            datasets=[
                DatasetInput(
                    dataset=dataset, tags=[InputTag(key="mlflow.data.context", value=context)]
                )
            ],
        )


@contextlib.contextmanager
def _active_run(**start: Any) -> Iterator[mlflow.ActiveRun]:
    """`mlflow.start_run(**start)` as a context, its start and end retried on a locked store.

    The end is recorded with the retried `set_terminated` first: `mlflow.end_run` pops the run
    before it writes, so retrying `end_run` itself could end the parent run instead. When the
    block failed because the server went away, the end is not written (that would wait out
    MLflow's retries again, and hide the error): the run stays RUNNING there, and the process's
    run stack is popped all the same.
    """
    active = retry_locked(mlflow.start_run, **start)
    run_id = active.info.run_id
    try:
        with store_errors(f"in the run {start.get('run_name') or run_id}"):
            yield active
    except BaseException as exc:
        if unreachable(exc, "") is None:
            _end_run(run_id, "FAILED")
        else:
            _pop_unreachable(run_id)
        raise
    _end_run(run_id, "FINISHED")


def _end_run(run_id: str, status: str) -> None:
    retry_locked(MlflowClient().set_terminated, run_id, status)
    _pop_run(run_id, status)


def _pop_run(run_id: str, status: str = "FAILED") -> None:
    current = mlflow.active_run()
    if current is not None and current.info.run_id == run_id:
        try:
            mlflow.end_run(status)
        except Exception as exc:  # popped already; its status is recorded (or cannot be)
            if not is_locked_error(exc) and unreachable(exc, "") is None:
                raise


def _pop_unreachable(run_id: str) -> None:
    """Pop the run off this process's run stack when its server is gone: `end_run` still tries
    its write, once and briefly (MLflow reads these settings at each request)."""
    with env.restored(
        (), {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    ):
        _pop_run(run_id)


@contextlib.contextmanager
def stage_run(root: Path, experiment: str, stage: str, params: Mapping[str, Any]) -> Iterator[Run]:
    """An MLflow run named after `stage`, a child of the pipeline run when one is active."""
    setup(root, experiment)
    parent = os.environ.get(PARENT_ENV) or None
    nested = mlflow.active_run() is not None  # a stage called in-process inside the pipeline run
    with _active_run(
        run_name=stage, parent_run_id=parent, nested=nested, tags={"tunery.stage": stage}
    ) as active:
        run = Run(active)
        run.log_params(flatten_params(stage, params))
        yield run


def open_stage_run(
    root: Path, experiment: str, stage: str, params: Mapping[str, Any], *, start: float
) -> Run:
    """A stage's child run started at `start` (epoch s), active in this thread until `close_run`.

    For stages whose calls stream in from another process (tunery/runner/journal.py): the run keeps the
    stage's own start time, not the moment the flow saw its first line.
    """
    exp_id = setup(root, experiment)
    tags = {"tunery.stage": stage, "mlflow.runName": stage}
    parent = os.environ.get(PARENT_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    client = _RetryingClient(MlflowClient())
    created = client.create_run(exp_id, start_time=int(start * 1000), tags=tags, run_name=stage)
    active = retry_locked(mlflow.start_run, run_id=created.info.run_id)
    run = Run(active)
    run.log_params(flatten_params(stage, params))
    return run


def close_run(run: Run, status: str, *, end: float) -> None:
    """End a run opened by `open_stage_run` at the stage's own end time (epoch s)."""
    current = mlflow.active_run()
    if current is not None and current.info.run_id == run.run_id:
        with contextlib.suppress(Exception):  # popped even if its write fails; the next one counts
            mlflow.end_run(status)
    # After end_run, which stamps "now": the run ends when the stage did.
    retry_locked(MlflowClient().set_terminated, run.run_id, status, end_time=int(end * 1000))


@contextlib.contextmanager
def pipeline_run(
    root: Path, experiment: str, name: str = "pipeline", tags: Mapping[str, Any] | None = None
) -> Iterator[Run]:
    """A parent run; stage processes started inside it (e.g. by `dvc repro`) become its children."""
    setup(root, experiment)
    with (
        _active_run(
            run_name=name,
            tags={"tunery.stage": "pipeline", **{k: str(v) for k, v in (tags or {}).items()}},
        ) as active,
        env.restored((), {PARENT_ENV: active.info.run_id}),
    ):
        yield Run(active)


def child_runs(root: Path, experiment: str, parent_run_id: str) -> list[dict[str, Any]]:
    """Stage runs under a parent run: name, status, metrics (for summaries and tests)."""
    exp_id = setup(root, experiment)
    runs = _RetryingClient(MlflowClient()).search_runs(
        [exp_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    return [
        {
            "run_id": r.info.run_id,
            "name": r.info.run_name,
            "status": r.info.status,
            "metrics": r.data.metrics,
        }
        for r in runs
    ]


# --------------------------------------------------------------------------- model registry
PROMOTIONS_SUFFIX = "-promotions"


def _client(root: Path) -> MlflowClient:
    uri, reg = _connect(root)
    return _RetryingClient(MlflowClient(uri, registry_uri=reg))  # type: ignore[return-value]


def _missing(exc: Exception) -> bool:
    """A registry answer meaning "no such model/alias" (anything else is an error to raise)."""
    return getattr(exc, "error_code", None) in (
        "RESOURCE_DOES_NOT_EXIST",
        "INVALID_PARAMETER_VALUE",
    )


def alias_version(root: Path, name: str, alias: str) -> str | None:
    """The version behind `name@alias`, or None when the model or alias does not exist.

    Any other failure (a locked or unreachable store) raises: "no champion" must never be a guess,
    or the gate would judge a challenger as the first model.
    """
    client = _client(root)
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException as exc:
        if _missing(exc):
            return None
        raise


def set_alias(root: Path, name: str, alias: str, version: str) -> None:
    _client(root).set_registered_model_alias(name, alias, str(version))


def tag_version(root: Path, name: str, version: str, tags: Mapping[str, Any]) -> None:
    client = _client(root)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))


def version_info(root: Path, name: str, version: str) -> dict[str, Any]:
    client = _client(root)
    mv = client.get_model_version(name, str(version))
    return {
        "version": str(mv.version),
        "run_id": mv.run_id,
        "source": mv.source,
        "tags": dict(mv.tags),
        "aliases": list(mv.aliases),
        "created": mv.creation_timestamp,
    }


def list_versions(root: Path, name: str) -> list[dict[str, Any]]:
    """Every version of `name`, newest first, with aliases, tags and its run's key metrics."""
    client = _client(root)
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException as exc:
        if _missing(exc):
            return []
        raise
    # search results carry no aliases: take them from the registered model
    by_version: dict[str, list[str]] = {}
    if versions:
        for alias, number in client.get_registered_model(name).aliases.items():
            by_version.setdefault(str(number), []).append(alias)
    out = []
    for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
        metrics = client.get_run(mv.run_id).data.metrics if mv.run_id else {}
        out.append(
            {
                "version": str(mv.version),
                "aliases": sorted(by_version.get(str(mv.version), [])),
                "tags": dict(mv.tags),
                "run_id": mv.run_id,
                "created": mv.creation_timestamp,
                "metrics": metrics,
            }
        )
    return out


def log_decision(root: Path, experiment: str, record: Mapping[str, Any]) -> str:
    """Append one promotion decision to the promotion log: a run in `<experiment>-promotions`.

    Runs are never edited or deleted by Tunery, so the log is append-only and lives wherever the
    tracking store lives (sqlite here, a tracking server when configured).
    """
    exp_id = setup(root, experiment + PROMOTIONS_SUFFIX)
    client = _client(root)
    run = client.create_run(
        exp_id,
        run_name=f"{record['action']} {record.get('to') or '-'}",
        tags={"tunery.action": str(record["action"]), "tunery.model": str(record["model"])},
    )
    flat = flatten_params("", {k: v for k, v in record.items() if k != "metrics"})
    for key, value in flat.items():
        client.log_param(run.info.run_id, key, "" if value is None else value)
    for key, value in (record.get("metrics") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            client.log_metric(run.info.run_id, key, float(value))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def decisions(root: Path, experiment: str, name: str) -> list[dict[str, Any]]:
    """The promotion log of `name`, oldest first."""
    client = _client(root)
    exp = client.get_experiment_by_name(experiment + PROMOTIONS_SUFFIX)
    if exp is None:
        return []
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`tunery.model` = '{name}'",
        order_by=["attributes.start_time ASC"],
        max_results=10000,
    )
    return [
        dict(r.data.params) | {"metrics": dict(r.data.metrics), "time": r.info.start_time}
        for r in runs
    ]


def download_model(root: Path, uri: str, dst: Path) -> Path:
    """Download a registered model (`models:/NAME@alias` or `models:/NAME/VERSION`) into `dst`.

    Works for any artifact store MLflow reaches (local folder, `mlflow-artifacts:` through a
    server, `s3:` with credentials from the environment).
    """
    _client(root)
    return Path(
        retry_locked(mlflow.artifacts.download_artifacts, artifact_uri=uri, dst_path=str(dst))
    )


def store_id(root: Path) -> str:
    """A short, stable id of the registry this project talks to (for per-store local caches)."""
    import hashlib

    return hashlib.sha256(registry_uri(root).encode()).hexdigest()[:12]


def run_tags(run_id: str) -> dict[str, str]:
    return dict(_RetryingClient(MlflowClient()).get_run(run_id).data.tags)
