"""The MLflow wrapper: the only module that imports `mlflow`.

Embedded default: a sqlite store (`mlflow.db`) and an artifact folder (`mlartifacts/`) inside the
project. `MLFLOW_TRACKING_URI` points the same code at a tracking server instead.

A pipeline run is a parent MLflow run; every stage runs in a child run named after the stage. The
parent's id travels to stage processes (started by DVC) through `TUNERY_PARENT_RUN_ID`, so the
hierarchy holds across processes.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

PARENT_ENV = "TUNERY_PARENT_RUN_ID"
DB_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / DB_FILE).resolve()}"


def setup(root: Path, experiment: str) -> str:
    """Point MLflow at the project's store and make sure the experiment exists; return its id."""
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri)
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
    mlflow.set_experiment(experiment_id=exp_id)
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
            mlflow.log_params(dict(items[i : i + 100]))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        numeric = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if numeric:
            mlflow.log_metrics(numeric, step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        mlflow.log_dict(dict(data), name)

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
        MlflowClient().log_inputs(
            self.run_id,
            datasets=[
                DatasetInput(
                    dataset=dataset, tags=[InputTag(key="mlflow.data.context", value=context)]
                )
            ],
        )


@contextlib.contextmanager
def stage_run(root: Path, experiment: str, stage: str, params: Mapping[str, Any]) -> Iterator[Run]:
    """An MLflow run named after `stage`, a child of the pipeline run when one is active."""
    setup(root, experiment)
    parent = os.environ.get(PARENT_ENV) or None
    nested = mlflow.active_run() is not None  # a stage called in-process inside the pipeline run
    with mlflow.start_run(
        run_name=stage, parent_run_id=parent, nested=nested, tags={"tunery.stage": stage}
    ) as active:
        run = Run(active)
        run.log_params(flatten_params(stage, params))
        yield run


@contextlib.contextmanager
def pipeline_run(
    root: Path, experiment: str, name: str = "pipeline", tags: Mapping[str, Any] | None = None
) -> Iterator[Run]:
    """A parent run; stage processes started inside it (e.g. by `dvc repro`) become its children."""
    setup(root, experiment)
    with mlflow.start_run(
        run_name=name,
        tags={"tunery.stage": "pipeline", **{k: str(v) for k, v in (tags or {}).items()}},
    ) as active:
        previous = os.environ.get(PARENT_ENV)
        os.environ[PARENT_ENV] = active.info.run_id
        try:
            yield Run(active)
        finally:
            if previous is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = previous


def child_runs(root: Path, experiment: str, parent_run_id: str) -> list[dict[str, Any]]:
    """Stage runs under a parent run: name, status, metrics (for summaries and tests)."""
    setup(root, experiment)
    runs = MlflowClient().search_runs(
        [mlflow.get_experiment_by_name(experiment).experiment_id],
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
DEPLOY_ARTIFACT = "deploy"
PROMOTIONS_SUFFIX = "-promotions"


def _client(root: Path) -> MlflowClient:
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri, registry_uri=uri)


def _pip_requirements() -> list[str]:
    from importlib import metadata

    reqs = []
    for dist in ("onnxruntime-gpu", "onnxruntime", "tokenizers", "numpy"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return reqs


def register_onnx(
    run: Run,
    deploy_dir: Path,
    name: str,
    *,
    tags: Mapping[str, Any] | None = None,
    extras: Mapping[str, Path] | None = None,
) -> str:
    """Log a deployable ONNX folder with the `mlflow.onnx` flavor and register it as a new version.

    The tokenizer, label map and metadata files beside `model.onnx` travel inside the MLflow model
    folder, so `models:/NAME@alias` alone is enough to predict; `extras` folders travel as
    subfolders. Explicit pip requirements: no
    environment inference, no pickle. Returns the new version number.
    """
    import shutil
    import tempfile

    import mlflow.onnx
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / DEPLOY_ARTIFACT
        mlflow.onnx.save_model(
            onnx.load(str(deploy_dir / "model.onnx")),
            str(model_dir),
            pip_requirements=_pip_requirements(),
        )
        # Keep the exact bytes the pipeline checked: its manifest pins their sha256.
        shutil.copyfile(deploy_dir / "model.onnx", model_dir / "model.onnx")
        for item in deploy_dir.iterdir():
            if item.name != "model.onnx" and not (model_dir / item.name).exists():
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, model_dir / item.name)
        for sub, folder in (extras or {}).items():  # e.g. the adapter, for warm starts
            shutil.copytree(folder, model_dir / sub)
        mlflow.log_artifacts(str(model_dir), artifact_path=DEPLOY_ARTIFACT)
    version = mlflow.register_model(
        f"runs:/{run.run_id}/{DEPLOY_ARTIFACT}",
        name,
        tags={k: str(v) for k, v in (tags or {}).items()},
    )
    return str(version.version)


def alias_version(root: Path, name: str, alias: str) -> str | None:
    """The version behind `name@alias`, or None when the model or alias does not exist."""
    client = _client(root)
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


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
    except mlflow.exceptions.MlflowException:
        return []
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
    """Download a registered model (`models:/NAME@alias` or `models:/NAME/VERSION`) into `dst`."""
    _client(root)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))


def run_tags(run_id: str) -> dict[str, str]:
    return dict(MlflowClient().get_run(run_id).data.tags)
