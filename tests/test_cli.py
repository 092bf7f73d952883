"""The CLI convention (issue 17): --help everywhere, help on every flag, -p/--set wherever params
are read (written into params.yaml for commands that run DVC stages), --json that parses, exit
codes by class, one-line errors, cheap checks before expensive loads.

Fast: no flow, no training. The flows are stood in for by modules in sys.modules, as a flow run
would import them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from tunery import cli
from tunery.errors import (
    EXIT_FAILED,
    EXIT_INPUT,
    EXIT_REFUSED,
    EXIT_USAGE,
    ConfigError,
    DataValidationError,
    Refused,
    TuneryError,
)
from tunery.runner.steps import StageFailed

REPO = Path(__file__).resolve().parents[1]
READS_NO_PARAMS = {"ui"}  # the MLflow UI needs only the store's URI


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for every command and subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from commands(sub, (*path, name))


def leaves():
    return [
        (path, p)
        for path, p in commands(cli.build_parser())
        if not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)
    ]


def run_main(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    return done.value.code


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder with the real params.yaml and dvc.yaml, as the cwd."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fake_flow(monkeypatch, module: str, name: str, fn) -> None:
    monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(**{name: fn}))
    monkeypatch.setattr(cli, "_start_flow_services", lambda root, params: None)


def flow_result(promoted: bool = False) -> dict:
    return {
        "run_id": "abc123",
        "stages": [
            {"stage": "ingest", "ran": True, "seconds": 1.0},
            {"stage": "prepare", "ran": False, "seconds": 0.1},
        ],
        "registry": {
            "registered": True,
            "version": "3",
            "promoted": promoted,
            "reason": "macro-F1 gain 0.0010 is below registry.min_improvement 0.005",
            "summary": "version 3 registered as challenger; not promoted: ...",
        },
        "timing": {"wall_seconds": 10.0, "overhead_seconds": 1.0, "overhead_share": 0.1},
    }


def test_every_command_accepts_help(capsys):
    assert run_main(["--help"]) == 0
    assert "exit codes:" in capsys.readouterr().out
    for path, _ in commands(cli.build_parser()):
        assert run_main([*path, "--help"]) == 0, path


def test_every_option_and_argument_has_help():
    missing = []
    for path, p in [((), cli.build_parser()), *commands(cli.build_parser())]:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(
                    f"tunery {' '.join(path)} {'/'.join(action.option_strings) or action.dest}"
                )
    assert missing == []


def test_params_flags_wherever_params_are_read():
    for path, p in leaves():
        if path[0] in READS_NO_PARAMS:
            continue
        options = {o for a in p._actions for o in a.option_strings}
        assert {"-p", "--params", "--set"} <= options, path


def test_json_flag_where_scripts_read_the_output():
    with_json = {
        path for path, p in leaves() if any("--json" in a.option_strings for a in p._actions)
    }
    assert {("models",), ("check",), ("run",), ("retrain",)} <= with_json


def test_exit_codes_by_class():
    assert ConfigError("x").exit_code == DataValidationError("f", "r", "d").exit_code == EXIT_INPUT
    assert TuneryError("x").exit_code == EXIT_FAILED
    assert Refused("x").exit_code == EXIT_REFUSED
    assert StageFailed("x", user_error=True).exit_code == EXIT_INPUT
    assert StageFailed("x", user_error=False).exit_code == EXIT_FAILED
    assert len({EXIT_FAILED, EXIT_USAGE, EXIT_INPUT, EXIT_REFUSED, 0}) == 5


def test_usage_error_is_2(project, capsys):
    assert run_main(["run", "--no-such-flag"]) == EXIT_USAGE
    assert run_main(["serve-model", "--port", "0"]) == EXIT_USAGE
    assert run_main(["schedule", "--interval", "-5"]) == EXIT_USAGE


def test_check_is_short_by_default_and_full_with_show(project, capsys):
    assert run_main(["check", "--set", f"ingest.source.path={project}"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) <= 8 and "OK:" in out and "stages:" in out and "MLflow:" in out
    assert "split_salt" not in out
    assert run_main(["check", "--show", "--set", f"ingest.source.path={project}"]) == 0
    assert "split_salt:" in capsys.readouterr().out


def test_check_json_parses(project, capsys):
    assert run_main(["check", "--json", "--show", "--set", f"ingest.source.path={project}"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["stages"][0] == "ingest"
    assert doc["params"]["ingest"]["source"]["path"] == str(project)


def test_bad_config_is_exit_3_one_line_and_json(project, capsys):
    assert run_main(["check", "--json", "--set", "finetune.method=lorax"]) == EXIT_INPUT
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {
        "ok": False,
        "exit_code": EXIT_INPUT,
        "error": json.loads(captured.out)["error"],
    }
    assert "finetune.method" in captured.err and "Traceback" not in captured.err
    assert run_main(["check", "--set", "finetune.lora.r=["]) == EXIT_INPUT
    assert "not valid YAML" in capsys.readouterr().err


def test_run_writes_overrides_into_params_yaml_before_the_flow(project, monkeypatch, capsys):
    seen = {}

    def pipeline_flow(**kwargs):
        seen["params"] = yaml.safe_load((project / "params.yaml").read_text())
        seen["kwargs"] = kwargs
        print("a stage's output line")  # must not reach stdout with --json
        return flow_result()

    fake_flow(monkeypatch, "flows.pipeline", "pipeline_flow", pipeline_flow)
    before = (project / "params.yaml").read_text()
    (project / "plots" / "compress").mkdir(parents=True)
    (project / "plots" / "compress" / "tradeoff.png").write_bytes(b"png")
    assert run_main(["run", "--json", "--set", "finetune.epochs=1", "-p", "params.yaml"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert seen["params"]["finetune"]["epochs"] == 1  # what DVC will record in dvc.lock
    assert "# at most (every arm)" in (project / "params.yaml").read_text()  # comments kept
    assert doc["params_changed"] == ["finetune.epochs: 2.0 -> 1"]
    assert "params.yaml changed" in captured.err and "a stage's output line" in captured.err
    assert doc["stages_ran"] == ["ingest"] and doc["run_id"] == "abc123"
    params = yaml.safe_load(before)
    assert doc["gate"] == {
        "decision": "champion kept",
        "reason": flow_result()["registry"]["reason"],
        "version": "3",
    }
    assert doc["paths"]["deployable_model"] == params["compress"]["out_dir"]
    assert doc["paths"]["plots"] == ["plots/compress/tradeoff.png"]
    commands = [n["command"] for n in doc["next"]]
    assert "tunery ui" in commands and "tunery serve-model" in commands
    assert f"tunery predict FILE -o scored.csv --model {params['compress']['out_dir']}" in commands


def test_run_prints_the_end_of_run_summary(project, monkeypatch, capsys):
    fake_flow(monkeypatch, "flows.pipeline", "pipeline_flow", lambda **kw: flow_result(True))
    assert run_main(["run"]) == 0
    out = capsys.readouterr().out
    assert "stages run: ingest" in out
    assert "gate: promoted to champion (version 3): macro-F1 gain" in out
    assert "deployable model: models/deploy" in out
    assert "tunery predict FILE -o scored.csv" in out and "tunery ui" in out
    assert "http://" not in out.replace("127.0.0.1:8000", "")  # no link to a server that exited


def test_run_bad_override_changes_nothing_and_runs_nothing(project, monkeypatch, capsys):
    fake_flow(monkeypatch, "flows.pipeline", "pipeline_flow", lambda **kw: pytest.fail("ran"))
    before = (project / "params.yaml").read_text()
    assert run_main(["run", "--set", "finetune.epochs=many"]) == EXIT_INPUT
    assert run_main(["run", "no-such-stage"]) == EXIT_INPUT
    assert "unknown stage(s) no-such-stage" in capsys.readouterr().err
    assert (project / "params.yaml").read_text() == before


def test_run_stage_failure_is_exit_1_and_bad_stage_input_exit_3(project, monkeypatch, capsys):
    def failing(user_error):
        def pipeline_flow(**kwargs):
            raise StageFailed("`dvc repro finetune` failed (exit 1)", user_error=user_error)

        return pipeline_flow

    fake_flow(monkeypatch, "flows.pipeline", "pipeline_flow", failing(False))
    assert run_main(["run", "--json"]) == EXIT_FAILED
    assert json.loads(capsys.readouterr().out)["exit_code"] == EXIT_FAILED
    fake_flow(monkeypatch, "flows.pipeline", "pipeline_flow", failing(True))
    assert run_main(["run"]) == EXIT_INPUT


def test_retrain_json_parses(project, monkeypatch, capsys):
    def retrain_flow(project, ignore_drift):
        return {"status": "nothing to do", "added": []}

    fake_flow(monkeypatch, "flows.retrain", "retrain_flow", retrain_flow)
    assert run_main(["retrain", "--json", "--set", "retrain.drift.enabled=false"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"] == "nothing to do" and doc["params_changed"]
    assert (
        yaml.safe_load((project / "params.yaml").read_text())["retrain"]["drift"]["enabled"]
        is False
    )

    def retrained(project, ignore_drift):
        return {
            "status": "retrained",
            "added": ["a.csv"],
            "stale": [],
            "drift": None,
            **flow_result(),
        }

    fake_flow(monkeypatch, "flows.retrain", "retrain_flow", retrained)
    assert run_main(["retrain", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["gate"]["decision"] == "champion kept" and doc["stages_ran"] == ["ingest"]


def test_json_stdout_holds_only_the_document_even_from_subprocesses(project, monkeypatch, capfd):
    def pipeline_flow(**kwargs):
        subprocess.run([sys.executable, "-c", "print('from a child process')"], check=True)
        return flow_result()

    fake_flow(monkeypatch, "flows.pipeline", "pipeline_flow", pipeline_flow)
    assert run_main(["run", "--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["ok"] is True
    assert "from a child process" in err


def test_models_json_parses(project, monkeypatch, capsys):
    from tunery import tracking

    version = {
        "version": "2",
        "aliases": ["champion"],
        "tags": {"gate.decision": "promoted", "gate.reason": "better"},
        "run_id": "r",
        "created": 1,
        "metrics": {"holdout_macro_f1": 0.9},
    }
    monkeypatch.setattr(tracking, "list_versions", lambda root, name: [version])
    monkeypatch.setattr(tracking, "decisions", lambda root, exp, name: [{"action": "gate"}])
    assert run_main(["models", "--json", "--log"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["versions"][0]["holdout_macro_f1"] == 0.9 and doc["log"] == [{"action": "gate"}]
    assert run_main(["models", "--set", "registry.model_name=other"]) == 0
    assert "0.9000" in capsys.readouterr().out


def test_refused_promotion_is_exit_4(project, monkeypatch, capsys):
    from tunery.registry import promotion

    def promote(*args, **kwargs):
        raise Refused("version 3 was rejected by the gate (...)")

    monkeypatch.setattr(promotion, "promote", promote)
    assert run_main(["promote", "3", "--reason", "r"]) == EXIT_REFUSED
    assert capsys.readouterr().err.count("\n") == 1


def test_bad_cron_is_one_line_before_anything_starts(project, capsys):
    before = (project / "params.yaml").read_text()
    assert run_main(["schedule", "--cron", "61 * * *", "--set", "finetune.epochs=1"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tunery: error: --cron '61 * * *'")
    assert (project / "params.yaml").read_text() == before


def test_predict_checks_files_before_loading_the_model(project, monkeypatch, capsys):
    import tunery.onnx.runtime

    monkeypatch.setattr(tunery.onnx.runtime, "Predictor", lambda *a, **k: pytest.fail("loaded"))
    args = ["-o", "out.csv", "--model", "models/deploy"]
    assert run_main(["predict", "missing.csv", *args]) == EXIT_INPUT
    assert "missing.csv: file not found" in capsys.readouterr().err
    (project / "in.csv").write_text("body\nhello\n")
    assert run_main(["predict", "in.csv", "-o", "out.txt", "--model", "m"]) == EXIT_INPUT
    assert "unsupported output format '.txt'" in capsys.readouterr().err
    assert run_main(["predict", "in.csv", *args]) == EXIT_INPUT
    assert "no column 'text'" in capsys.readouterr().err
    (project / "in.jsonl").write_text('{"body": "hi"}\n')
    assert run_main(["predict", "in.jsonl", *args, "--text-column", "text"]) == EXIT_INPUT


# --------------------------------------------------------------------------- models
def test_models_lists_the_named_registry_with_its_log(project, monkeypatch, capsys):
    from tunery import tracking

    asked = []
    version = {
        "version": "3",
        "aliases": ["challenger", "champion"],
        "tags": {"gate.decision": "promoted", "gate.reason": "macro-F1 gain 0.02"},
        "run_id": "r",
        "created": 1,
        "metrics": {},  # an older version: the number is a tag
    }
    version["tags"]["holdout_macro_f1"] = "0.8123"
    monkeypatch.setattr(
        tracking, "list_versions", lambda root, name: asked.append(name) or [version]
    )
    monkeypatch.setattr(
        tracking,
        "decisions",
        lambda root, exp, name: (
            asked.append((exp, name))
            or [{"utc": "t", "action": "gate", "from": None, "to": "3", "reason": "first"}]
        ),
    )
    argv = [
        "models",
        "--log",
        "--set",
        "registry.model_name=other",
        "--set",
        "tracking.experiment=e",
    ]
    assert run_main(argv) == 0
    out = capsys.readouterr().out
    assert asked == ["other", ("e", "other")]  # the Registry of the command's params
    assert "challenger,champion" in out and "0.8123" in out and "macro-F1 gain 0.02" in out
    assert "promotion log (oldest first)" in out and "gate" in out and "first" in out
    monkeypatch.setattr(tracking, "list_versions", lambda root, name: [])
    assert run_main(["models"]) == 0
    assert "has no registered versions yet" in capsys.readouterr().out


def test_models_bad_params_is_exit_3_before_the_registry_is_asked(project, monkeypatch, capsys):
    from tunery import tracking

    monkeypatch.setattr(tracking, "list_versions", lambda *a: pytest.fail("asked the registry"))
    assert run_main(["models", "--set", "registry.min_delta=-1"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert err.startswith("tunery: error: params.yaml") and "registry.min_delta: Input" in err
    assert run_main(["models", "--json", "--set", "registry.nme=x"]) == EXIT_INPUT
    assert json.loads(capsys.readouterr().out)["ok"] is False
    assert run_main(["models", "--no-such-flag"]) == EXIT_USAGE


# --------------------------------------------------------------------------- demo-shard
def _tiny_wordnet(folder: Path) -> Path:
    """Three glosses each of two categories (noun.animal, noun.food), in WordNet's file format."""
    header = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    nouns = [header]
    for i in range(6):
        nouns.append(f"{i:08d} 05 n 01 beast{i} 0 000 | a kind of animal number {i}  \n")
        nouns.append(f"{100 + i:08d} 13 n 01 dish{i} 0 000 | a kind of food number {i}  \n")
    folder.mkdir()
    (folder / "data.noun").write_text("".join(nouns))
    for pos in ("verb", "adj", "adv"):
        (folder / f"data.{pos}").write_text(header)
    return folder


def _wordnet_sets(project: Path) -> list[str]:
    wn = _tiny_wordnet(project / "wn")
    return [
        "--set", f"ingest.source.path={wn}",
        "--set", "ingest.source.categories=[noun.animal, noun.food]",
        "--set", "ingest.source.max_per_class=2",
    ]  # fmt: skip


def test_demo_shard_releases_the_next_shard_until_none_is_left(project, capsys):
    sets = _wordnet_sets(project)
    params_before = (project / "params.yaml").read_text()
    landing = project / yaml.safe_load(params_before)["retrain"]["landing"]
    assert run_main(["demo-shard", "--per-class", "2", *sets]) == 0
    assert run_main(["demo-shard", "--per-class", "2", *sets]) == 0
    out = capsys.readouterr().out
    assert "released data/landing/wordnet-shard-000.csv" in out and "tunery retrain" in out
    shards = sorted(landing.glob("wordnet-shard-*.csv"))
    assert [p.name for p in shards] == ["wordnet-shard-000.csv", "wordnet-shard-001.csv"]
    import pandas as pd

    first, second = (pd.read_csv(p) for p in shards)
    assert len(first) == len(second) == 4 and set(first["text"]).isdisjoint(second["text"])
    assert sorted(first["label"].unique()) == ["noun.animal", "noun.food"]
    # 6 glosses per class: the base (2) and two shards (2 + 2); a third has nothing left
    assert run_main(["demo-shard", "--per-class", "2", *sets]) == EXIT_FAILED
    assert "no glosses left for shard 2" in capsys.readouterr().err
    assert len(list(landing.glob("wordnet-shard-*.csv"))) == 2  # nothing half-written
    assert (project / "params.yaml").read_text() == params_before  # --set: this command only


def test_demo_shard_bad_input(project, capsys):
    assert run_main(["demo-shard", "--per-class", "0"]) == EXIT_USAGE
    assert run_main(["demo-shard", "--per-class", "many"]) == EXIT_USAGE
    capsys.readouterr()
    files = ["--set", "ingest.source={kind: files, path: data/source}"]
    assert run_main(["demo-shard", *files]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "ingest.source.kind is not wordnet" in err and err.count("\n") == 1
    assert not (project / "data" / "landing").exists()


# --------------------------------------------------------------------------- schedule
def test_schedule_arguments():
    parse = cli.build_parser().parse_args
    assert parse(["schedule", "--cron", "0 3 * * 1"]).cron == "0 3 * * 1"
    assert parse(["schedule", "--interval", "3600"]).interval == 3600.0
    for bad in ([], ["--cron", "0 3 * * 1", "--interval", "60"], ["--interval", "0"]):
        with pytest.raises(SystemExit) as done:
            parse(["schedule", *bad])
        assert done.value.code == EXIT_USAGE


def test_schedule_validates_writes_params_then_serves(project, monkeypatch, capsys):
    import flows.retrain

    served = []

    def serve(root, *, cron, interval):
        served.append((root, cron, interval, load_epochs(project)))

    def load_epochs(root):
        return yaml.safe_load((root / "params.yaml").read_text())["finetune"]["epochs"]

    monkeypatch.setattr(flows.retrain, "serve", serve)
    monkeypatch.setattr(cli, "_start_flow_services", lambda root, params: None)
    assert run_main(["schedule", "--cron", "0 3 * * 1", "--set", "finetune.epochs=1"]) == 0
    assert served == [(str(project), "0 3 * * 1", None, 1)]  # params.yaml written first
    assert "cron '0 3 * * 1'" in capsys.readouterr().out
    assert run_main(["schedule", "--interval", "90"]) == 0
    assert served[-1][1:3] == (None, 90.0) and "every 90 s" in capsys.readouterr().out


def test_schedule_bad_params_serve_nothing_and_change_nothing(project, monkeypatch, capsys):
    import flows.retrain

    monkeypatch.setattr(flows.retrain, "serve", lambda *a, **k: pytest.fail("served"))
    before = (project / "params.yaml").read_text()
    assert run_main(["schedule", "--interval", "60", "--set", "finetune.epochs=0"]) == EXIT_INPUT
    assert "finetune.epochs" in capsys.readouterr().err
    assert (project / "params.yaml").read_text() == before
