"""The `pipeline` flow: every dvc.yaml stage as a Prefect task, then the registry gate.

DVC remains the DAG and decides what is stale (`dvc repro --single-item`, stage by stage in
dvc.yaml order); Prefect adds retries, timeouts, streamed logs, a UI and a summary artifact.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as prefect_flow_run

from tunery import env, run_summary, screen
from tunery.config import load_params
from tunery.errors import TuneryError
from tunery.runner import steps as pipeline


class _NamedErrorsWithoutTraceback(logging.Filter):
    """Prefect logs a failed task and flow run with the exception's traceback (~60 lines of the
    engine's frames). A TuneryError is a message meant for the user, which the CLI prints last as
    `tunery: error: ...`: its traceback only buries it, so the record keeps its text, not the frames."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TuneryError):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_named_errors() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NamedErrorsWithoutTraceback) for f in logger.filters):
            logger.addFilter(_NamedErrorsWithoutTraceback())


_quiet_named_errors()


def _retry_unless_user_error(task, task_run, state) -> bool:
    """Retry a stage unless re-running cannot help: bad input, or an MLflow server that went away
    while the stage ran (DVC has its outputs then, and a retry would skip the stage and report
    success with its tracking run left unfinished: the flow stops and names the server instead)."""
    from tunery.tracking import StoreUnreachable

    exc = state.result(raise_on_failure=False)
    if isinstance(exc, StoreUnreachable):
        return False
    if isinstance(exc, pipeline.StageFailed):
        return not (exc.user_error or exc.named)
    return True


@task(
    name="stage",
    task_run_name="{stage}",
    cache_policy=NO_CACHE,
    retry_condition_fn=_retry_unless_user_error,
)
def run_stage(stage: str, root: str, experiment: str, force: bool = False) -> dict[str, Any]:
    logger = get_run_logger()
    start = time.perf_counter()
    timing = pipeline.run_stage(
        Path(root),
        stage,
        experiment=experiment,
        force=force,
        on_line=lambda line: logger.info(line.rstrip()) if screen.shown(line) else None,
    )
    logger.info("stage %s %s", stage, "ran" if timing.ran else "was up to date (skipped by DVC)")
    return dataclasses.asdict(timing) | {"attempt_seconds": time.perf_counter() - start}


@task(name="register-and-gate", cache_policy=NO_CACHE)
def register_and_gate(root: str, run: Any) -> dict[str, Any]:
    from tunery.registry.registration import register_and_gate as step

    return step(Path(root), load_params(Path(root) / "params.yaml"), run)


def _summary(
    results: list[dict[str, Any]],
    registry: dict[str, Any] | None,
    timing: dict[str, float],
    run_id: str,
    uri: str,
    end: dict[str, Any],
) -> str:
    """The flow's Prefect artifact: the stages' times, then the end of the run (run_summary)."""
    lines = [
        "# Tunery pipeline",
        "",
        f"MLflow parent run `{run_id}` (store `{uri}`; open it with `tunery ui`).",
        "",
        "| stage | ran | stage s | process s | dvc s | tracking s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['stage']} | {'yes' if r['ran'] else 'up to date'} | {r['seconds']:.1f} "
        f"| {r['process']:.1f} | {r['dvc']:.1f} | {r['tracking']:.1f} |"
        for r in results
    ]
    lines += [
        "",
        f"**Wall time** {timing['wall_seconds']:.1f} s, of which the stage processes "
        f"{timing['stage_seconds']:.1f} s and orchestration + tracking "
        f"{timing['overhead_seconds']:.1f} s ({100 * timing['overhead_share']:.1f} %: "
        f"DVC {timing['dvc_seconds']:.1f} s, MLflow {timing['tracking_seconds']:.1f} s, "
        f"Prefect and the rest {timing['other_seconds']:.1f} s).",
    ]
    if registry:
        lines += ["", f"**Registry:** {registry.get('summary', '')}"]
    lines += ["", run_summary.markdown(end)]
    return "\n".join(lines)


def _timed(stage_task: Any, stage: str, *args: Any) -> dict[str, Any]:
    """One stage through its task; the time of attempts that failed before the one that counted
    (a timeout, a transient error retried) is kept apart, as it is neither stage nor overhead."""
    t0 = time.perf_counter()
    result = stage_task(stage, *args)
    failed = time.perf_counter() - t0 - result.pop("attempt_seconds", 0.0)
    return result | {"failed_attempts_seconds": max(failed, 0.0) if failed > 1.0 else 0.0}


def overhead(
    results: list[dict[str, Any]], *, wall: float, tracking_seconds: float
) -> dict[str, float]:
    """Orchestration and tracking overhead: wall time not spent inside the stage processes (nor in
    stage attempts that failed and were retried)."""
    stage = sum(r["process"] for r in results)
    dvc = sum(r["dvc"] for r in results)
    tracked = tracking_seconds + sum(r["tracking"] for r in results)
    failed = sum(r.get("failed_attempts_seconds", 0.0) for r in results)
    spent = max(wall - stage - failed, 0.0)
    return {
        "wall_seconds": round(wall, 2),
        "stage_seconds": round(stage, 2),
        "failed_attempts_seconds": round(failed, 2),
        "overhead_seconds": round(spent, 2),
        "overhead_share": round(spent / wall, 4) if wall > 0 else 0.0,
        "dvc_seconds": round(dvc, 2),
        "tracking_seconds": round(tracked, 2),
        "other_seconds": round(max(spent - dvc - tracked, 0.0), 2),
    }


@flow(name="tunery-pipeline")
def pipeline_flow(
    project: str | None = None,
    stages: list[str] | None = None,
    force: bool = False,
    started_at: float | None = None,
) -> dict[str, Any]:
    """Run the dvc.yaml stages as tasks under one MLflow parent run, then register and gate.

    `started_at` (epoch seconds) is when the caller started, for the overhead measurement; by
    default the flow's own start."""
    from tunery import tracking

    wall_start = time.time() if started_at is None else started_at
    logger = get_run_logger()
    root = env.configure(Path(project) if project else None)
    params = load_params(root / "params.yaml")
    names = stages or pipeline.stage_names(root)
    stage_task = run_stage.with_options(
        retries=params.pipeline.retries,
        retry_delay_seconds=params.pipeline.retry_delay_seconds,
        timeout_seconds=params.pipeline.stage_timeout_seconds,
    )
    experiment = params.tracking.experiment
    t0 = time.perf_counter()
    # The DVC worker imports DVC while MLflow opens the parent run.
    with pipeline.dvc_worker(root), tracking.pipeline_run(root, experiment) as run:
        tracked = time.perf_counter() - t0
        logger.info("MLflow parent run %s at %s", run.run_id, tracking.tracking_uri(root))
        results = [_timed(stage_task, stage, str(root), experiment, force) for stage in names]
        t0 = time.perf_counter()
        pipeline.log_lineage(root, run, f"{params.ingest.out_dir}/labelled.parquet")
        registry = (
            register_and_gate(str(root), run)
            if params.pipeline.register_model and stages is None
            else None
        )
        tracked += time.perf_counter() - t0  # lineage, registration and the gate
        timing = overhead(results, wall=time.time() - wall_start, tracking_seconds=tracked)
        run.log_metrics({"stages_ran": sum(r["ran"] for r in results)})
        run.log_metrics({f"timing.{k}": v for k, v in timing.items()})
    logger.info(
        "orchestration + tracking overhead %.1f s of %.1f s (%.1f %%)",
        timing["overhead_seconds"],
        timing["wall_seconds"],
        100 * timing["overhead_share"],
    )
    out = {
        "run_id": run.run_id,
        "flow_run_id": str(prefect_flow_run.id),
        "stages": results,
        "registry": registry,
        "timing": timing,
    }
    end = run_summary.build(root, params, out, partial=stages is not None)
    create_markdown_artifact(
        _summary(results, registry, timing, run.run_id, tracking.tracking_uri(root), end),
        key="tunery-pipeline",
    )
    return out
