"""`<compress.report_dir>/report.{json,md}`: what the compress stage judged, how, and what it deployed.

    eval_rows, judged        the rows the variants were judged on (val + test) and how
    reference, reference_bench   the PyTorch model's macro-F1 and speed (per provider)
    target_provider, rule    what the selection ranked on
    selected                 the deployed variant (a key of `variants`)
    parity_passed            the deployed variant is within `max_f1_drop`: the promotion gate reads it
    calibration              the temperature baked into the deployed graph
    variants                 every kept variant: size, parity (macro_f1_delta, ...), bench per provider,
                             build_s; pruned_* also `pruning` (what was removed, the recovery record)
    eligible, rejected, failed, rejected_variants, prune, bench_config   the rest of the story

The one module that names, writes, checks and reads it: the compress stage builds the content
(`tunery.onnx.variants.report`) and writes it here; the evaluate stage (the deployed row of the
stage-value table) and the registry step (`parity_passed`) read it here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunery.errors import TuneryError
from tunery.io import atomic_dir

JSON_FILE = "report.json"
MARKDOWN_FILE = "report.md"


def path_in(report_dir: Path) -> Path:
    """Where the JSON report is: `<compress.report_dir>/report.json`."""
    return Path(report_dir) / JSON_FILE


def check(report: Mapping[str, Any]) -> None:
    """The rules a reader relies on: a selected variant that is among the variants, with its
    parity numbers, and a boolean `parity_passed`."""
    variants = report.get("variants")
    selected = report.get("selected")
    if not isinstance(variants, Mapping) or selected not in variants:
        raise TuneryError(
            f"compress report: the selected variant {selected!r} is not among its variants "
            f"({sorted(variants) if isinstance(variants, Mapping) else 'none'})"
        )
    if "macro_f1_delta" not in (variants[selected].get("parity") or {}):
        raise TuneryError(f"compress report: variant {selected!r} has no parity.macro_f1_delta")
    if not isinstance(report.get("parity_passed"), bool):
        raise TuneryError("compress report: parity_passed must be true or false")


def write(report_dir: Path, report: Mapping[str, Any], markdown: str) -> Path:
    """Check, then write both files as one folder (`report_dir` is replaced whole, or untouched
    when anything fails). `markdown`: the report rendered (`tunery.onnx.compress.markdown`; not
    imported here, so that the readers do not depend on the compression code)."""
    check(report)
    with atomic_dir(report_dir) as tmp:
        (tmp / JSON_FILE).write_text(json.dumps(dict(report), indent=2) + "\n", encoding="utf-8")
        (tmp / MARKDOWN_FILE).write_text(markdown, encoding="utf-8")
    return path_in(report_dir)


def read(report_dir: Path) -> dict[str, Any]:
    """The report, or {} when there is none (or it is unreadable): the gate then fails closed on
    `parity_passed`, and the stage-value table shows no speed-up or drop."""
    try:
        data = json.loads(path_in(report_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def parity_passed(report: Mapping[str, Any]) -> bool | None:
    """Whether the deployed variant agrees with PyTorch within the budget; None without a report."""
    return report.get("parity_passed")


def served_numbers(report: Mapping[str, Any], variant: str | None) -> dict[str, float | None]:
    """`variant`'s throughput on the report's target provider, the PyTorch reference's there, and
    its macro-F1 delta vs PyTorch (None for what the report does not hold)."""
    return _numbers(report, (report.get("variants") or {}).get(variant) or {})


def _numbers(report: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, float | None]:
    target = report.get("target_provider", "cpu")
    bench = (entry.get("bench") or {}).get(target) or {}
    reference = (report.get("reference_bench") or {}).get(target) or {}
    return {
        "throughput": bench.get("throughput"),
        "reference_throughput": reference.get("throughput"),
        "macro_f1_delta": (entry.get("parity") or {}).get("macro_f1_delta"),
    }


def candidates(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every variant built, kept or rejected (over budget), with its throughput over PyTorch's on
    the target provider, its macro-F1 delta and its status: selected | eligible | not eligible |
    over budget (what each variant bought and cost, for the stage-value table)."""
    out = []
    groups = (("variants", None), ("rejected_variants", "over budget"))
    for group, status in groups:
        for name, entry in (report.get(group) or {}).items():
            if not isinstance(entry, Mapping):
                continue
            numbers = _numbers(report, entry)
            out.append(
                {
                    "variant": name,
                    "speedup": (
                        round(numbers["throughput"] / numbers["reference_throughput"], 2)
                        if numbers["throughput"] and numbers["reference_throughput"]
                        else None
                    ),
                    "macro_f1_delta": numbers["macro_f1_delta"],
                    "status": status
                    or (
                        "selected"
                        if name == report.get("selected")
                        else "eligible"
                        if name in (report.get("eligible") or [])
                        else "not eligible"
                    ),
                }
            )
    return out
