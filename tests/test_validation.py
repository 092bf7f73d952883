"""Every validation rule, each with a bad fixture: clear error naming file, row and rule; nothing written."""

import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tasks import ingest
from tests.conftest import make_rows
from tunery.config import IngestConfig, load_params
from tunery.errors import EXIT_INPUT, DataValidationError


def cfg(tmp_path: Path, **over) -> IngestConfig:
    base = {"source": {"kind": "files", "path": "src"}, "min_per_class": 5, **over}
    return IngestConfig.model_validate(base)


def run_ingest(tmp_path: Path, config: IngestConfig) -> dict:
    return ingest.run(config, root=tmp_path, out_dir=tmp_path / "raw")


def expect(tmp_path, config, rule, *, file=None, rows=None):
    with pytest.raises(DataValidationError) as err:
        run_ingest(tmp_path, config)
    e = err.value
    assert e.rule == rule, str(e)
    if file is not None:
        assert e.file.endswith(file), str(e)
        assert file in str(e)
    if rows is not None:
        assert e.rows[: len(rows)] == rows, str(e)
    assert f"[{rule}]" in str(e)
    assert not (tmp_path / "raw").exists(), "nothing may be written on bad input"
    return e


def write_csv(tmp_path: Path, df: pd.DataFrame, name: str = "a.csv") -> Path:
    (tmp_path / "src").mkdir(exist_ok=True)
    path = tmp_path / "src" / name
    df.to_csv(path, index=False)
    return path


def test_good_data_passes(tmp_path):
    write_csv(tmp_path, make_rows(10))
    metrics = run_ingest(tmp_path, cfg(tmp_path))
    assert metrics["rows"] == 30 and metrics["classes"] == 3
    out = pd.read_parquet(tmp_path / "raw" / "labelled.parquet")
    assert list(out.columns) == ["text", "label", "origin"]


def test_missing_file(tmp_path):
    expect(
        tmp_path,
        cfg(tmp_path, source={"kind": "files", "path": "nope.csv"}),
        "missing_file",
        file="nope.csv",
    )


def test_unreadable_file(tmp_path):
    path = write_csv(tmp_path, make_rows(10))
    os.chmod(path, 0)
    try:
        if os.access(path, os.R_OK):  # root reads anything
            pytest.skip("running as root: permissions are not enforced")
        expect(tmp_path, cfg(tmp_path), "unreadable_file", file="a.csv")
    finally:
        os.chmod(path, 0o644)


def test_bad_encoding(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.csv").write_bytes("text,label\ncaf\xe9 au lait,food\n".encode("latin-1"))
    e = expect(tmp_path, cfg(tmp_path), "bad_encoding", file="a.csv")
    assert "line 2" in str(e)


def test_empty_file(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.csv").write_text("")
    expect(tmp_path, cfg(tmp_path), "empty_file", file="a.csv")
    (tmp_path / "src" / "a.csv").write_text("text,label\n")
    expect(tmp_path, cfg(tmp_path), "empty_file", file="a.csv")


def test_missing_column(tmp_path):
    write_csv(tmp_path, make_rows(10).rename(columns={"label": "category"}))
    e = expect(tmp_path, cfg(tmp_path), "missing_column", file="a.csv")
    assert "label" in str(e) and "category" in str(e)


def test_empty_text(tmp_path):
    df = make_rows(10)
    df.loc[3, "text"] = "   "
    write_csv(tmp_path, df)
    expect(tmp_path, cfg(tmp_path), "empty_text", file="a.csv", rows=[4])


def test_null_label(tmp_path):
    df = make_rows(10)
    df.loc[[1, 7], "label"] = None
    write_csv(tmp_path, df, "a.csv")
    expect(tmp_path, cfg(tmp_path), "null_label", file="a.csv", rows=[2, 8])


def test_null_label_jsonl(tmp_path):
    (tmp_path / "src").mkdir()
    lines = [f'{{"text": "t{i}", "label": "a"}}' for i in range(5)] + [
        '{"text": "x", "label": null}'
    ]
    (tmp_path / "src" / "a.jsonl").write_text("\n".join(lines) + "\n")
    expect(tmp_path, cfg(tmp_path), "null_label", file="a.jsonl", rows=[6])


def test_bad_jsonl_line(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_text('{"text": "t", "label": "a"}\n{"text": oops}\n')
    e = expect(tmp_path, cfg(tmp_path), "bad_json", file="a.jsonl")
    assert "line 2" in str(e)


def test_label_outside_declared_set(tmp_path):
    write_csv(tmp_path, make_rows(10))
    e = expect(tmp_path, cfg(tmp_path, labels=["animal", "tool"]), "unknown_label", file="a.csv")
    assert "'food'" in str(e)


def test_too_few_examples_of_a_class(tmp_path):
    df = pd.concat([make_rows(10), pd.DataFrame([{"text": "a rare thing", "label": "rare"}])])
    write_csv(tmp_path, df)
    e = expect(tmp_path, cfg(tmp_path), "too_few_examples")
    assert "'rare': 1" in str(e)


def test_record_over_size_limit(tmp_path):
    df = make_rows(10)
    df.loc[5, "text"] = "word " * 100
    write_csv(tmp_path, df)
    expect(tmp_path, cfg(tmp_path, max_text_chars=200), "record_too_large", file="a.csv", rows=[6])


def test_duplicates_dropped_and_counted(tmp_path):
    df = make_rows(10)
    dupes = df.iloc[:3].copy()
    dupes["text"] = dupes["text"].str.upper() + "  "  # same text up to case and whitespace
    conflict = pd.DataFrame([{"text": df.loc[4, "text"], "label": "tool"}])
    write_csv(tmp_path, pd.concat([df, dupes, conflict], ignore_index=True))
    metrics = run_ingest(tmp_path, cfg(tmp_path))
    assert metrics["duplicates_dropped"] == 3
    assert metrics["conflicts_dropped"] == 2  # both copies of an ambiguous text go
    assert metrics["rows"] == 30 - 1


def test_duplicates_rejected(tmp_path):
    df = make_rows(10)
    write_csv(tmp_path, pd.concat([df, df.iloc[:1]], ignore_index=True))
    expect(tmp_path, cfg(tmp_path, duplicates="reject"), "duplicate")


def test_bad_incoming_file_is_named(tmp_path):
    write_csv(tmp_path, make_rows(10))
    (tmp_path / "incoming").mkdir()
    bad = make_rows(3)
    bad.loc[2, "text"] = ""
    bad.to_csv(tmp_path / "incoming" / "new.csv", index=False)
    expect(tmp_path, cfg(tmp_path, incoming="incoming"), "empty_text", file="new.csv", rows=[3])


def test_stage_exit_code_and_message(project, capsys, monkeypatch):
    """Through the stage entry point: one clear line, exit 3 (bad data), no metrics, no output."""
    bad = make_rows(10)
    bad.loc[0, "label"] = None
    bad.to_csv(project / "data" / "source" / "train.csv", index=False)
    monkeypatch.chdir(project)
    with pytest.raises(SystemExit) as done:
        ingest.main([])
    assert done.value.code == EXIT_INPUT
    err = capsys.readouterr().err
    assert "train.csv: row 1: [null_label]" in err
    assert not (project / "metrics" / "ingest.json").exists()
    assert not (project / "data" / "raw").exists()
    assert load_params(project / "params.yaml")  # params untouched
    assert yaml.safe_load((project / "params.yaml").read_text())
