"""Registry, gate, manual promotion and rollback on a temporary MLflow store."""

import hashlib
import itertools
import json
import shutil
import tempfile
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from tunery import mlflow_model, tracking
from tunery.config import load_params
from tunery.errors import TuneryError
from tunery.onnx import compress_report
from tunery.registry import gate_report, promotion, registration
from tunery.registry.refs import Registry

REPO = Path(__file__).resolve().parents[1]


def deploy_dir(tmp_path: Path, tag: str) -> Path:
    """A minimal deployable folder: an ONNX graph plus the files that travel beside it."""
    d = tmp_path / f"deploy-{tag}"
    d.mkdir()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], tag, [x], [y])
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), d / "model.onnx"
    )
    (d / "labels.json").write_text(json.dumps(["a", "b"]))
    (d / "tunery_model.json").write_text(json.dumps({"variant": tag}))
    return d


@pytest.fixture
def params():
    return load_params(
        REPO / "params.yaml",
        ["tracking.experiment=reg", "registry.model_name=m", "registry.min_delta=0.01"],
    )


def register(root, params, tag):
    with tracking.stage_run(root, params.tracking.experiment, "register", {}) as run:
        version = mlflow_model.register_deployable(
            run, deploy_dir(root, tag), params.registry.model_name, tags={"t": tag}
        )
    tracking.set_alias(root, params.registry.model_name, promotion.CHALLENGER, version)
    return version


def scores(f1):
    return {"macro_f1": f1, "per_class_f1": {"a": f1, "b": f1}}


def champion(root, params):
    return tracking.alias_version(root, params.registry.model_name, promotion.CHAMPION)


def test_gate_promotes_better_and_blocks_worse_and_missing(tmp_path, params):
    v1 = register(tmp_path, params, "one")
    assert promotion.gate_challenger(
        Registry.of(params, tmp_path),
        params.registry,
        v1,
        challenger=scores(0.7),
        champion=None,
        parity_passed=True,
    ).promote
    assert champion(tmp_path, params) == v1

    v2 = register(tmp_path, params, "two")
    d = promotion.gate_challenger(
        Registry.of(params, tmp_path),
        params.registry,
        v2,
        challenger=scores(0.65),
        champion=scores(0.7),
        parity_passed=True,
    )
    assert not d.promote and champion(tmp_path, params) == v1
    info = tracking.version_info(tmp_path, "m", v2)
    assert (
        info["tags"]["gate.decision"] == "rejected" and "min_delta" in info["tags"]["gate.reason"]
    )
    assert "challenger" in info["aliases"]

    v3 = register(tmp_path, params, "three")
    d = promotion.gate_challenger(
        Registry.of(params, tmp_path),
        params.registry,
        v3,
        challenger={"per_class_f1": {}},
        champion=scores(0.7),
        parity_passed=True,
    )
    assert not d.promote and champion(tmp_path, params) == v1

    v4 = register(tmp_path, params, "four")
    assert promotion.gate_challenger(
        Registry.of(params, tmp_path),
        params.registry,
        v4,
        challenger=scores(0.8),
        champion=scores(0.7),
        parity_passed=True,
    ).promote
    assert champion(tmp_path, params) == v4

    listed = {v["version"]: v["aliases"] for v in tracking.list_versions(tmp_path, "m")}
    assert listed[v4] == ["challenger", "champion"] and listed[v1] == []
    log = tracking.decisions(tmp_path, "reg", "m")
    assert [(e["action"], e["promoted"]) for e in log] == [
        ("gate", "True"),
        ("gate", "False"),
        ("gate", "False"),
        ("gate", "True"),
    ]
    assert log[-1]["from"] == v1 and log[-1]["to"] == v4


def test_manual_promote_and_rollback_are_recorded(tmp_path, params):
    v1, v2, v3 = (register(tmp_path, params, t) for t in ("a", "b", "c"))
    promotion.gate_challenger(
        Registry.of(params, tmp_path),
        params.registry,
        v1,
        challenger=scores(0.7),
        champion=None,
        parity_passed=True,
    )
    promotion.promote(Registry.of(params, tmp_path), v2, "hotfix for class b")
    promotion.promote(Registry.of(params, tmp_path), v3, "newer data")
    assert champion(tmp_path, params) == v3

    back = promotion.rollback(Registry.of(params, tmp_path), "v3 misbehaves in production")
    assert (back["from"], back["to"]) == (v3, v2) and champion(tmp_path, params) == v2
    promotion.rollback(Registry.of(params, tmp_path), "v2 too")
    assert champion(tmp_path, params) == v1
    with pytest.raises(TuneryError, match="no previous champion"):
        promotion.rollback(Registry.of(params, tmp_path), "again")

    log = tracking.decisions(tmp_path, "reg", "m")
    assert [e["action"] for e in log] == [
        "gate",
        "manual_promote",
        "manual_promote",
        "rollback",
        "rollback",
    ]
    assert log[1]["reason"] == "hotfix for class b"
    assert (
        tracking.version_info(tmp_path, "m", v3)["tags"]["promotion.rolled_back"]
        == "v3 misbehaves in production"
    )

    with pytest.raises(TuneryError, match="no version 99"):
        promotion.promote(Registry.of(params, tmp_path), "99", "typo")
    with pytest.raises(TuneryError, match="needs --reason"):
        promotion.promote(Registry.of(params, tmp_path), v2, " ")


def test_registered_model_is_a_pyfunc_carrying_its_sidecar_files(tmp_path, params):
    v1 = register(tmp_path, params, "one")
    tracking.set_alias(tmp_path, "m", promotion.CHAMPION, v1)
    got = tracking.download_model(tmp_path, "models:/m@champion", tmp_path / "dl")
    assert {"MLmodel", "requirements.txt", "input_example.json"} <= {p.name for p in got.iterdir()}
    deploy = got / "artifacts" / "deploy"
    assert {"model.onnx", "labels.json", "tunery_model.json"} == {p.name for p in deploy.iterdir()}
    assert json.loads((deploy / "tunery_model.json").read_text()) == {"variant": "one"}
    reqs = (got / "requirements.txt").read_text()
    assert "onnxruntime" in reqs and "cloudpickle" not in reqs
    mlmodel = (got / "MLmodel").read_text()
    assert "python_function:" in mlmodel and "onnx:" not in mlmodel
    assert "model_code_path" in mlmodel  # models from code: nothing pickled
    assert "signature:" in mlmodel


def test_registry_only_predictor_matches_the_local_folder(tmp_path, params, monkeypatch):
    import numpy as np

    from tasks import export
    from tests.test_export import make_data_dir, make_finetune_dir
    from tunery.config import ExportConfig
    from tunery.onnx.runtime import Predictor

    ft, data = make_finetune_dir(tmp_path), make_data_dir(tmp_path)
    export.run(ExportConfig(), finetune_dir=ft, data_dir=data, out_dir=tmp_path / "deploy")
    with tracking.stage_run(tmp_path, params.tracking.experiment, "register", {}) as run:
        version = mlflow_model.register_deployable(run, tmp_path / "deploy", "m")
    tracking.set_alias(tmp_path, "m", promotion.CHAMPION, version)

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)  # the project whose registry `models:/` reads
    texts = [
        "a small red animal that lives in the wild",
        "a hard hand tool used for cutting",
        "a warm dish",
    ]
    local = Predictor(tmp_path / "deploy", device="cpu").predict(texts)
    remote = Predictor("models:/m@champion", device="cpu")
    got = remote.predict(texts)
    assert got.labels == local.labels
    np.testing.assert_allclose(got.probabilities, local.probabilities, atol=1e-6)
    assert (
        remote.metadata["model_version"] == version and remote.metadata["registered_model"] == "m"
    )


def test_gate_refuses_when_the_champion_moved_since_the_evaluation(tmp_path, params):
    """Two pipelines at once: the second was evaluated against a champion that is gone."""
    v1, v2, v3 = (register(tmp_path, params, t) for t in ("a", "b", "c"))
    assert promotion.gate_challenger(
        Registry.of(params, tmp_path),
        params.registry,
        v1,
        challenger=scores(0.7),
        champion=None,
        parity_passed=True,
    ).promote
    promotion.promote(Registry.of(params, tmp_path), v2, "another run won meanwhile")
    evaluated_against_v1 = {**scores(0.7), "path": f"models:/m/{v1}"}
    d = promotion.gate_challenger(
        Registry.of(params, tmp_path),
        params.registry,
        v3,
        challenger=scores(0.9),
        champion=evaluated_against_v1,
        parity_passed=True,
    )
    assert not d.promote and f"moved from version {v1} to {v2}" in d.reason
    assert champion(tmp_path, params) == v2
    assert tracking.version_info(tmp_path, "m", v3)["tags"]["gate.decision"] == "rejected"


def test_a_failing_registry_is_never_read_as_no_champion(tmp_path, params, monkeypatch):
    """Only "no such model/alias" means no champion; any other error must not let the gate
    treat a challenger as the first model (fail closed)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    assert champion(tmp_path, params) is None  # no model yet
    v1 = register(tmp_path, params, "one")
    assert champion(tmp_path, params) is None  # model, but no such alias

    def broken(self, name, alias):
        raise MlflowException("the registry is unreachable", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", broken)
    with pytest.raises(MlflowException, match="unreachable"):
        promotion.gate_challenger(
            Registry.of(params, tmp_path),
            params.registry,
            v1,
            challenger=scores(0.9),
            champion=None,
            parity_passed=True,
        )


def stage_deployable(root: Path, tag: str, *, challenger, champion) -> None:
    """What the stages leave for registration: models/deploy (same tag, same bytes), the
    evaluation's gate.json and the compress report, where params.yaml puts them."""
    paths = load_params(REPO / "params.yaml")
    deploy = root / paths.compress.out_dir
    shutil.rmtree(deploy, ignore_errors=True)
    deploy.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(deploy_dir(Path(tempfile.mkdtemp(dir=root)), tag), deploy)
    sha = hashlib.sha256((deploy / "model.onnx").read_bytes()).hexdigest()
    (deploy / "tunery_model.json").write_text(json.dumps({"variant": tag, "sha256": sha}))
    for path, data in (
        (
            gate_report.path_in(Path(paths.evaluate.report_dir)),
            {"challenger": challenger, "champion": champion},
        ),
        (compress_report.path_in(Path(paths.compress.report_dir)), {"parity_passed": True}),
    ):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(json.dumps(data))


def pipeline_tail(root, params, tag, *, challenger, champion):
    """A pipeline run's registry step on what the stages left."""
    stage_deployable(root, tag, challenger=challenger, champion=champion)
    with tracking.pipeline_run(root, params.tracking.experiment) as run:
        return registration.register_and_gate(root, params, run)


def against(f1, version):
    """Champion numbers as `evaluate` records them when it compared against the registry."""
    return {**scores(f1), "path": f"models:/m/{version}"}


def test_unchanged_challenger_is_regated_once_evaluated_against_the_current_champion(
    tmp_path, params
):
    """The champion moves between evaluate and the gate: the gate refuses (fail closed). DVC sees
    nothing stale, so a re-run finds the model unchanged: it must say the evaluation is stale
    (never promote on it), and gate the same version once evaluate compared it against the
    current champion."""
    first = pipeline_tail(tmp_path, params, "one", challenger=scores(0.7), champion=None)
    v1 = first["version"]
    assert first["promoted"] and champion(tmp_path, params) == v1

    # evaluated against v1; meanwhile another run's model becomes the champion
    v2 = register(tmp_path, params, "other")
    promotion.promote(Registry.of(params, tmp_path), v2, "another run won meanwhile")
    refused = pipeline_tail(
        tmp_path, params, "two", challenger=scores(0.9), champion=against(0.7, v1)
    )
    v3 = refused["version"]
    assert refused["registered"] and not refused["promoted"]
    assert f"moved from version {v1} to {v2}" in refused["reason"]

    # re-run, evaluate still up to date in DVC: the stale comparison is reported, never promoted
    again = pipeline_tail(
        tmp_path, params, "two", challenger=scores(0.9), champion=against(0.7, v1)
    )
    assert not again["registered"] and again["version"] == v3 and not again.get("promoted")
    assert f"compared against version {v1}" in again["summary"]
    assert "evaluate" in again["summary"] and champion(tmp_path, params) == v2
    n_decisions = len(tracking.decisions(tmp_path, "reg", "m"))

    # evaluate re-run against the current champion: the unchanged version is gated again
    fresh = pipeline_tail(
        tmp_path, params, "two", challenger=scores(0.9), champion=against(0.7, v2)
    )
    assert not fresh["registered"] and fresh["version"] == v3 and fresh["promoted"], fresh
    assert champion(tmp_path, params) == v3
    assert tracking.alias_version(tmp_path, "m", promotion.CHALLENGER) == v3
    log = tracking.decisions(tmp_path, "reg", "m")
    assert len(log) == n_decisions + 1 and (log[-1]["from"], log[-1]["to"]) == (v2, v3)
    tags = tracking.version_info(tmp_path, "m", v3)["tags"]
    assert (tags["gate.champion_version"], tags["gate.compared_version"]) == (v2, v2)

    # nothing changed since: the decision stands, nothing is gated twice
    same = pipeline_tail(tmp_path, params, "two", challenger=scores(0.9), champion=against(0.7, v2))
    assert not same["registered"] and "unchanged" in same["summary"]
    assert len(tracking.decisions(tmp_path, "reg", "m")) == len(log)

    # a rolled-back version is never put back by the gate, even on a fresh comparison
    promotion.rollback(Registry.of(params, tmp_path), "v3 misbehaves")
    promotion.promote(Registry.of(params, tmp_path), v1, "back to the first")
    back = pipeline_tail(tmp_path, params, "two", challenger=scores(0.9), champion=against(0.7, v1))
    assert not back.get("promoted") and "rolled back" in back["summary"]
    assert champion(tmp_path, params) == v1


def test_promoting_a_gate_rejected_version_needs_force_and_is_recorded(tmp_path, params):
    v1, v2 = (register(tmp_path, params, t) for t in ("a", "b"))
    promotion.gate_challenger(
        Registry.of(params, tmp_path),
        params.registry,
        v1,
        challenger=scores(0.7),
        champion=None,
        parity_passed=True,
    )
    promotion.gate_challenger(
        Registry.of(params, tmp_path),
        params.registry,
        v2,
        challenger=scores(0.6),
        champion=scores(0.7),
        parity_passed=True,
    )
    with pytest.raises(TuneryError, match="rejected by the gate.*--force"):
        promotion.promote(Registry.of(params, tmp_path), v2, "I know better")
    assert champion(tmp_path, params) == v1
    record = promotion.promote(Registry.of(params, tmp_path), v2, "I know better", force=True)
    assert record["forced"] is True and "min_delta" in record["gate_reason"]
    assert champion(tmp_path, params) == v2
    assert tracking.decisions(tmp_path, "reg", "m")[-1]["forced"] in (True, "True")  # a tag


def _promote_in_process(root: str, version: str, queue) -> None:
    params = load_params(REPO / "params.yaml", ["tracking.experiment=reg", "registry.model_name=m"])
    try:
        queue.put(
            promotion.promote(Registry.of(params, Path(root)), version, f"race {version}")["from"]
        )
    except TuneryError as exc:  # "already the champion" is a fair answer in a race
        queue.put(f"refused: {exc}")


def test_simultaneous_promotions_are_serialized_and_the_log_agrees(tmp_path, params):
    """Eight processes promote at the same instant: every change reads the champion the previous
    one left (no lost update), and the log's last entry is the alias."""
    import multiprocessing as mp

    versions = [register(tmp_path, params, f"v{i}") for i in range(8)]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_promote_in_process, args=(str(tmp_path), v, queue)) for v in versions
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    answers = [queue.get(timeout=5) for _ in procs]
    log = [e for e in tracking.decisions(tmp_path, "reg", "m") if e["action"] == "manual_promote"]
    assert len(log) == sum(not str(a).startswith("refused") for a in answers)
    froms = [e["from"] for e in log]
    assert len(set(froms)) == len(froms), f"two promotions read the same champion: {froms}"
    for before, after in itertools.pairwise(log):
        assert after["from"] == before["to"]
    assert champion(tmp_path, params) == log[-1]["to"]


def test_predict_and_serve_default_to_the_champion_not_the_candidate(tmp_path, params):
    """`tunery predict`/`serve-model` without --model serve the registry champion; a gate-rejected
    candidate in models/deploy is never the default."""
    from tunery.cli import _model_source, build_parser

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    for cmd in (["predict", "x.csv", "-o", "y.csv"], ["serve-model"]):
        assert build_parser().parse_args(cmd).model == "champion"
    name = load_params(tmp_path / "params.yaml").registry.model_name
    with pytest.raises(TuneryError, match="no champion yet.*models/deploy"):
        _model_source("champion", tmp_path)
    own = load_params(tmp_path / "params.yaml", ["tracking.experiment=reg"])
    v1 = register(tmp_path, own, "one")
    promotion.gate_challenger(
        Registry.of(own, tmp_path),
        own.registry,
        v1,
        challenger=scores(0.9),
        champion=None,
        parity_passed=True,
    )
    assert _model_source("champion", tmp_path) == f"models:/{name}@champion"
    assert _model_source("models/deploy", tmp_path) == str(tmp_path / "models/deploy")
