"""The `retrain` flow: take in new labelled data, re-run what is stale, gate, promote or keep.

With no new data and nothing stale it ends at once with "nothing to do" and trains nothing. The
encoder is re-pretrained only when the `corpus` stage's policy moves the corpus snapshot; DVC skips
`pretrain` otherwise. Scheduled with `tunery schedule` (flow.serve) or deployed with prefect.yaml.

The same flow retrains the image pipeline (`project` its folder, e.g. vision/, whose params say
`modality: image`): the intake, the drift and the gate are the same steps; the pipeline run is
that folder's DVC stages, the last of which (`register`) runs the registry gate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

from flows.pipeline import pipeline_flow
from tunery import env, metrics_files, modality, screen
from tunery.errors import TuneryError
from tunery.runner import landing as retrain


def load_params(path: Path):
    """The project's params, text or image (`modality: image`)."""
    return modality.load_params(path)


@task(name="take-in-new-data", cache_policy=NO_CACHE)
def take_in(root: str) -> list[str]:
    root_path = Path(root)
    params = load_params(root_path / "params.yaml")
    new = retrain.landing_files(root_path, params)
    return [str(p) for p in retrain.take_in(root_path, params, new)]


@task(name="stale-stages", cache_policy=NO_CACHE)
def stale(root: str) -> list[str]:
    return retrain.stale_stages(Path(root))


@task(name="measure-drift", cache_policy=NO_CACHE)
def measure_drift(root: str) -> dict[str, Any] | TuneryError | None:
    """Validate what landed and measure its drift; logged as an MLflow run named `drift`.

    A refused file is returned, not raised: the flow then fails with its one-line message. (A
    raised error is logged with its traceback twice, by the task and by the flow: ~80 lines for
    what is a named file breaking a named rule.)
    """
    root_path = Path(root)
    params = load_params(root_path / "params.yaml")
    new = retrain.landing_files(root_path, params)
    if not new:
        return None
    try:
        items = retrain.check_landed(root_path, params, new)
    except TuneryError as exc:
        return exc
    result = retrain.measure_drift(root_path, params, items)
    if result is not None:
        from tunery import tracking

        config = {"files": [p.name for p in new], **params.retrain.drift.model_dump(mode="json")}
        with tracking.stage_run(root_path, params.tracking.experiment, "drift", config) as run:
            run.log_metrics({f"drift.{k}": v for k, v in result.items()})
    return result


@task(name="image-pipeline", cache_policy=NO_CACHE)
def image_pipeline(root: str) -> dict[str, Any]:
    """The image pipeline folder's DVC stages (tunery/runner/vision.py), its last one the gate."""
    from tunery.runner import vision

    logger = get_run_logger()
    return vision.run(
        Path(root),
        [],
        force=False,
        on_line=lambda line: logger.info(line.rstrip()) if screen.shown(line) else None,
    )


def _run_pipeline(root: Path) -> dict[str, Any]:
    """The project's pipeline: the text flow (stages, then the gate) or the image stages."""
    if modality.is_image(load_params(root / "params.yaml")):
        return image_pipeline(str(root))
    return pipeline_flow(project=str(root))


def _newest(root: Path) -> dict[str, Any]:
    """The evaluate stage's numbers on the newest data."""
    return (metrics_files.read(root, "evaluate") or {}).get("newest", {})


@flow(name="tunery-retrain")
def retrain_flow(project: str | None = None, ignore_drift: bool = False) -> dict[str, Any]:
    logger = get_run_logger()
    root = env.configure(Path(project) if project else None)
    try:
        with retrain.exclusive(root):
            drift = measure_drift(str(root))
            if isinstance(drift, TuneryError):  # the caller gets the error itself, raised
                return Failed(message=str(drift), data=drift)
            if drift is not None and not drift["triggered"] and not ignore_drift:
                reason = (
                    f"drift AUC {drift['auc']:.3f} is below retrain.drift.min_auc "
                    f"{drift['min_auc']}; the new files wait in the landing folder"
                )
                logger.info("deferred: %s", reason)
                return {"status": "deferred", "reason": reason, "drift": drift, "added": []}
            added = take_in(str(root))
            todo = stale(str(root))
            if not added and not todo:
                logger.info("nothing to do: no new data, every stage up to date")
                return {"status": "nothing to do", "added": []}
            logger.info(
                "new data files: %s; stale stages: %s",
                [Path(a).name for a in added] or "none",
                todo,
            )
            result = _run_pipeline(root)
            newest = _newest(root)
            if newest.get("rows"):
                logger.info(
                    "newest data (%s, %d test rows): macro-F1 %s, champion %s",
                    newest["origins"],
                    newest["rows"],
                    newest.get("macro_f1"),
                    newest.get("champion_macro_f1", "n/a"),
                )
            registry = result.get("registry") or {}
            logger.info("decision: %s", registry.get("summary", "no registry step"))
            return {
                "status": "retrained",
                "added": added,
                "stale": todo,
                "drift": drift,
                "newest": newest,
                **result,
            }
    except retrain.Busy as exc:
        logger.warning(str(exc))
        return {"status": "skipped", "reason": str(exc)}


def deployment(project: str, *, cron: str | None = None, interval: float | None = None):
    """The retrain flow as a scheduled deployment: at most one run at a time, a second one waits."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    if (cron is None) == (interval is None):
        raise ValueError("give exactly one of cron or interval")
    return retrain_flow.to_deployment(
        name="tunery-retrain",
        cron=cron,
        interval=interval,
        parameters={"project": project},
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
        ),
        description="Re-fine-tune on new data; promote only a better model.",
        tags=["tunery"],
    )


def serve(project: str, *, cron: str | None = None, interval: float | None = None) -> None:
    """Serve the scheduled retrain from this process (embedded Prefect server) until interrupted."""
    from prefect import serve as prefect_serve

    prefect_serve(deployment(project, cron=cron, interval=interval))
