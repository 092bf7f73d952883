"""After the stages: register the deployable model as the challenger and run the promotion gate.

Registration is skipped when the deployable model is byte-identical to an already registered
version (nothing changed since), so re-running an up-to-date pipeline registers nothing new. That
version is gated again only when what the gate judges on changed since its last decision (see
`_unchanged`).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tunery import mlflow_model, tracking
from tunery.config import Params, RegistryConfig
from tunery.errors import TuneryError
from tunery.onnx import compress_report
from tunery.onnx.export import MANIFEST_FILE, MODEL_FILE
from tunery.registry import gate_report as gates
from tunery.registry import promotion, refs
from tunery.registry.refs import CHALLENGER, CHAMPION, REGISTRY_FILE, Registry

log = logging.getLogger("tunery.registry")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def register_and_gate(root: Path, params: Params, run: tracking.Run) -> dict[str, Any]:
    """Register the deployable model (`compress.out_dir`) as the challenger and gate it on the
    evaluation's `gate.json` (`evaluate.report_dir`); an already registered one is re-gated only
    when its comparison changed (`_unchanged`)."""
    reg = Registry.of(params, root)
    deploy = root / params.compress.out_dir
    meta = _read_json(deploy / MANIFEST_FILE)
    if meta is None or not (deploy / MODEL_FILE).is_file():
        raise TuneryError(
            f"{deploy}: no deployable model to register (did the compress stage run?)"
        )
    name = reg.name
    sha = meta.get("sha256", "")
    gate_report = gates.read(root / params.evaluate.report_dir)
    compress = compress_report.read(root / params.compress.report_dir)
    for existing in tracking.list_versions(root, name):
        if sha and existing["tags"].get("deploy.sha256") == sha:
            return _unchanged(reg, params.registry, existing, gate_report, compress)

    challenger = gate_report.get("challenger")
    tags = {
        "deploy.sha256": sha,
        "deploy.variant": meta.get("variant", ""),
        "pipeline_run_id": run.run_id,
        # Born with the version (one call): a registration cut short before its gate ran (the
        # server went away) shows as pending in `tunery models`; the next run gates it.
        "gate.decision": "pending",
        "gate.reason": "registered; not gated yet (the next `tunery run` gates it)",
        **{
            k: v
            for k, v in run_tags(run).items()
            if k in ("git.commit", "git.dirty", "data_version")
        },
    }
    if challenger and challenger.get("macro_f1") is not None:
        tags["holdout_macro_f1"] = challenger["macro_f1"]
    # The deployable LoggedModel the compress stage logged (found by content), else logged now
    # under the pipeline run: the version points at it, no second copy of the weights.
    version = mlflow_model.register_deployable(
        run, deploy, name, tags=tags, finetune_dir=root / params.finetune.out_dir
    )
    tracking.set_alias(root, name, CHALLENGER, version)
    decision = promotion.gate_challenger(
        reg,
        params.registry,
        version,
        challenger=challenger,
        champion=gate_report.get("champion"),
        parity_passed=compress_report.parity_passed(compress),
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


def _unchanged(
    reg: Registry,
    cfg: RegistryConfig,
    existing: dict[str, Any],
    gate_report: dict[str, Any],
    compress: dict[str, Any],
) -> dict[str, Any]:
    """The deployable model is already registered as `existing`: gate it again only if what the
    gate judges on changed since its last decision.

    `evaluate` does not depend on the registry champion in DVC. When the champion moves after an
    evaluation, the gate refuses that challenger (its numbers compare against a model that is no
    longer the champion: fail closed), and a re-run finds evaluate and the model up to date, with
    gate.json still comparing against the old champion. Those numbers must never promote. We do
    not re-score the champion here: the gate would then judge on numbers no DVC-tracked report
    holds, and the registry step would pull in the evaluation code. Instead the step says which
    evaluation is stale and what to re-run; once `evaluate` has compared the same model against
    the current champion, the version is gated again, on a fresh comparison, recorded like any
    other decision.

    "Changed" means the pair (champion now, champion gate.json compared against) differs from the
    pair recorded on the version at its last gate (tags `gate.champion_version`,
    `gate.compared_version`). A version never gated (or gated before the second tag existed) is
    gated. Otherwise its last decision stands and nothing is logged twice. A version that was
    rolled back is never put back by the gate; that takes `tunery promote`.
    """
    root, name = reg.root, reg.name
    version = existing["version"]
    tags = existing["tags"]
    head = f"model unchanged: already registered as version {version}"
    current = tracking.alias_version(root, name, CHAMPION)
    compared = gates.compared_version(gate_report.get("champion"), name)
    out: dict[str, Any] = {"registered": False, "version": version}
    if current == version:
        summary = f"{head}, the champion; nothing to gate"
    elif tags.get("promotion.rolled_back"):
        summary = (
            f"{head}, rolled back ({tags['promotion.rolled_back']}); not gated again "
            f"(`tunery promote {version}` puts it back)"
        )
    elif (tags.get("gate.champion_version"), tags.get("gate.compared_version")) != (
        current or "none",
        compared or "none",
    ):
        # The gate itself refuses a stale comparison (and says what to re-run).
        tracking.set_alias(root, name, CHALLENGER, version)
        decision = promotion.gate_challenger(
            reg,
            cfg,
            version,
            challenger=gate_report.get("challenger"),
            champion=gate_report.get("champion"),
            parity_passed=compress_report.parity_passed(compress),
        )
        verdict = "promoted to champion" if decision.promote else "not promoted"
        summary = (
            f"{head}; gated again (the champion or its evaluation changed since its last gate): "
            f"{verdict}: {decision.reason}"
        )
        out.update(promoted=decision.promote, reason=decision.reason, regated=True)
    elif compared is not None and compared != current:
        summary = (
            f"{head}; not promoted: its evaluation (gate.json) compared against version "
            f"{compared}, but the champion is now {current or 'none'} (fail closed). "
            "`tunery run evaluate --force`, then `tunery run`, gate it against the current champion"
        )
    else:
        summary = (
            f"{head}; nothing to gate (last gate: {tags.get('gate.decision', '-')}: "
            f"{tags.get('gate.reason', '')})"
        )
    log.info(summary)
    return {**out, "summary": summary}


def champion_finetune_dir(reg: Registry) -> Path | None:
    """The registry champion's fine-tune (adapter + labels + info) as a local folder, or None."""
    root, name = reg.root, reg.name
    version = tracking.alias_version(root, name, CHAMPION)
    if version is None:
        log.info(
            "warm start: no champion in the registry yet (%s); starting fresh from the encoder",
            name,
        )
        return None
    key = f"{name}-v{version}-{tracking.store_id(root)}-adapter"
    cache = root / ".cache" / "tunery" / "registry" / key
    folder = _cached(cache, lambda tmp: mlflow_model.version_adapter(root, name, version, tmp))
    if folder is None:
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
    from tunery.io import atomic_dir

    root = env.find_root()
    ref = refs.parse(uri)
    name, version = ref.name, ref.version
    if ref.alias is not None:
        version = tracking.alias_version(root, name, ref.alias)
        if version is None:
            raise TuneryError(
                f"{uri}: model {name!r} has no alias {ref.alias!r} (see `tunery models`)"
            )
    # Keyed by the store too: version 3 of a sqlite store and of a tracking server are different
    # models, and switching MLFLOW_TRACKING_URI must never serve the other store's copy.
    cache = root / ".cache" / "tunery" / "registry" / f"{name}-v{version}-{tracking.store_id(root)}"
    if not (cache / REGISTRY_FILE).is_file():
        with atomic_dir(cache) as tmp:
            got = tracking.download_model(root, refs.version_uri(name, version), tmp / "dl")
            folder = mlflow_model.deploy_folder(got, uri)  # refuses a model that is not Tunery's
            for item in folder.iterdir():
                item.rename(tmp / item.name)
            shutil.rmtree(got)
            (tmp / REGISTRY_FILE).write_text(
                json.dumps({"name": name, "version": str(version), "uri": uri})
            )
    log.info("%s -> version %s (%s)", uri, version, cache)
    return cache


def _cached(cache: Path, fetch) -> Path | None:
    """`fetch(tmp)` -> a folder, moved into `cache` once; None (nothing cached) when it has none."""
    from tunery.io import atomic_dir

    if cache.is_dir():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent, prefix=".fetch-") as tmp:
        got = fetch(Path(tmp) / "dl")
        if got is None:
            return None
        with atomic_dir(cache) as dest:
            for item in got.iterdir():
                item.rename(dest / item.name)
    return cache


def run_tags(run: tracking.Run) -> dict[str, str]:
    return tracking.run_tags(run.run_id)
