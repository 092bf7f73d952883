"""The MLflow server going away mid-run: the run fails closed with a named error, and a re-run on
the restarted server completes (tunery/tracking.py StoreUnreachable; the gate's write order in
tunery/registry/promotion.py; the pending tag of tunery/registry/registration.py).

Fast: MLflow's wording of a server that did not answer becomes a StoreUnreachable naming the
server; an HTTP error status does not.

Slow (~4-6 min on 2 busy cores): a real `mlflow server` (sqlite backend, proxied artifacts) and
`tunery run` in this process. The server is SIGKILLed twice at the registry step, where it hurts:
  1. right after the new model version was created (before its challenger alias and gate);
  2. on the re-run, after the gate decided to promote and logged it, just before the champion
     alias moves (before the fix, a re-run then found the version "gated" and never promoted it).
Each time: exit 1, one line naming the server and what to do, no traceback, no stage re-run, no
alias moved; the server is restarted on the same backend and port. The third run promotes the
one version to champion without training anything again.
"""

from __future__ import annotations

import contextlib
import json
import signal
import types
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.conftest import init_repo
from tests.services import QUIET_ENV, free_port, mlflow_server
from tests.test_end_to_end import tiny_params
from tunery import tracking
from tunery.errors import EXIT_FAILED

MODEL = "tunery-classifier"


def test_a_server_that_did_not_answer_is_named():
    refused = mlflow.MlflowException(
        "API request to http://127.0.0.1:5123/api/2.0/mlflow/registered-models/alias failed with "
        "exception HTTPConnectionPool(host='127.0.0.1', port=5123): Max retries exceeded with url: "
        "/api/2.0/mlflow/registered-models/alias (Caused by NewConnectionError('<...>: Failed to "
        "establish a new connection: [Errno 111] Connection refused'))"
    )
    err = tracking.unreachable(refused, "set_registered_model_alias")
    assert err.server == "http://127.0.0.1:5123"
    assert str(err).startswith(
        "the MLflow server at http://127.0.0.1:5123 stopped answering "
        "(set_registered_model_alias: Connection refused)"
    )
    assert "re-run" in str(err) and "tunery check" in str(err)
    status = mlflow.MlflowException(
        "API request to endpoint /api/2.0/mlflow/runs/create failed with error code 500 != 200"
    )
    assert tracking.unreachable(status, "create_run") is None
    assert tracking.unreachable(ValueError("API request to x failed with exception y"), "") is None

    def down():
        raise refused

    with pytest.raises(tracking.StoreUnreachable, match="stopped answering"):
        tracking.retry_locked(down)


def test_a_stage_is_not_retried_when_its_server_went_away():
    from flows.pipeline import _retry_unless_user_error
    from tunery.runner.steps import StageFailed

    def state(exc):
        return types.SimpleNamespace(result=lambda raise_on_failure: exc)

    gone = tracking.StoreUnreachable("http://127.0.0.1:5123", "log_batch", "Connection refused")
    assert not _retry_unless_user_error(None, None, state(gone))
    assert not _retry_unless_user_error(None, None, state(StageFailed("bad", user_error=True)))
    assert _retry_unless_user_error(None, None, state(StageFailed("flaky", user_error=False)))
    assert not _retry_unless_user_error(
        None, None, state(StageFailed("gone", user_error=False, named=True))
    )


@pytest.mark.parametrize(
    ("stage_exit", "printed", "user_error", "named", "run_exit"),
    [
        (3, "tunery x: error: params.yaml: bad key", True, True, 3),
        (4, "tunery x: error: the registry refused", True, True, 4),
        (1, "tunery x: error: the MLflow server at http://h:1 stopped answering", False, True, 1),
        (1, "Traceback (most recent call last): a bug", False, False, 1),
    ],
)
def test_a_failed_stage_is_classed_by_its_own_exit_code(
    tmp_path, stage_exit, printed, user_error, named, run_exit
):
    """Through real DVC: the stage's exit code (not the words it printed) makes a user error; a
    server that went away stays exit 1 (seen before: `tunery run` exited 3 for a dead server)."""
    import subprocess
    import sys

    from tunery.runner.steps import StageFailed, dvc_command, tool_env

    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True, env=tool_env())
    script = f"import sys; print({printed!r}); sys.exit({stage_exit})"
    stage = {"stages": {"x": {"cmd": f"{sys.executable} -c {json.dumps(script)}"}}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(stage))
    with pytest.raises(StageFailed) as failed:
        dvc_command(tmp_path, "repro", "x", on_line=lambda line: None)
    assert (failed.value.user_error, failed.value.named) == (user_error, named)
    assert failed.value.exit_code == run_exit


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    from tunery import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["run", *argv])
    out, err = capsys.readouterr()
    return done.value.code, out, err


def kill_at(monkeypatch, module, name: str, server, *, after: bool, when=lambda *a: True):
    """Make `module.name` SIGKILL the MLflow server (once) just before or just after it runs."""
    original = getattr(module, name)
    fired = []

    def wrapper(*args, **kwargs):
        hit = not fired and when(*args)
        if hit and not after:
            fired.append(server.stop(signal.SIGKILL))
        result = original(*args, **kwargs)
        if hit and after:
            fired.append(server.stop(signal.SIGKILL))
        return result

    monkeypatch.setattr(module, name, wrapper)
    return fired


def assert_failed_closed(code: int, err: str, uri: str, project: Path) -> None:
    lines = [line for line in err.splitlines() if line.startswith("tunery: error:")]
    assert code == EXIT_FAILED, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"tunery: error: the MLflow server at {uri} stopped answering")
    assert "re-run" in lines[0]
    # the last word is ours (Prefect logs the failed task's traceback above it, as for any task)
    assert err.strip().splitlines()[-1] == lines[0], err[-3000:]
    # the stages' outputs are the last good ones: DVC finds nothing to re-run
    from tunery.runner.landing import stale_stages

    assert stale_stages(project) == []
    assert (project / "metrics" / "evaluate.json").is_file()


@pytest.mark.slow
def test_the_server_going_away_at_registration_fails_closed_and_a_rerun_completes(
    project, tmp_path, monkeypatch, capsys
):
    from tunery import mlflow_model

    init_repo(project)
    tiny_params(project)
    monkeypatch.chdir(project)
    work = tmp_path / "mlflow"
    work.mkdir()
    backend, artifacts, port = (
        f"sqlite:///{work / 'server.db'}",
        str(work / "artifacts"),
        free_port(),
    )
    for key, value in QUIET_ENV.items():
        monkeypatch.setenv(key, value)
    # a dead server fails in seconds here, not after MLflow's ~2 minutes of retries per call
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

    with contextlib.ExitStack() as stack:
        # the same backend and port each time: a server restarted where its clients expect it
        uri, server = stack.enter_context(mlflow_server(work, backend, artifacts, port=port))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

        # 1. the server dies right after the version was created
        with pytest.MonkeyPatch.context() as hooks:
            fired = kill_at(hooks, mlflow_model, "register", server, after=True)
            code, _, err = run_cli(capsys)
        assert fired, err[-3000:]
        assert_failed_closed(code, err, uri, project)
        uri, server = stack.enter_context(mlflow_server(work, backend, artifacts, port=port))
        [version] = tracking.list_versions(project, MODEL)
        assert version["aliases"] == [] and version["tags"]["gate.decision"] == "pending"
        assert tracking.decisions(project, "test", MODEL) == []

        # 2. on the re-run, the server dies after the gate logged "promote", before the alias moves
        with pytest.MonkeyPatch.context() as hooks:
            fired = kill_at(
                hooks,
                tracking,
                "set_alias",
                server,
                after=False,
                when=lambda root, name, alias, *rest: alias == "champion",
            )
            code, _, err = run_cli(capsys)
        assert fired, err[-3000:]
        assert_failed_closed(code, err, uri, project)
        uri, server = stack.enter_context(mlflow_server(work, backend, artifacts, port=port))
        [version] = tracking.list_versions(project, MODEL)
        assert version["aliases"] == ["challenger"], version  # no champion: nothing moved
        assert "gate.champion_version" not in version["tags"]  # the gate did not finish
        assert tracking.alias_version(project, MODEL, "champion") is None

        # 3. the server stays up: the re-run gates the same version again and promotes it
        code, out, err = run_cli(capsys)
        assert code == 0, err[-3000:]
        # (stdout has Prefect's log lines too: its console handler is bound to the captured
        # stdout of this process's first run)
        assert "stages run: none (everything up to date)" in out, out[-3000:]  # nothing trained
        [version] = tracking.list_versions(project, MODEL)
        assert sorted(version["aliases"]) == ["challenger", "champion"], version
        assert version["tags"]["gate.decision"] == "promoted"
        assert version["tags"]["gate.champion_version"] == "none"
        log = tracking.decisions(project, "test", MODEL)
        # the promotion is recorded; the gate cut short in 2 had logged its decision already
        assert [(e["action"], e["to"]) for e in log] == [("gate", "1"), ("gate", "1")], log


@pytest.mark.slow
def test_the_server_going_away_during_a_stage_stops_the_run_and_a_rerun_completes(
    project, tmp_path, monkeypatch, capsys
):
    """The server dies while the export stage's tracking streams in: the stage's files are done
    (DVC has them), its tracking is not; the flow stops there, with one retry allowed it is not
    retried (a retry would skip the stage and call it a success), and the re-run goes on from the
    next stage to a champion."""
    from tunery.runner.landing import stale_stages

    init_repo(project)
    tiny_params(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["pipeline"].update(retries=1, retry_delay_seconds=0.0)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(project)
    work = tmp_path / "mlflow"
    work.mkdir()
    backend, artifacts, port = (
        f"sqlite:///{work / 'server.db'}",
        str(work / "artifacts"),
        free_port(),
    )
    for key, value in QUIET_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

    with contextlib.ExitStack() as stack:
        uri, server = stack.enter_context(mlflow_server(work, backend, artifacts, port=port))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.MonkeyPatch.context() as hooks:
            fired = kill_at(
                hooks,
                tracking,
                "open_stage_run",
                server,
                after=True,
                when=lambda root, experiment, stage, *rest: stage == "export",
            )
            code, out, err = run_cli(capsys)
        assert fired, err[-3000:]
        lines = [line for line in err.splitlines() if line.startswith("tunery: error:")]
        assert code == EXIT_FAILED and len(lines) == 1, err[-3000:]
        assert lines[0].startswith(f"tunery: error: the MLflow server at {uri} stopped answering")
        # (DVC's lines come through Prefect's logger: on stdout or stderr)
        assert (out + err).count("Running stage 'export'") == 1, err[-3000:]  # it ran once
        # the stages before export and export itself are done; the flow stopped after it
        stale = stale_stages(project)
        assert "export" not in stale and "finetune" not in stale
        assert {"compress", "evaluate"} <= set(stale), stale

        uri, server = stack.enter_context(mlflow_server(work, backend, artifacts, port=port))
        assert tracking.list_versions(project, MODEL) == []
        code, out, err = run_cli(capsys)
        assert code == 0, err[-3000:]
        assert "Running stage 'export'" not in out + err and "Running stage 'compress'" in out + err
        assert tracking.alias_version(project, MODEL, "champion") == "1"
