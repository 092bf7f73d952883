"""metrics/<stage>.json keeps the headline numbers; reports/metrics/<stage>.json every number."""

import json
from pathlib import Path

from tunery import metrics_files
from tunery.stage import numeric_items

REPO = Path(__file__).resolve().parents[1]

EVALUATE = {
    "method": "lora",
    "test": {"rows": 481, "macro_f1": 0.84, "per_class_f1": {"a": 0.8, "b": 0.9}},
    "holdout": {"rows": 438, "macro_f1": 0.85, "accuracy": 0.86, "ece": 0.03},
    "baseline_tfidf_lr": {"test": {"macro_f1": 0.78}, "holdout": {"macro_f1": 0.76}},
    "champion": {"holdout": {"macro_f1": 0.84, "per_class_f1": {"a": 0.7}}},
    "deltas": {"macro_f1": 0.01, "per_class_f1": {"a": 0.1}, "worst_class_f1": -0.02},
    "seconds": 30.0,
}


def test_the_headline_keeps_the_named_numbers_nested_as_they_were():
    head = metrics_files.headline("evaluate", EVALUATE)
    assert head == {
        "method": "lora",
        "test": {"macro_f1": 0.84},
        "holdout": {"macro_f1": 0.85, "accuracy": 0.86, "ece": 0.03},
        "baseline_tfidf_lr": {"holdout": {"macro_f1": 0.76}},
        "champion": {"holdout": {"macro_f1": 0.84}},
        "deltas": {"macro_f1": 0.01, "worst_class_f1": -0.02},
        "seconds": 30.0,
    }
    assert metrics_files.headline("not-a-stage", EVALUATE) == EVALUATE  # unnamed: all kept


def test_write_puts_every_number_in_the_details_and_read_returns_them(tmp_path):
    assert metrics_files.read(tmp_path, "evaluate") is None
    metrics_files.write(tmp_path, "evaluate", EVALUATE)
    assert metrics_files.read(tmp_path, "evaluate") == EVALUATE
    head = json.loads((tmp_path / "metrics" / "evaluate.json").read_text())
    assert head == metrics_files.headline("evaluate", EVALUATE)
    assert len(numeric_items("", head)) < len(numeric_items("", EVALUATE))


def test_every_stage_in_dvc_yaml_declares_both_files():
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        metrics = [next(iter(m)) if isinstance(m, dict) else m for m in stage["metrics"]]
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]]
        assert metrics == [f"{metrics_files.HEADLINE_DIR}/{name}.json"], name
        assert f"{metrics_files.DETAIL_DIR}/{name}.json" in outs, name
        assert name in metrics_files.HEADLINE, name
