"""A file that passes intake never stops a later ingest: each drop is checked against the dataset
it joins (labels, class minimums, duplicates, text types) before anything moves, and the error
names the drop."""

import json

import pandas as pd
import pytest

from tasks import ingest
from tests.conftest import make_rows
from tunery.config import IngestConfig
from tunery.data import intake
from tunery.errors import DataValidationError


def _project(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "incoming").mkdir()
    make_rows(10).to_csv(tmp_path / "src" / "a.csv", index=False)
    return IngestConfig.model_validate(
        {"source": {"kind": "files", "path": "src"}, "min_per_class": 5, "incoming": "incoming"}
    )


def _refused(tmp_path, cfg, drop, rule):
    with pytest.raises(DataValidationError) as err:
        intake.add_file(drop, cfg, root=tmp_path)
    assert err.value.rule == rule and drop.name in str(err.value), str(err.value)
    assert list((tmp_path / "incoming").iterdir()) == [], "nothing may move on a refused drop"
    ingest.run(cfg, root=tmp_path, out_dir=tmp_path / "raw")  # and the next ingest still runs
    return err.value


def test_a_drop_with_a_new_label_is_refused_unless_allowed(tmp_path):
    cfg = _project(tmp_path)
    rows = make_rows(6, offset=50)
    drop = tmp_path / "animals.csv"
    rows.assign(label="mineral").to_csv(drop, index=False)
    e = _refused(tmp_path, cfg, drop, "new_label")
    assert "allow_new_labels" in str(e)
    allowed = cfg.model_copy(update={"allow_new_labels": True})
    intake.add_file(drop, allowed, root=tmp_path)
    assert ingest.run(allowed, root=tmp_path, out_dir=tmp_path / "raw")["classes"] == 4


def test_a_drop_that_would_leave_a_class_too_small_names_the_drop(tmp_path):
    cfg = _project(tmp_path).model_copy(update={"allow_new_labels": True})
    drop = tmp_path / "few.csv"
    make_rows(1, offset=70).assign(label="rare").to_csv(drop, index=False)
    e = _refused(tmp_path, cfg, drop, "too_few_examples")
    assert "'rare': 3" in str(e)


def test_a_drop_of_nothing_but_known_texts_is_refused(tmp_path):
    cfg = _project(tmp_path)
    drop = tmp_path / "again.csv"
    known = pd.read_csv(tmp_path / "src" / "a.csv").head(4)
    known.assign(label=known["label"].iloc[::-1].to_numpy()).to_csv(drop, index=False)
    _refused(tmp_path, cfg, drop, "nothing_new")


def test_a_jsonl_drop_with_numeric_text_is_refused(tmp_path):
    cfg = _project(tmp_path)
    drop = tmp_path / "numbers.jsonl"
    labels = make_rows(10)["label"].unique()
    drop.write_text(
        "\n".join(json.dumps({"text": 1000 + i, "label": labels[i % 3]}) for i in range(9)) + "\n"
    )
    e = _refused(tmp_path, cfg, drop, "text_not_string")
    assert e.rows[:3] == [1, 2, 3]


def test_a_good_drop_is_taken_in_and_ingested(tmp_path):
    cfg = _project(tmp_path)
    drop = tmp_path / "week2.csv"
    make_rows(3, offset=100).to_csv(drop, index=False)
    dest = intake.add_file(drop, cfg, root=tmp_path)
    assert dest == tmp_path / "incoming" / "week2.csv"
    assert ingest.run(cfg, root=tmp_path, out_dir=tmp_path / "raw")["incoming_rows"] == 9
