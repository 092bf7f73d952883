import shutil
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from tunery.cli import main as cli_main
from tunery.config import Params, WordnetSource, load_params
from tunery.errors import EXIT_INPUT, ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def base_tree() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_committed_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert isinstance(params.ingest.source, WordnetSource)
    assert len(params.ingest.source.categories) >= 8


def test_models_are_frozen():
    params = load_params(REPO / "params.yaml")
    with pytest.raises(ValidationError):
        params.prepare.split_salt = "x"  # type: ignore[misc]


def test_typo_names_the_key_path(tmp_path):
    tree = base_tree()
    tree["prepare"]["fractionz"] = tree["prepare"].pop("fractions")
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, tree))
    msg = str(err.value)
    assert "prepare.fractionz: unknown key" in msg
    assert "prepare.fractions: Field required" in msg


def test_wrong_type_names_the_key_and_value(tmp_path):
    tree = base_tree()
    tree["ingest"]["min_per_class"] = "many"
    with pytest.raises(ConfigError, match=r"ingest.min_per_class: .*integer.*'many'"):
        load_params(write(tmp_path, tree))


def test_yaml_float_gotcha_is_harmless(tmp_path):
    tree = base_tree()
    tree["prepare"]["fractions"]["val"] = "1e-1"  # what PyYAML makes of `1e-1`
    assert load_params(write(tmp_path, tree)).prepare.fractions.val == 0.1
    tree["prepare"]["fractions"]["val"] = "ten percent"
    with pytest.raises(ConfigError, match="prepare.fractions.val: .*'ten percent'"):
        load_params(write(tmp_path, tree))


def test_fractions_must_leave_room_for_train(tmp_path):
    tree = base_tree()
    tree["prepare"]["fractions"] = {"val": 0.3, "test": 0.35, "holdout": 0.3}
    with pytest.raises(ConfigError, match="leave at least 10 %"):
        load_params(write(tmp_path, tree))


def test_overrides_are_typed_and_validated():
    params = load_params(
        REPO / "params.yaml", ["prepare.fractions.val=0.2", "ingest.labels=[a, b]"]
    )
    assert params.prepare.fractions.val == 0.2
    assert params.ingest.labels == ["a", "b"]
    with pytest.raises(ConfigError, match="with --set overrides"):
        load_params(REPO / "params.yaml", ["prepare.nope=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_params(REPO / "params.yaml", ["prepare.split_salt"])


def test_source_kind_switches_schema(tmp_path):
    tree = base_tree()
    tree["ingest"]["source"] = {"kind": "files", "path": "x.csv", "categories": ["noun.act"]}
    with pytest.raises(ConfigError, match="ingest.source.files.categories: unknown key"):
        load_params(write(tmp_path, tree))


def test_check_command(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    # the demo source need not be installed for this test: any existing folder stands in for it
    with pytest.raises(SystemExit) as done:
        cli_main(
            [
                "check",
                "--show",
                "--set",
                "prepare.split_salt=abc",
                "--set",
                f"ingest.source.path={tmp_path}",
            ]
        )
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "split_salt: abc" in out and "OK:" in out

    tree = base_tree()
    tree["ingest"]["duplicates"] = "keep"
    bad = write(tmp_path, tree)
    with pytest.raises(SystemExit) as done:
        cli_main(["check", "-p", str(bad)])
    assert done.value.code == EXIT_INPUT
    assert "ingest.duplicates" in capsys.readouterr().err


def test_check_reads_the_source_headers(tmp_path, capsys, monkeypatch):
    """`tunery check` catches a missing source and a column the data lacks before any run."""
    tree = base_tree()
    tree["ingest"]["source"] = {"kind": "files", "path": "data/source", "text_column": "body"}
    params = write(tmp_path, tree)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        cli_main(["check", "-p", str(params)])
    assert (
        done.value.code == EXIT_INPUT
        and "ingest.source.path does not exist" in capsys.readouterr().err
    )
    (tmp_path / "data" / "source").mkdir(parents=True)
    (tmp_path / "data" / "source" / "a.csv").write_text("text,label\nhello,a\n")
    with pytest.raises(SystemExit) as done:
        cli_main(["check", "-p", str(params)])
    assert done.value.code == EXIT_INPUT and "missing column(s) ['body']" in capsys.readouterr().err


def test_write_params_keeps_comments_validates_first_and_keeps_the_mode(tmp_path):
    from tunery.config import write_params

    dest = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", dest)
    dest.chmod(0o664)
    before = dest.read_text()
    with pytest.raises(ConfigError, match=r"finetune\.epochs"):
        write_params(dest, ["finetune.epochs=many"])
    assert dest.read_text() == before  # nothing written when the result is invalid
    assert write_params(dest, ["finetune.epochs=2.0"]) == []  # no change: the file is untouched
    assert write_params(dest, ["finetune.lora.r=8"]) == ["finetune.lora.r: 7 -> 8"]
    after = dest.read_text()
    assert load_params(dest).finetune.lora.r == 8
    assert (dest.stat().st_mode & 0o777) == 0o664
    changed = [line for line in after.splitlines() if line not in before.splitlines()]
    assert len(changed) <= 2 and "r: 8" in changed[0]  # the lora line (and a joined flow map)
    assert "# cap per class keeps the CPU demo fast" in after

    other = tmp_path / "other.yaml"
    other.write_text(before)
    assert write_params(dest, source=other) == ["finetune.lora.r: 8 -> 7"]  # -p FILE


def test_stage_outputs_are_declared_once_by_their_sections():
    """`tracking.log_models` accepts exactly the outputs the sections declare, each owned by one
    stage, each naming a folder field of its section."""
    from typing import get_args

    from tunery.config import STAGE_OUTPUTS, StageOutput

    declared = [name for outputs in STAGE_OUTPUTS.values() for name in outputs]
    assert sorted(declared) == sorted(get_args(StageOutput))  # no name twice, none missing
    params = load_params(REPO / "params.yaml")
    assert params.model_outputs("compress") == {
        "variants": params.compress.variants_dir,
        "deploy": params.compress.out_dir,
    }
    assert params.model_outputs("pretrain") == {"encoder": params.pretrain.out_dir}
    assert params.model_outputs("evaluate") == {} and params.model_outputs("ingest") == {}


def test_stage_logs_the_declared_outputs_that_exist_and_are_chosen(tmp_path):
    from tunery.stage import log_outputs

    calls = []

    class Run:
        def log_model_folder(self, kind, folder, metrics):
            calls.append((kind, folder.name, metrics))

        def log_deployable(self, folder, finetune_dir, metrics):
            calls.append(("deploy", folder.name, metrics))

    params = load_params(
        REPO / "params.yaml",
        ["tracking.log_models=[variants, deploy]", "compress.variants_dir=v", "compress.out_dir=d"],
    )
    (tmp_path / "d").mkdir()
    assert log_outputs(params, tmp_path, "compress", Run(), {"m": 1.0})
    assert calls == [("deploy", "d", {"m": 1.0})]  # `v` is not there: skipped, not an error
    (tmp_path / "v").mkdir()
    calls.clear()
    log_outputs(params, tmp_path, "compress", Run(), {"m": 1.0})
    assert calls == [("variants", "v", {"m": 1.0}), ("deploy", "d", None)]  # metrics once
    assert not log_outputs(params, tmp_path, "pretrain", Run(), {})  # encoder: not chosen
    with pytest.raises(ConfigError, match="log_models"):
        load_params(REPO / "params.yaml", ["tracking.log_models=[encodr]"])


def _differences(model, tree: dict, path: str = "") -> dict[str, tuple]:
    """Every key params.yaml writes whose value is not the field's default: path -> (default,
    value). Required fields (no default) are not differences; nested sections are walked."""
    from pydantic import BaseModel

    out: dict[str, tuple] = {}
    for key, raw in tree.items():
        where = f"{path}.{key}" if path else key
        value = getattr(model, key)
        if isinstance(value, BaseModel) and isinstance(raw, dict):
            out.update(_differences(value, raw, where))
            continue
        field = type(model).model_fields[key]
        if not field.is_required():
            default = field.get_default(call_default_factory=True)
            if value != default:
                out[where] = (default, value)
    return out


def test_params_yaml_equals_the_defaults_but_for_the_listed_demo_overrides():
    """One source of truth per value: params.yaml writes the defaults of tunery/config.py, and
    where the demo needs another value the key is in DEMO_OVERRIDES with its reason."""
    from tunery.config import DEMO_OVERRIDES

    differ = _differences(load_params(REPO / "params.yaml"), base_tree())
    unlisted = {k: v for k, v in differ.items() if k not in DEMO_OVERRIDES}
    assert unlisted == {}, "list these in config.DEMO_OVERRIDES (with the reason) or fix them"
    stale = sorted(set(DEMO_OVERRIDES) - set(differ))
    assert stale == [], "params.yaml now writes the default here: drop the entry"
    assert all(len(reason) > 20 for reason in DEMO_OVERRIDES.values())
    # the two the fine-tune sections are known for, as the demo runs them
    assert differ["finetune.epochs"] == (8.0, 2.0)
    assert differ["finetune.ablations.enabled"] == (False, True)


def test_a_new_difference_is_caught(tmp_path):
    tree = base_tree()
    tree["finetune"]["batch_size"] = 16
    params = load_params(write(tmp_path, tree))
    assert _differences(params, tree)["finetune.batch_size"] == (32, 16)
