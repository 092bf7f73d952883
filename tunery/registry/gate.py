"""The promotion gate: may the challenger replace the champion? Pure logic, fail closed.

Inputs are the numbers `evaluate` wrote for the challenger and (on the same holdout) the champion:
`{"macro_f1": float, "per_class_f1": {label: float}}`, plus whether export parity passed. A missing
or non-finite number, a failed check or an error means "no promotion", with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tunery.config import RegistryConfig


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    checks: dict[str, bool] = field(default_factory=dict)


def _number(metrics: Mapping[str, Any] | None, key: str) -> float | None:
    value = (metrics or {}).get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def decide(
    challenger: Mapping[str, Any] | None,
    champion: Mapping[str, Any] | None,
    *,
    has_champion: bool,
    parity_passed: bool | None,
    cfg: RegistryConfig,
) -> Decision:
    checks: dict[str, bool] = {}
    score = _number(challenger, "macro_f1")
    if score is None:
        return Decision(
            False, "challenger holdout macro_f1 is missing: not promoted (fail closed)", checks
        )
    checks["parity"] = parity_passed is True
    if not checks["parity"]:
        why = "was not recorded" if parity_passed is None else "failed"
        return Decision(False, f"export parity {why}: not promoted", checks)

    if not has_champion:
        checks["floor"] = score >= cfg.floor_macro_f1
        if not checks["floor"]:
            return Decision(
                False, f"first model: macro_f1 {score:.4f} < floor {cfg.floor_macro_f1:.4f}", checks
            )
        return Decision(
            True, f"first model: macro_f1 {score:.4f} >= floor {cfg.floor_macro_f1:.4f}", checks
        )

    best = _number(champion, "macro_f1")
    if best is None:
        if (champion or {}).get("comparable") is False:
            # Say why, and what would fix it: a missing number hides the real reason.
            return Decision(
                False,
                f"champion not comparable: {champion.get('reason', 'unknown reason')} "
                "(fail closed; `tunery promote VERSION --force` if the change is intended)",
                checks,
            )
        return Decision(
            False,
            "champion's holdout macro_f1 is missing: cannot compare (fail closed; re-run "
            "`tunery run evaluate --force`, then `tunery run`)",
            checks,
        )
    checks["min_delta"] = score >= best + cfg.min_delta
    if not checks["min_delta"]:
        return Decision(
            False,
            f"macro_f1 {score:.4f} < champion {best:.4f} + min_delta {cfg.min_delta:.4f}",
            checks,
        )

    ours = (challenger or {}).get("per_class_f1") or {}
    theirs = (champion or {}).get("per_class_f1") or {}
    if not theirs or not isinstance(ours, Mapping):
        return Decision(
            False, "per-class F1 missing: cannot check class drops (fail closed)", checks
        )
    drops = {}
    for label, before in theirs.items():
        after = _number(ours, label)
        if after is None or _number(theirs, label) is None:
            return Decision(False, f"per-class F1 for {label!r} missing (fail closed)", checks)
        drops[label] = float(before) - after
    worst = max(drops, key=drops.get)
    checks["max_class_drop"] = drops[worst] <= cfg.max_class_drop
    if not checks["max_class_drop"]:
        return Decision(
            False,
            f"class {worst!r} F1 drops by {drops[worst]:.4f} > max_class_drop {cfg.max_class_drop:.4f}",
            checks,
        )
    return Decision(
        True,
        f"macro_f1 {score:.4f} >= champion {best:.4f} + {cfg.min_delta:.4f}; worst class drop {drops[worst]:.4f}",
        checks,
    )
