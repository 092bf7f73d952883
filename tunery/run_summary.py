"""The end of a `tunery run` or `retrain`: the gate's decision with its reason, where the results
are, the stage-value table and what to do next. One shape (`build`), shown three ways: the
terminal (`terminal`), `--json` (the dict itself) and the flow's Prefect artifact (`markdown`).
Every path comes from params.yaml or dvc.yaml.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tunery import ui
from tunery.evaluation import stage_value

PARAMS_FILE = "params.yaml"


def declared(root: Path, kind: str) -> list[str]:
    """The `plots` or `metrics` paths dvc.yaml declares (the DAG is where they are named), with
    `${section.key}` filled in from params.yaml; only those that exist, in dvc.yaml order."""
    from tunery.config import load_raw

    dag = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
    entries: list[Any] = []
    for stage in (dag.get("stages") or {}).values():
        entries += stage.get(kind) or []
    if kind == "plots":
        entries += dag.get("plots") or []
    raw = load_raw(root / PARAMS_FILE)

    def lookup(match: re.Match) -> str:
        node: Any = raw
        for part in match.group(1).strip().split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return str(node) if node is not None else match.group(0)

    out: list[str] = []
    for entry in entries:
        for name in entry if isinstance(entry, dict) else [entry]:
            path = re.sub(r"\$\{([^}]+)\}", lookup, str(name))
            if (root / path).exists() and path not in out:
                out.append(path)
    return out


def gate(registry: dict[str, Any] | None, partial: bool) -> dict[str, Any]:
    """The gate's decision in a fixed shape, from the registry step's result."""
    if not registry:
        reason = (
            "only some stages were asked for: the registry step runs after a full run"
            if partial
            else "the registry step is off (pipeline.register_model: false)"
        )
        return {"decision": "not gated", "reason": reason, "version": None}
    if "promoted" in registry:
        decision = "promoted to champion" if registry["promoted"] else "champion kept"
        reason = registry.get("reason") or registry.get("summary", "")
    else:
        decision, reason = "unchanged", registry.get("summary", "")
    return {"decision": decision, "reason": reason, "version": registry.get("version")}


def next_commands(params: Any, decision: dict[str, Any]) -> list[dict[str, str]]:
    deploy = params.compress.out_dir
    out = [
        {
            "command": "tunery ui",
            "what": "runs, metrics and the registry (MLflow), flow runs (Prefect)",
        },
        {"command": "tunery predict FILE -o scored.csv", "what": "score a file with the champion"},
        {"command": "tunery serve-model", "what": "the champion over HTTP (127.0.0.1:8000)"},
    ]
    if decision["decision"] == "champion kept":
        out.append(
            {
                "command": f"tunery predict FILE -o scored.csv --model {deploy}",
                "what": "try the candidate the gate did not promote",
            }
        )
    out.append({"command": "tunery models --log", "what": "every version and promotion"})
    return out


def build(root: Path, params: Any, result: dict[str, Any], partial: bool) -> dict[str, Any]:
    """The end of a run as data. `result`: the flow's (`registry`, `flow_run_id` when known)."""
    report_dir = params.evaluate.report_dir
    decision = gate(result.get("registry"), partial)
    paths = {
        "deployable_model": params.compress.out_dir,
        "stage_value": f"{report_dir}/{stage_value.MARKDOWN_FILE}",
        "reports": [d for d in (report_dir, params.compress.report_dir) if (root / d).is_dir()],
        "plots": declared(root, "plots"),
        "metrics": declared(root, "metrics"),
    }
    flow_run = result.get("flow_run_id")
    return {
        "gate": decision,
        "stage_value": stage_value.read(root / report_dir),
        "paths": paths,
        "prefect_flow_run": ui.flow_run_url(flow_run) if flow_run else None,
        "next": next_commands(params, decision),
    }


def stage_value_lines(root: Path, params: Any) -> str:
    """The evaluate stage's table of what each stage bought, for the terminal ('' without one)."""
    report_dir = root / params.evaluate.report_dir
    table = stage_value.read(report_dir)
    if table is None:
        return ""
    return f"\n{stage_value.terminal(table)}\n  (table: {report_dir / stage_value.MARKDOWN_FILE})"


def terminal(summary: dict[str, Any]) -> str:
    gate_, paths = summary["gate"], summary["paths"]
    version = f" (version {gate_['version']})" if gate_.get("version") else ""
    lines = [f"\ngate: {gate_['decision']}{version}: {gate_['reason']}"]
    lines.append(f"deployable model: {paths['deployable_model']}")
    if paths["reports"]:
        lines.append(f"reports: {', '.join(paths['reports'])}")
    if paths["plots"]:
        lines.append(f"plots: {', '.join(paths['plots'])}  (`dvc plots show` renders them)")
    if summary.get("prefect_flow_run"):
        lines.append(f"flow run: {summary['prefect_flow_run']}  (served by `tunery ui`)")
    lines.append("next:")
    width = max(len(n["command"]) for n in summary["next"])
    lines += [f"  {n['command']:<{width}}  {n['what']}" for n in summary["next"]]
    return "\n".join(lines)


def markdown(summary: dict[str, Any]) -> str:
    """The same end of run for the flow's Prefect artifact."""
    gate_, paths = summary["gate"], summary["paths"]
    version = f" (version {gate_['version']})" if gate_.get("version") else ""
    lines = [f"**Gate:** {gate_['decision']}{version}: {gate_['reason']}", ""]
    lines.append(f"- deployable model: `{paths['deployable_model']}`")
    for key in ("reports", "plots", "metrics"):
        if paths[key]:
            lines.append(f"- {key}: " + ", ".join(f"`{p}`" for p in paths[key]))
    lines += ["", "**Next:**", ""]
    lines += [f"- `{n['command']}`: {n['what']}" for n in summary["next"]]
    if summary["stage_value"] is not None:
        lines += ["", stage_value.markdown(summary["stage_value"])]
    return "\n".join(lines)
