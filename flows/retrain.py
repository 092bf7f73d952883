"""The `retrain` flow: take in new labelled data, re-run what is stale, gate, promote or keep.

With no new data and nothing stale it ends at once with "nothing to do" and trains nothing. The
encoder is re-pretrained only when the `corpus` stage's policy moves the corpus snapshot; DVC skips
`pretrain` otherwise. Scheduled with `tunery schedule` (flow.serve) or deployed with prefect.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.pipeline import pipeline_flow
from tunery import env, retrain
from tunery.config import load_params


@task(name="take-in-new-data", cache_policy=NO_CACHE)
def take_in(root: str) -> list[str]:
    root_path = Path(root)
    params = load_params(root_path / "params.yaml")
    new = retrain.landing_files(root_path, params)
    return [str(p) for p in retrain.take_in(root_path, params, new)]


@task(name="stale-stages", cache_policy=NO_CACHE)
def stale(root: str) -> list[str]:
    return retrain.stale_stages(Path(root))


@flow(name="tunery-retrain")
def retrain_flow(project: str | None = None) -> dict[str, Any]:
    logger = get_run_logger()
    root = env.configure(Path(project) if project else None)
    try:
        with retrain.exclusive(root):
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
            result = pipeline_flow(project=str(root))
            registry = result.get("registry") or {}
            logger.info("decision: %s", registry.get("summary", "no registry step"))
            return {"status": "retrained", "added": added, "stale": todo, **result}
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
