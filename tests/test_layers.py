"""The layering rules of the design: mlflow only in the tracking modules, prefect only in flows/."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def sources():
    for folder in ("tunery", "tasks", "flows", "bench"):
        yield from (REPO / folder).rglob("*.py")


# runs, store and aliases; the model side (pyfunc, LoggedModels); the pyfunc's loader script
MLFLOW_MODULES = {
    REPO / "tunery" / n for n in ("tracking.py", "mlflow_model.py", "mlflow_model_code.py")
}


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
