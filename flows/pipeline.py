"""The `pipeline` flow: every dvc.yaml stage as a Prefect task, then the registry gate.

DVC remains the DAG and decides what is stale (`dvc repro --single-item`, stage by stage in
dvc.yaml order); Prefect adds retries, timeouts, streamed logs, a UI and a summary artifact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tunery import env, pipeline
from tunery.config import load_params


def _retry_unless_user_error(task, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False)
    return not (isinstance(exc, pipeline.StageFailed) and exc.user_error)


@task(
    name="stage",
    task_run_name="{stage}",
    cache_policy=NO_CACHE,
    retry_condition_fn=_retry_unless_user_error,
)
def run_stage(stage: str, root: str, force: bool = False) -> dict[str, Any]:
    logger = get_run_logger()
    ran = pipeline.repro_stage(
        Path(root), stage, force=force, on_line=lambda line: logger.info(line.rstrip())
    )
    metrics_file = Path(root) / "metrics" / f"{stage}.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    logger.info("stage %s %s", stage, "ran" if ran else "was up to date (skipped by DVC)")
    return {"stage": stage, "ran": ran, "seconds": metrics.get("seconds") if ran else 0.0}


@task(name="register-and-gate", cache_policy=NO_CACHE)
def register_and_gate(root: str, run: Any) -> dict[str, Any]:
    from tunery.registration import register_and_gate as step

    return step(Path(root), load_params(Path(root) / "params.yaml"), run)


def _summary(
    results: list[dict[str, Any]], registry: dict[str, Any] | None, run_id: str, uri: str
) -> str:
    lines = [
        "# Tunery pipeline",
        "",
        f"MLflow parent run `{run_id}` (store `{uri}`; open it with `tunery ui`).",
        "",
        "| stage | ran | seconds |",
        "|---|---|---|",
    ]
    lines += [
        f"| {r['stage']} | {'yes' if r['ran'] else 'up to date'} | {r['seconds'] or 0:.1f} |"
        for r in results
    ]
    if registry:
        lines += ["", f"**Registry:** {registry.get('summary', '')}"]
    return "\n".join(lines)


@flow(name="tunery-pipeline")
def pipeline_flow(
    project: str | None = None, stages: list[str] | None = None, force: bool = False
) -> dict[str, Any]:
    """Run the dvc.yaml stages as tasks under one MLflow parent run, then register and gate."""
    from tunery import tracking

    logger = get_run_logger()
    root = env.configure(Path(project) if project else None)
    params = load_params(root / "params.yaml")
    names = stages or pipeline.stage_names(root)
    stage_task = run_stage.with_options(
        retries=params.pipeline.retries,
        retry_delay_seconds=params.pipeline.retry_delay_seconds,
        timeout_seconds=params.pipeline.stage_timeout_seconds,
    )
    with tracking.pipeline_run(root, params.tracking.experiment) as run:
        logger.info("MLflow parent run %s at %s", run.run_id, tracking.tracking_uri(root))
        results = [stage_task(stage, str(root), force) for stage in names]
        pipeline.log_lineage(root, run, f"{params.ingest.out_dir}/labelled.parquet")
        registry = (
            register_and_gate(str(root), run)
            if params.pipeline.register_model and stages is None
            else None
        )
        run.log_metrics({"stages_ran": sum(r["ran"] for r in results)})
    create_markdown_artifact(
        _summary(results, registry, run.run_id, tracking.tracking_uri(root)), key="tunery-pipeline"
    )
    return {"run_id": run.run_id, "stages": results, "registry": registry}
