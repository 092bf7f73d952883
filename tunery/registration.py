"""After the stages: register the deployable model as the challenger and run the promotion gate.

Registration is skipped when the deployable model is byte-identical to an already registered
version (nothing changed since), so re-running an up-to-date pipeline registers nothing new.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tunery import promotion, tracking
from tunery.config import Params
from tunery.errors import TuneryError

log = logging.getLogger("tunery.registry")

DEPLOY_DIR = "models/deploy"
GATE_REPORT = "reports/evaluate/gate.json"
COMPRESS_REPORT = "reports/compress/report.json"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def register_and_gate(root: Path, params: Params, run: tracking.Run) -> dict[str, Any]:
    deploy = root / DEPLOY_DIR
    meta = _read_json(deploy / "tunery_model.json")
    if meta is None or not (deploy / "model.onnx").is_file():
        raise TuneryError(
            f"{deploy}: no deployable model to register (did the compress stage run?)"
        )
    name = params.registry.model_name
    sha = meta.get("sha256", "")
    for existing in tracking.list_versions(root, name):
        if sha and existing["tags"].get("deploy.sha256") == sha:
            summary = f"model unchanged: already registered as version {existing['version']}; nothing to gate"
            log.info(summary)
            return {"registered": False, "version": existing["version"], "summary": summary}

    gate_report = _read_json(root / GATE_REPORT) or {}
    compress_report = _read_json(root / COMPRESS_REPORT) or {}
    challenger = gate_report.get("challenger")
    tags = {
        "deploy.sha256": sha,
        "deploy.variant": meta.get("variant", ""),
        "pipeline_run_id": run.run_id,
        **{
            k: v
            for k, v in run_tags(run).items()
            if k in ("git.commit", "git.dirty", "data_version")
        },
    }
    if challenger and challenger.get("macro_f1") is not None:
        tags["holdout_macro_f1"] = challenger["macro_f1"]
    with tempfile.TemporaryDirectory() as tmp:
        version = tracking.register_onnx(
            run, deploy, name, tags=tags, extras=_finetune_extra(root, params, Path(tmp))
        )
    tracking.set_alias(root, name, promotion.CHALLENGER, version)
    decision = promotion.gate_challenger(
        root,
        params,
        version,
        challenger=challenger,
        champion=gate_report.get("champion"),
        parity_passed=compress_report.get("parity_passed"),
    )
    verdict = "promoted to champion" if decision.promote else "not promoted"
    summary = f"version {version} registered as challenger; {verdict}: {decision.reason}"
    return {
        "registered": True,
        "version": version,
        "promoted": decision.promote,
        "reason": decision.reason,
        "summary": summary,
    }


FINETUNE_SUBDIR = "finetune"  # inside a registered model: what a warm start needs


def _finetune_extra(root: Path, params: Params, tmp: Path) -> dict[str, Path]:
    """The fine-tune's adapter, label map and info (not the merged copy) for later warm starts."""
    src = root / params.finetune.out_dir
    if not (src / "finetune.json").is_file():
        return {}
    dest = tmp / FINETUNE_SUBDIR
    dest.mkdir()
    for name in ("adapter", "labels.json", "finetune.json"):
        if (src / name).is_dir():
            shutil.copytree(src / name, dest / name)
        elif (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    return {FINETUNE_SUBDIR: dest}


def champion_finetune_dir(root: Path, params: Params) -> Path | None:
    """The registry champion's fine-tune (adapter + labels + info) as a local folder, or None."""
    name = params.registry.model_name
    if tracking.alias_version(root, name, promotion.CHAMPION) is None:
        log.info(
            "warm start: no champion in the registry yet (%s); starting fresh from the encoder",
            name,
        )
        return None
    folder = resolve_registry_uri(f"models:/{name}@{promotion.CHAMPION}") / FINETUNE_SUBDIR
    if not (folder / "finetune.json").is_file():
        log.warning(
            "warm start: the champion carries no fine-tune adapter; starting fresh from the encoder"
        )
        return None
    log.info("warm start from the champion's adapter (%s)", folder)
    return folder


def resolve_registry_uri(uri: str) -> Path:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` -> a local copy of that version (cached).

    The alias is resolved to a version first, so a moved alias never serves a stale cache. The
    copy is verified by the Predictor like any deployable folder (manifest, sha256, external data).
    The registry is the one `MLFLOW_TRACKING_URI` (or the project's embedded store) names; its
    artifacts may live anywhere MLflow reaches (a server's proxied store, S3).
    """
    from tunery import env
    from tunery.inference import REGISTRY_FILE
    from tunery.io import atomic_dir

    root = env.find_root()
    ref = uri.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = tracking.alias_version(root, name, alias)
        if version is None:
            raise TuneryError(f"{uri}: model {name!r} has no alias {alias!r} (see `tunery models`)")
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
        alias = None
    else:
        raise TuneryError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    # Keyed by the store too: version 3 of a sqlite store and of a tracking server are different
    # models, and switching MLFLOW_TRACKING_URI must never serve the other store's copy.
    cache = root / ".cache" / "tunery" / "registry" / f"{name}-v{version}-{tracking.store_id(root)}"
    if not (cache / REGISTRY_FILE).is_file():
        with atomic_dir(cache) as tmp:
            got = tracking.download_model(root, f"models:/{name}/{version}", tmp / "dl")
            for item in got.iterdir():
                item.rename(tmp / item.name)
            got.rmdir()
            (tmp / REGISTRY_FILE).write_text(
                json.dumps({"name": name, "version": str(version), "uri": uri})
            )
    log.info("%s -> version %s (%s)", uri, version, cache)
    return cache


def run_tags(run: tracking.Run) -> dict[str, str]:
    return tracking.run_tags(run.run_id)
