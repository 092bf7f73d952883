"""evaluate: every metric on a hand-checked toy prediction set, the stage's files, champion deltas,
and bad input (unknown labels, a model dir that is not one) failing with nothing written."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tunery.config import EvaluateConfig, FinetuneConfig
from tunery.errors import DataValidationError, TuneryError
from tunery.evaluation import metrics as ev

LABELS = ["a", "b", "c"]
# Seven predictions, worked out by hand below. Confidences stay off bin edges (float32 safe).
Y_TRUE = [0, 0, 0, 1, 1, 2, 2]
PROBS = np.array(
    [
        [0.91, 0.05, 0.04],  # a -> a  .91  right
        [0.61, 0.29, 0.10],  # a -> a  .61  right
        [0.30, 0.65, 0.05],  # a -> b  .65  wrong
        [0.10, 0.75, 0.15],  # b -> b  .75  right
        [0.08, 0.40, 0.52],  # b -> c  .52  wrong
        [0.05, 0.10, 0.85],  # c -> c  .85  right
        [0.92, 0.03, 0.05],  # c -> a  .92  wrong
    ],
    dtype=np.float32,
)
TEXTS = [f"text {i}" for i in range(7)]


def test_accuracy_f1_per_class_and_confusion_by_hand():
    m = ev.classification_metrics(Y_TRUE, PROBS.argmax(1).tolist(), LABELS)
    assert m["accuracy"] == pytest.approx(4 / 7)
    # a: predicted at 0,1,6 (2 right) of 3 true -> P = R = F1 = 2/3; b and c: 1 of 2 -> 1/2
    assert m["per_class"]["a"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3}
    )
    for label in ("b", "c"):
        assert m["per_class"][label] == pytest.approx(
            {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
        )
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0.5) / 3)  # 5/9, not the 4/7 micro
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [1, 0, 1]]  # rows true, columns predicted


def test_never_predicted_class_has_zero_precision_not_nan():
    m = ev.classification_metrics([0, 1, 2], [0, 0, 0], LABELS)
    assert m["per_class"]["b"]["precision"] == 0.0
    assert json.dumps(m)  # valid JSON: no NaN


def test_expected_calibration_error_by_hand():
    ece, bins = ev.calibration(Y_TRUE, PROBS, n_bins=10)
    # occupied bins: [.5,.6) .52 wrong; [.6,.7) .61 right .65 wrong; [.7,.8) .75 right;
    # [.8,.9) .85 right; [.9,1] .91 right .92 wrong
    expected = (1 * 0.52 + 2 * abs(0.5 - 0.63) + 1 * 0.25 + 1 * 0.15 + 2 * abs(0.5 - 0.915)) / 7
    assert ece == pytest.approx(expected, abs=1e-6)  # 2.01 / 7
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 0, 1, 2, 1, 1, 2]
    assert bins[6]["accuracy"] == 0.5 and bins[6]["confidence"] == pytest.approx(0.63, abs=1e-6)
    perfect = np.eye(3)[[0, 1, 2]]
    assert ev.calibration([0, 1, 2], perfect, 10)[0] == pytest.approx(0.0)


def test_confident_wrong_sorted_by_confidence():
    rows = ev.confident_wrong(TEXTS, Y_TRUE, PROBS, LABELS, k=2)
    assert [r["text"] for r in rows] == ["text 6", "text 2"]
    assert rows[0] == {
        "text": "text 6",
        "label": "c",
        "predicted": "a",
        "confidence": pytest.approx(0.92),
        "label_probability": pytest.approx(0.05),
    }
    assert len(ev.confident_wrong(TEXTS, Y_TRUE, PROBS, LABELS, k=10)) == 3


def test_deltas_overall_and_per_class():
    ours = ev.classification_metrics(Y_TRUE, PROBS.argmax(1).tolist(), LABELS)
    theirs = ev.classification_metrics(Y_TRUE, Y_TRUE, LABELS)  # a perfect champion
    d = ev.deltas(ours, theirs)
    assert d["macro_f1"] == pytest.approx(5 / 9 - 1, abs=1e-4)
    assert d["accuracy"] == pytest.approx(4 / 7 - 1, abs=1e-4)
    assert d["per_class_f1"] == pytest.approx({"a": -1 / 3, "b": -0.5, "c": -0.5}, abs=1e-4)
    assert d["worst_class_f1"] == pytest.approx(-0.5)


def test_plots_and_table(tmp_path):
    report = ev.evaluate_predictions(TEXTS, Y_TRUE, PROBS, LABELS, n_bins=5, k=3)
    ev.plot_confusion(report["confusion"], LABELS, tmp_path / "cm.png", "cm")
    ev.plot_reliability(report["reliability"], report["ece"], tmp_path / "rel.png", "rel")
    for name in ("cm.png", "rel.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    table = ev.markdown_table([{"text": "a|b", "confidence": 0.5}], ["confidence", "text"])
    assert table.splitlines()[2] == "| 0.5 | a\\|b |"


def test_tfidf_baseline_learns_separable_toy_data():
    from tests.conftest import make_rows

    rows = make_rows(20)
    ids = rows["label"].map({k: i for i, k in enumerate(sorted(rows.label.unique()))}).tolist()
    out = ev.tfidf_baseline(
        rows.text[::2].tolist(),
        ids[::2],
        {"other": (rows.text[1::2].tolist(), ids[1::2])},
        sorted(rows.label.unique()),
    )
    assert out["other"]["macro_f1"] > 0.9


# --------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LoRA fine-tune (CPU, seconds), exported and compressed into the deployable folder
    that evaluate scores as served, and its data, shared by the stage tests."""
    from tasks import compress, export, finetune
    from tests.test_finetune import write_splits
    from tests.tiny import make_tiny_encoder
    from tunery.config import CompressConfig, ExportConfig

    base = tmp_path_factory.mktemp("evaluate")
    encoder = make_tiny_encoder(base / "encoder")
    data = write_splits(base / "data")
    cfg = FinetuneConfig(epochs=1.0, batch_size=16, full={"learning_rate": 1.0e-3})
    finetune.run(
        cfg,
        encoder=encoder,
        data_dir=data,
        out_dir=base / "model",
        checkpoint_root=base / "ckpt",
        plot_dir=base / "plots",
        root=base,
    )
    export.run(ExportConfig(), finetune_dir=base / "model", data_dir=data, out_dir=base / "onnx")
    compress.run(
        CompressConfig(
            variants=["fp32"],
            bench={
                "warmup": 1,
                "latency_runs": 2,
                "throughput_batches": 1,
                "throughput_repeats": 1,
            },
        ),
        finetune_dir=base / "model",
        export_dir=base / "onnx",
        data_dir=data,
        variants_dir=base / "variants",
        out_dir=base / "deploy",
        report_dir=base / "compress",
        plot_path=base / "tradeoff.png",
    )
    return base


def _run(base: Path, tmp_path: Path, **kw):
    from tasks import evaluate

    cfg = EvaluateConfig(confident_wrong=3, **kw.pop("cfg", {}))
    return evaluate.run(
        cfg,
        model_dir=kw.pop("model_dir", base / "deploy"),
        finetune_dir=kw.pop("finetune_dir", base / "model"),
        compress_report_dir=base / "compress",
        data_dir=kw.pop("data_dir", base / "data"),
        report_dir=tmp_path / "reports",
        plot_dir=tmp_path / "plots",
        root=base,
        **kw,
    )


def test_stage_writes_metrics_reports_and_plots(trained, tmp_path):
    metrics = _run(trained, tmp_path)
    for split in ("test", "holdout"):
        m = metrics[split]
        assert {"rows", "accuracy", "macro_f1", "ece", "per_class_f1"} <= set(m)
        assert set(m["per_class_f1"]) == {"animal", "food", "tool"}
        report = json.loads((tmp_path / "reports" / f"{split}.json").read_text())
        assert np.asarray(report["confusion"]).sum() == m["rows"]
        assert len(report["reliability"]) == 10
        assert (tmp_path / "reports" / f"{split}_confident_wrong.md").is_file()
        for plot in ("confusion", "reliability"):
            assert (tmp_path / "plots" / f"{split}_{plot}.png").is_file()
        preds = json.loads((tmp_path / "plots" / f"{split}_predictions.json").read_text())
        assert len(preds) == m["rows"]
    assert 0.0 <= metrics["baseline_tfidf_lr"]["holdout"]["macro_f1"] <= 1.0
    gate = json.loads((tmp_path / "reports" / "gate.json").read_text())
    assert gate["challenger"]["macro_f1"] == metrics["holdout"]["macro_f1"]
    assert set(gate["challenger"]["per_class_f1"]) == {"animal", "food", "tool"}
    assert gate["champion"] is None and gate["deltas"] is None


def test_champion_on_the_same_holdout_gives_deltas(trained, tmp_path):
    # The served model as its own champion: same numbers, all deltas zero.
    metrics = _run(trained, tmp_path, champion=str(trained / "deploy"))
    gate = json.loads((tmp_path / "reports" / "gate.json").read_text())
    assert gate["champion"]["comparable"] is True
    assert gate["champion"]["macro_f1"] == gate["challenger"]["macro_f1"]
    assert gate["deltas"]["macro_f1"] == 0.0
    assert set(gate["deltas"]["per_class_f1"].values()) == {0.0}
    assert metrics["deltas"] == gate["deltas"]
    assert (tmp_path / "reports" / "champion_holdout.json").is_file()


def test_unknown_label_in_holdout_fails_and_writes_nothing(trained, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for f in (trained / "data").iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    holdout = pd.read_parquet(data / "holdout.parquet")
    holdout.loc[1, "label"] = "mineral"
    holdout.to_parquet(data / "holdout.parquet")
    with pytest.raises(DataValidationError, match=r"holdout.parquet: row 2: \[unknown_label\]"):
        _run(trained, tmp_path, data_dir=data)
    assert not (tmp_path / "reports").exists() and not (tmp_path / "plots").exists()


def test_not_a_model_dir_fails_and_writes_nothing(trained, tmp_path):
    with pytest.raises(TuneryError, match="no deployable model"):
        _run(trained, tmp_path, model_dir=tmp_path)
    with pytest.raises(TuneryError, match="evaluate.champion"):
        _run(trained, tmp_path, champion=str(tmp_path))
    assert not (tmp_path / "reports").exists()


# --------------------------------------------------------------------------- the newest data
def test_newest_origins_rule():
    from tunery.evaluation.served import newest_origins

    test = ["source:a.csv", "incoming:w1.csv", "incoming:w2.csv", "incoming:w2.csv"]
    # A champion that recorded what it trained on: everything it has not seen.
    assert newest_origins(test, ["source:a.csv", "incoming:w1.csv"]) == ["incoming:w2.csv"]
    assert newest_origins(test, ["source:a.csv"]) == ["incoming:w1.csv", "incoming:w2.csv"]
    assert newest_origins(test, test) == []
    # No champion (or one that did not record it): the last incoming file.
    assert newest_origins(test, None) == ["incoming:w2.csv"]
    assert newest_origins(["source:a.csv"], None) == []


def test_macro_f1_over_present_classes_only():
    report = ev.classification_metrics([0, 0, 1], [0, 0, 1], LABELS)  # class c absent
    assert report["macro_f1"] == pytest.approx(2 / 3)  # c counted as F1 0
    assert ev.restrict_to_present(report)["macro_f1"] == pytest.approx(1.0)
    assert report["macro_f1_classes"] == 2


def test_newest_data_scored_for_challenger_and_champion(trained, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for f in (trained / "data").iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    test = pd.read_parquet(data / "test.parquet")
    test.loc[:5, "origin"] = "incoming:week2.csv"  # rows the model never trained on
    test.to_parquet(data / "test.parquet")
    info = json.loads((trained / "model" / "finetune.json").read_text())
    assert info["data_origins"] == ["test"]  # the toy splits' origin

    metrics = _run(trained, tmp_path, data_dir=data, champion=str(trained / "deploy"))
    newest = metrics["newest"]
    assert newest["origins"] == "incoming:week2.csv" and newest["rows"] == 6
    assert newest["delta_macro_f1"] == 0.0  # the model is its own champion
    assert newest["macro_f1"] == newest["champion_macro_f1"]
    report = json.loads((tmp_path / "reports" / "newest.json").read_text())
    assert report["rule"] == "origins the champion did not train on"
    assert np.asarray(report["report"]["confusion"]).sum() == 6
    gate = json.loads((tmp_path / "reports" / "gate.json").read_text())
    assert gate["newest"] == newest
    assert (tmp_path / "reports" / "newest_confident_wrong.md").is_file()


def test_no_newest_data_is_said_not_scored(trained, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for f in (trained / "data").iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    test = pd.read_parquet(data / "test.parquet").assign(origin="source:toy.csv")
    test.to_parquet(data / "test.parquet")  # only the original source: nothing new
    metrics = _run(trained, tmp_path, data_dir=data)
    assert metrics["newest"] == {"rows": 0, "origins": "none"}
    report = json.loads((tmp_path / "reports" / "newest.json").read_text())
    assert "report" not in report and report["rule"] == "the last incoming file"


# --------------------------------------------------------------------------- the stage-value table
def test_stage_value_table_from_the_stage(trained, tmp_path):
    """Baseline and the fine-tune's arms (arms.json), each against the row above; the served
    model against the arm it was made from; the verdicts and the holdout's size."""
    metrics = _run(trained, tmp_path)
    table = json.loads((tmp_path / "reports" / "stage_value.json").read_text())
    order = [r["row"] for r in table["rows"]]
    assert order[0] == "tfidf" and order[-1] == "deployed"
    assert set(order) <= set(("tfidf", "probe", "base", "pipeline", "full", "deployed"))
    rows = table["rows"]
    assert rows[-1]["macro_f1"] == round(metrics["holdout"]["macro_f1"], 4)
    for above, row in itertools.pairwise(rows[:-1]):
        assert row["delta"] == round(row["macro_f1"] - above["macro_f1"], 4)
    made_from = next((r for r in rows if r["row"] == table["shipped_arm"]), rows[-2])
    assert rows[-1]["delta"] == round(rows[-1]["macro_f1"] - made_from["macro_f1"], 4)
    assert table["holdout_rows"] == metrics["holdout"]["rows"]
    assert "fp32" in rows[-1]["what"]
    assert "calibration" in table["verdicts"] and "compress" in table["verdicts"]
    md = (tmp_path / "reports" / "stage_value.md").read_text()
    assert "TF-IDF" in md and "deployed" in md
    summary = (tmp_path / "reports" / "summary.md").read_text()
    holdout = json.loads((tmp_path / "reports" / "holdout.json").read_text())
    for label in holdout["per_class"]:  # a row per class, the stage-value table below
        assert f"| {label} | " in summary
    assert "## What each stage bought" in summary and "No champion" in summary


def test_stage_value_rows_deltas_and_verdicts():
    from tunery.evaluation import stage_value as sv

    arm = {"train_seconds": 10.0, "trainable_share": 0.01, "params": 22_000_000}
    arms = {
        "chosen": "base",
        "pretrain_gate": {"decision": "pretraining did not help: 0.80 vs 0.82", "applied": True},
        "arms": {
            "probe": {**arm, "holdout": {"macro_f1": 0.60, "accuracy": 0.6}},
            "base": {**arm, "method": "lora", "holdout": {"macro_f1": 0.85, "accuracy": 0.85}},
            "pipeline": {**arm, "method": "lora", "holdout": {"macro_f1": 0.83, "accuracy": 0.8}},
            "full": {**arm, "method": "full", "holdout": {"macro_f1": 0.86, "accuracy": 0.86}},
        },
    }
    deployed = {
        "variant": "int8_dynamic",
        "method": "lora",
        "macro_f1": 0.845,
        "ece": 0.02,
        "ece_uncalibrated": 0.25,
        "temperature": 0.4,
        "speedup": 3.5,
        "drop_macro_f1": 0.003,
        "size_mb": 22.0,
        "rows": 400,
        "candidates": [
            {"variant": "int8_dynamic", "speedup": 3.5, "macro_f1_delta": -0.003, "status": "x"},
            {
                "variant": "pruned_int8_dynamic",
                "speedup": 4.4,
                "macro_f1_delta": -0.017,
                "status": "over budget",
            },
        ],
    }
    table = sv.build(
        arms=arms, baseline={"holdout": {"macro_f1": 0.7, "accuracy": 0.7}}, deployed=deployed
    )
    assert [r["row"] for r in table["rows"]] == list(sv.ROWS)
    deltas = {r["row"]: r["delta"] for r in table["rows"]}
    assert deltas == {
        "tfidf": None,
        "probe": -0.1,
        "base": 0.25,
        "pipeline": -0.02,
        "full": 0.03,
        "deployed": -0.005,  # against base, the shipped arm it was made from, not the row above
    }
    assert {r["row"] for r in table["rows"] if r["shipped"]} == {"base", "deployed"}
    v = table["verdicts"]
    assert v["pretrain"].startswith("pretraining did not help")
    assert "NOT within 0.005" in v["finetune"]  # base 0.85 vs full 0.86: 1 pt apart
    assert "0.2500 uncalibrated -> 0.0200" in v["calibration"]
    assert "3.50x" in v["compress"]
    assert v["compress"].endswith("also weighed: pruned_int8_dynamic 4.40x -0.0170 (over budget)")
    assert sv.terminal(table).count("\n") >= 6
    assert "one holdout text is 0.25 pt" in sv.terminal(table) and "400 texts" in sv.markdown(table)


def test_stage_value_with_full_as_the_method_has_one_full_row_and_says_no_peft_arm():
    from tunery.evaluation import stage_value as sv

    def arm(f1: float) -> dict:
        return {"method": "full", "holdout": {"macro_f1": f1, "accuracy": f1}, "params": 10}

    arms = {"chosen": "pipeline", "arms": {"pipeline": arm(0.9), "full": arm(0.9)}}
    deployed = {"variant": "fp32", "macro_f1": 0.9, "method": "full"}
    table = sv.build(arms=arms, baseline=None, deployed=deployed)
    assert [r["row"] for r in table["rows"]] == ["pipeline", "deployed"]
    assert table["verdicts"]["finetune"].startswith("full fine-tuning is the method (shipped)")
