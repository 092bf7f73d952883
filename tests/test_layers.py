"""The layering rules of the design, read from the imports (module- and function-level alike).

- mlflow only in the tracking modules, prefect only in flows/, no pickle loading;
- the library (tunery/) imports no flows/, tasks/ and not the CLI; the CLI, the entry point, is
  the one library module that may import flows/ (and tasks/);
- tasks/ import no flows/ (a stage runs under DVC, with or without an orchestrator);
- flows/ run stages through DVC only: they import no tasks/ module;
- no import cycle inside tunery/ (the MLflow modules count as one layer, the tracking layer).
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imports(path: Path) -> set[str]:
    return {name.split(".")[0] for name in full_imports(path)}


def full_imports(path: Path) -> set[str]:
    """Every absolute import of a file (`from a.b import c` gives a.b and a.b.c)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def sources():
    for folder in ("tunery", "tasks", "flows", "bench"):
        yield from (REPO / folder).rglob("*.py")


def files(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# runs, store and aliases; the model side (pyfunc, LoggedModels); the pyfunc's loader script
MLFLOW_MODULES = {
    REPO / "tunery" / n for n in ("tracking.py", "mlflow_model.py", "mlflow_model_code.py")
}
CLI = REPO / "tunery" / "cli.py"


def test_mlflow_only_in_tracking():
    offenders = [p for p in sources() if "mlflow" in imports(p) and p not in MLFLOW_MODULES]
    assert offenders == []


def test_prefect_only_in_flows():
    offenders = [p for p in sources() if "prefect" in imports(p) and p.parent.name != "flows"]
    assert offenders == []


def test_no_pickle_loading():
    for p in sources():
        text = p.read_text()
        assert "pickle" not in imports(p), p
        assert "torch.load(" not in text or "weights_only=True" in text, p


def test_library_imports_no_flows_tasks_or_cli():
    offenders = {
        str(p.relative_to(REPO)): sorted(bad)
        for p in files("tunery")
        if (
            bad := {
                n
                for n in full_imports(p)
                if n.split(".")[0] in ("flows", "tasks")
                or n == "tunery.cli"
                or n.startswith("tunery.cli.")
            }
        )
        and p != CLI
    }
    assert offenders == {}, "the library is imported by tasks/flows, never the other way"


def test_nothing_imports_the_cli():
    """cli.py is the entry point (it may start flows); no library, stage or flow module imports
    it, so the rules above hold for everything but the command line."""
    importers = [
        p
        for p in files("tunery") + files("tasks") + files("flows")
        if "tunery.cli" in full_imports(p) and p != CLI
    ]
    assert importers == []


def test_tasks_import_no_flows():
    offenders = [p for p in files("tasks") if "flows" in imports(p)]
    assert offenders == []


def test_flows_run_stages_through_dvc_only():
    """A flow never calls a stage's code: it runs `dvc repro` (DVC decides what is stale)."""
    offenders = [p for p in files("flows") if "tasks" in imports(p)]
    assert offenders == []


def _graph() -> dict[str, set[str]]:
    """tunery's module graph; the MLflow modules collapsed into one node, `tunery.tracking`."""
    paths = {module_name(p): p for p in files("tunery")}
    layer = {module_name(p): "tunery.tracking" for p in MLFLOW_MODULES}

    def owner(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return layer.get(name, name) if name and name != "tunery" else None

    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        node = layer.get(name, name)
        deps = {owner(n) for n in full_imports(path) if n.startswith("tunery.")}
        graph.setdefault(node, set()).update(d for d in deps if d and d != node)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (depth-first search), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles_in_the_library():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()) or [])


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
