"""Registering challengers and moving the `champion` alias: gated, manual, or rolled back.

Every change of champion goes through one of three doors, and each is recorded twice: as tags on
the model version, and as an entry of the append-only promotion log (`tracking.log_decision`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tunery import tracking
from tunery.config import RegistryConfig
from tunery.errors import InputError, Refused, TuneryError
from tunery.registry import gate
from tunery.registry.gate_report import compared_version
from tunery.registry.refs import CHALLENGER, CHAMPION, Registry

__all__ = ["CHALLENGER", "CHAMPION", "compared_version", "gate_challenger", "promote", "rollback"]

log = logging.getLogger("tunery.registry")

LOCK_FILE = ".tunery-registry.lock"
LOCK_TIMEOUT_S = 300.0


def serialized(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run `fn(reg, ...)` holding the project's (`reg.root`) registry lock: read the alias, move it and log
    the decision as one step, so that two processes (a scheduled gate, `tunery promote`, a
    rollback) never both act on the same champion (a lost update). filelock: an OS lock the
    kernel releases when its holder dies. It serializes the processes of one machine (or of a
    shared project folder); with a remote tracking server shared by several machines, run the
    gate from one worker pool (prefect.yaml's concurrency limit).
    """

    @functools.wraps(fn)
    def wrapper(reg: Registry, *args: Any, **kwargs: Any) -> Any:
        from filelock import FileLock, Timeout

        lock = FileLock(str(Path(reg.root) / LOCK_FILE))
        try:
            with lock.acquire(timeout=LOCK_TIMEOUT_S):
                return fn(reg, *args, **kwargs)
        except Timeout as exc:
            raise TuneryError(
                f"{lock.lock_file}: another registry change has held the lock for "
                f"{LOCK_TIMEOUT_S:.0f} s; is a `tunery promote`/`rollback`/run still going?"
            ) from exc

    return wrapper


def _record(
    reg: Registry,
    *,
    action: str,
    frm: str | None,
    to: str | None,
    reason: str,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    record = {
        "action": action,
        "model": reg.name,
        "from": frm,
        "to": to,
        "reason": reason,
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
        "metrics": dict(metrics or {}),
    }
    tracking.log_decision(reg.root, reg.experiment, record)
    return record


@serialized
def gate_challenger(
    reg: Registry,
    cfg: RegistryConfig,
    version: str,
    *,
    challenger: Mapping[str, Any] | None,
    champion: Mapping[str, Any] | None,
    parity_passed: bool | None,
) -> gate.Decision:
    """Run the gate (its thresholds: `cfg`) for a registered challenger; move `champion` to it
    only if the gate says so.

    The order makes a registry left half-way (the server went away) safe to re-run: the decision
    is logged before the alias moves (no champion change without its record), and the pair that
    says "this version was gated" (see `registration._unchanged`) is written last, so a gate cut
    short anywhere is run again by the next `tunery run`."""
    current = tracking.alias_version(reg.root, reg.name, CHAMPION)
    compared = compared_version(champion, reg.name)
    decision = _decide(cfg, current, compared, challenger, champion, parity_passed)
    _record_decision(reg, version, decision, current, challenger, champion)
    if decision.promote:
        tracking.set_alias(reg.root, reg.name, CHAMPION, version)
        log.info(
            "promoted version %s to champion (was %s): %s",
            version,
            current or "none",
            decision.reason,
        )
    else:
        log.info(
            "kept champion %s; version %s not promoted: %s",
            current or "none",
            version,
            decision.reason,
        )
    tracking.tag_version(
        reg.root,
        reg.name,
        version,
        {
            # The champion when the gate ran, and the one the evaluation's numbers compared
            # against: they differ when the gate refused a stale comparison. Registration re-gates
            # an unchanged model only when this pair changes (tunery/registry/registration.py).
            "gate.champion_version": current or "none",
            "gate.compared_version": compared or "none",
        },
    )
    return decision


def _decide(
    cfg: RegistryConfig,
    current: str | None,
    compared: str | None,
    challenger: Mapping[str, Any] | None,
    champion: Mapping[str, Any] | None,
    parity_passed: bool | None,
) -> gate.Decision:
    """The gate's decision; a stale comparison or an error in the gate is a "no" (fail closed)."""
    if compared is not None and compared != current:
        # Another run (or `tunery promote`) moved the champion after this challenger was evaluated
        # against it: the numbers compare against the wrong model.
        return gate.Decision(
            False,
            f"the champion moved from version {compared} to {current or 'none'} since the "
            "evaluation: not promoted (fail closed; re-run evaluate, `tunery run evaluate --force`, "
            "then `tunery run`, to compare against the new champion)",
        )
    try:
        return gate.decide(
            challenger,
            champion,
            has_champion=current is not None,
            parity_passed=parity_passed,
            cfg=cfg,
        )
    except Exception as exc:  # fail closed: an error in the gate is a "no"
        return gate.Decision(False, f"gate error: {exc!r} (fail closed)")


def _record_decision(
    reg: Registry,
    version: str,
    decision: gate.Decision,
    current: str | None,
    challenger: Mapping[str, Any] | None,
    champion: Mapping[str, Any] | None,
) -> None:
    """The decision on the version's tags and in the promotion log (before any alias moves)."""
    tracking.tag_version(
        reg.root,
        reg.name,
        version,
        {
            "gate.decision": "promoted" if decision.promote else "rejected",
            "gate.reason": decision.reason,
            **{f"gate.check.{k}": v for k, v in decision.checks.items()},
        },
    )
    metrics = {
        "challenger_macro_f1": (challenger or {}).get("macro_f1"),
        "champion_macro_f1": (champion or {}).get("macro_f1"),
    }
    _record(
        reg,
        action="gate",
        frm=current,
        to=version if decision.promote else current,
        reason=decision.reason,
        metrics={k: v for k, v in metrics.items() if v is not None},
        extra={"candidate": version, "promoted": decision.promote},
    )


@serialized
def promote(reg: Registry, version: str, reason: str, *, force: bool = False) -> dict[str, Any]:
    """Manual promotion (recorded): make `version` the champion. A version the gate rejected
    needs `force` (recorded as such)."""
    if not reason.strip():
        raise TuneryError("a manual promotion needs --reason")
    root, name = reg.root, reg.name
    versions = {v["version"]: v for v in tracking.list_versions(root, name)}
    if str(version) not in versions:
        raise InputError(
            f"model {name!r} has no version {version} (have: {sorted(versions, key=int) or 'none'})"
        )
    current = tracking.alias_version(root, name, CHAMPION)
    if current == str(version):
        raise TuneryError(f"version {version} is already the champion")
    tags = versions[str(version)]["tags"]
    rejected = tags.get("gate.decision") == "rejected"
    if rejected and not force:
        raise Refused(
            f"version {version} was rejected by the gate ({tags.get('gate.reason', '')}); "
            "`tunery promote --force` promotes it anyway (recorded as forced)"
        )
    tracking.set_alias(root, name, CHAMPION, str(version))
    tracking.tag_version(root, name, str(version), {"promotion.manual_reason": reason})
    return _record(
        reg,
        action="manual_promote",
        frm=current,
        to=str(version),
        reason=reason,
        extra={"forced": True, "gate_reason": tags.get("gate.reason", "")} if rejected else None,
    )


@serialized
def rollback(reg: Registry, reason: str) -> dict[str, Any]:
    """Champion back to the one it replaced (recorded); repeated rollbacks walk further back."""
    root, name = reg.root, reg.name
    current = tracking.alias_version(root, name, CHAMPION)
    if current is None:
        raise TuneryError(f"model {name!r} has no champion to roll back")
    previous = None
    for entry in reversed(tracking.decisions(root, reg.experiment, name)):
        # The entry that made `current` champion (not a rollback onto it) says what it replaced.
        if (
            entry.get("action") != "rollback"
            and entry.get("to") == current
            and entry.get("from") not in (None, "", "None", current)
        ):
            previous = entry["from"]
            break
    if previous is None:
        raise TuneryError(f"version {current} has no previous champion to roll back to")
    tracking.set_alias(root, name, CHAMPION, previous)
    tracking.tag_version(root, name, current, {"promotion.rolled_back": reason or "yes"})
    return _record(reg, action="rollback", frm=current, to=previous, reason=reason or "rollback")
