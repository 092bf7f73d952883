"""dvc.yaml's code deps follow the imports: a change to any module a stage computes with re-runs it.

Both pipelines: the text one (`dvc.yaml`, `tasks/<stage>.py`) and the image one
(`vision/dvc.yaml`, `tasks/vision/<stage>.py`, deps written relative to vision/).

The imports are read statically (every `import tunery...`, at module or function level) from
`tasks/<stage>.py` through the library. Not followed, and not deps: the modules that run a stage
rather than decide its outputs (arguments, logging and progress, atomic files, the MLflow record,
the registry, which is not a DVC-tracked input anyway). A new module that a stage imports fails
this test until dvc.yaml names it (or this list does, with the reason).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RUNS_NOT_DECIDES = {
    "tunery",
    "tunery.config",  # params are deps through `params:`; defaults live in params.yaml
    "tunery.vision.params",  # the same, for vision/params.yaml
    "tunery.env",
    "tunery.errors",
    "tunery.io",
    "tunery.runner.journal",
    "tunery.progress",
    "tunery.screen",
    "tunery.stage",
    "tunery.tracking",
    "tunery.registry.registration",
    "tunery.registry.promotion",
    "tunery.registry.gate",
}


def _file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _ours(module: str | None) -> bool:
    return bool(module) and module.split(".")[0] == "tunery"


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if _ours(a.name)}
        elif isinstance(node, ast.ImportFrom) and not node.level and _ours(node.module):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from tunery import x`
    return {m for m in found if _file(m) is not None}


def _computes_with(task: str) -> set[str]:
    seen: set[str] = set()
    todo = [task]
    while todo:
        module = todo.pop()
        if module in seen or module in RUNS_NOT_DECIDES:
            continue
        seen.add(module)
        todo += _imports(_file(module))
    return seen - {task}


# (pipeline folder, stage) -> (the stage's deps as paths from the repository root, its task module)
PIPELINES = {"": "tasks", "vision": "tasks.vision"}


def _stages() -> dict[tuple[str, str], tuple[list[str], str]]:
    out = {}
    for folder, package in PIPELINES.items():
        stages = yaml.safe_load((ROOT / folder / "dvc.yaml").read_text())["stages"]
        for stage, spec in stages.items():
            deps = [
                str(Path(folder, d).as_posix()).replace("vision/../", "").rstrip("/")
                for d in spec.get("deps", [])
                if isinstance(d, str)
            ]
            out[(folder or ".", stage)] = (deps, f"{package}.{stage}")
    return out


STAGES = _stages()


@pytest.mark.parametrize("key", sorted(STAGES), ids=lambda k: f"{k[0]}:{k[1]}")
def test_every_module_a_stage_computes_with_is_a_dep(key):
    deps, task = STAGES[key]
    assert task.replace(".", "/") + ".py" in deps
    files = {str(_file(module).relative_to(ROOT)) for module in _computes_with(task)}
    missing = sorted(f for f in files if not any(f == d or f.startswith(d + "/") for d in deps))
    assert not missing, (
        f"{key[0]}/dvc.yaml stage {key[1]!r} lacks deps {missing}: a change there would not "
        "re-run it"
    )


@pytest.mark.parametrize("key", sorted(STAGES), ids=lambda k: f"{k[0]}:{k[1]}")
def test_every_code_dep_exists(key):
    """A module moved or removed must leave dvc.yaml too (DVC fails on a missing dep)."""
    code = [d for d in STAGES[key][0] if d.split("/")[0] in ("tasks", "tunery")]
    assert [d for d in code if not (ROOT / d).exists()] == []
