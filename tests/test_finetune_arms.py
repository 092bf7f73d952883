"""The finetune stage's arms (probe, base, pipeline, full), the pretrain gate, arms.json, and the
default LoRA targets (attention and feed-forward layers), on a tiny BERT (CPU, seconds)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests.test_finetune import LABELS, run, small_cfg, write_splits
from tunery.errors import FinetuneError
from tunery.modeling.arms import BaseArm, pretrain_gate
from tunery.modeling.finetune_dir import ARM_ORDER, ARMS_FILE, read_arms, write_arms
from tunery.modeling.methods import build_model
from tunery.modeling.predict import load_classifier

ARM_KEYS = {
    "method",
    "encoder",
    "init",
    "test",
    "holdout",
    "best_val_macro_f1",
    "train_seconds",
    "trainable_params",
    "trainable_share",
    "params",
    "epochs",
}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    from tests.tiny import make_tiny_encoder

    return make_tiny_encoder(tmp_path_factory.mktemp("enc") / "encoder")


@pytest.fixture(scope="module")
def other_encoder(tmp_path_factory) -> Path:
    from tests.tiny import make_tiny_encoder

    return make_tiny_encoder(tmp_path_factory.mktemp("enc") / "base", seed=3)


@pytest.fixture
def data(tmp_path) -> Path:
    return write_splits(tmp_path / "data")


def arms_cfg(**kw):
    return small_cfg(epochs=1.0, ablations={"enabled": True}, **kw)


def rig_val_scores(monkeypatch, scores: dict[str, float]) -> None:
    """Make the base (init random or the other encoder) or pipeline arm win the gate on val."""
    from tunery.modeling import arms as finetune_arms

    real = finetune_arms.train_variant

    def rigged(cfg, **kw):
        result, stats = real(cfg, **kw)
        if kw.get("arm", "pipeline") == "pipeline":
            stats["best_val_macro_f1"] = scores["pipeline"]
        elif kw["method"] == cfg.method and "base" in scores:
            stats["best_val_macro_f1"] = scores["base"]
        return result, stats

    monkeypatch.setattr(finetune_arms, "train_variant", rigged)


def test_pretrain_gate_decides_on_val_and_ties_go_to_the_pipeline():
    assert pretrain_gate(0.80, 0.81, None)["chosen"] == "base"
    assert pretrain_gate(0.81, 0.81, None)["chosen"] == "pipeline"
    assert pretrain_gate(0.82, 0.81, None)["chosen"] == "pipeline"
    gate = pretrain_gate(0.70, 0.75, None)
    assert gate["decision"] == (
        "pretraining did not help: val macro-F1 0.7000 (pipeline encoder) vs 0.7500 (its base): "
        "fine-tuning from the base"
    )
    skipped = pretrain_gate(0.7, None, "finetune.encoder is set")
    assert skipped["applied"] is False and skipped["chosen"] == "pipeline"
    assert "finetune.encoder is set" in skipped["decision"]


def test_arms_table_contract(encoder, data, tmp_path):
    metrics = run(arms_cfg(), encoder, data, tmp_path, base=BaseArm(encoder=encoder, init="random"))
    out = tmp_path / "out"
    report = read_arms(out)
    assert list(report["arms"]) == list(ARM_ORDER)  # probe, base, pipeline, full
    assert list(json.loads((out / ARMS_FILE).read_text())) == ["chosen", "pretrain_gate", "arms"]
    for name, arm in report["arms"].items():
        assert set(arm) == ARM_KEYS, name
        for split in ("test", "holdout"):
            assert set(arm[split]) == {"macro_f1", "accuracy"}
            assert 0.0 <= arm[split]["macro_f1"] <= 1.0
        assert metrics[f"arms.{name}.holdout_macro_f1"] == arm["holdout"]["macro_f1"]
    arms = report["arms"]
    assert arms["base"]["init"] == "random" and arms["pipeline"]["init"] == "pretrained"
    assert arms["full"]["trainable_share"] == 1.0 and arms["full"]["method"] == "full"
    assert 0.0 < arms["pipeline"]["trainable_share"] < 0.5
    # the same schedule for the compared arms
    assert arms["base"]["epochs"] == arms["pipeline"]["epochs"] == arms["full"]["epochs"] == 1.0
    # the probe: a logistic regression on frozen embeddings (classes x (hidden + 1) weights)
    assert arms["probe"]["method"] == "probe"
    assert arms["probe"]["trainable_params"] == len(LABELS) * (32 + 1)
    gate = report["pretrain_gate"]
    assert gate["applied"] is True
    assert gate["pipeline_val_macro_f1"] == arms["pipeline"]["best_val_macro_f1"]
    assert gate["base_val_macro_f1"] == arms["base"]["best_val_macro_f1"]
    assert report["chosen"] == (
        "base" if gate["base_val_macro_f1"] > gate["pipeline_val_macro_f1"] else "pipeline"
    )
    assert "arms" not in json.dumps({k: v for k, v in metrics.items() if not k.startswith("arms.")})
    assert not any(isinstance(v, dict) for v in metrics.values())  # headline numbers only


def test_gate_picks_the_base_when_better_on_val(encoder, data, tmp_path, monkeypatch, caplog):
    rig_val_scores(monkeypatch, {"pipeline": 0.30, "base": 0.60})
    with caplog.at_level(logging.INFO, logger="tunery.finetune"):
        metrics = run(
            arms_cfg(), encoder, data, tmp_path, base=BaseArm(encoder=encoder, init="random")
        )
    out = tmp_path / "out"
    report = read_arms(out)
    assert report["chosen"] == "base" and metrics["chosen_arm"] == "base"
    line = (
        "pretraining did not help: val macro-F1 0.3000 (pipeline encoder) vs 0.6000 (its base): "
        "fine-tuning from the base"
    )
    assert report["pretrain_gate"]["decision"] == line
    assert line in caplog.text
    info = json.loads((out / "finetune.json").read_text())
    assert info["arm"] == "base"
    # random base weights exist nowhere else: saved beside the adapter, and that is the encoder
    assert info["encoder"] == str((out / "encoder").resolve())
    assert metrics["best_val_macro_f1"] == 0.60
    # the saved model is the base arm's: its adapter reloads on the saved random encoder
    merged = load_classifier(out)
    import shutil

    from tunery.modeling.finetune_dir import ADAPTER_DIR, MERGED_DIR

    shutil.rmtree(out / MERGED_DIR)
    adapter = load_classifier(out)  # encoder + adapter (fingerprint checked)
    texts = ["a red animal that lives in the wild", "a hand tool"]
    assert abs(merged.predict_proba(texts) - adapter.predict_proba(texts)).max() < 1e-4
    assert (out / ADAPTER_DIR).is_dir()
    # the full and probe reference arms used the chosen (random) encoder
    assert report["arms"]["full"]["init"] == "random" == report["arms"]["probe"]["init"]


def test_gate_keeps_the_pipeline_when_better(encoder, other_encoder, data, tmp_path, monkeypatch):
    rig_val_scores(monkeypatch, {"pipeline": 0.60, "base": 0.30})
    run(arms_cfg(), encoder, data, tmp_path, base=BaseArm(encoder=other_encoder))
    out = tmp_path / "out"
    report = read_arms(out)
    assert report["chosen"] == "pipeline"
    assert report["arms"]["base"]["encoder"] == str(other_encoder)
    info = json.loads((out / "finetune.json").read_text())
    assert info["arm"] == "pipeline" and info["encoder"] == str(encoder.resolve())
    assert not (out / "encoder").exists()
    assert report["arms"]["full"]["encoder"] == str(encoder.resolve())


def test_base_pretrained_encoder_wins_and_is_recorded(
    encoder, other_encoder, data, tmp_path, monkeypatch
):
    rig_val_scores(monkeypatch, {"pipeline": 0.30, "base": 0.60})
    run(arms_cfg(), encoder, data, tmp_path, base=BaseArm(encoder=other_encoder))
    info = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert info["arm"] == "base" and info["encoder"] == str(other_encoder)
    assert load_classifier(tmp_path / "out").predict_proba(["a hand tool"]).shape == (1, 3)


def test_no_base_arm_when_the_encoder_is_given(encoder, data, tmp_path):
    skipped = BaseArm(encoder=None, skipped="finetune.encoder is set (not the pretrain output)")
    run(arms_cfg(), encoder, data, tmp_path, base=skipped)
    report = read_arms(tmp_path / "out")
    assert list(report["arms"]) == ["probe", "pipeline", "full"]
    assert report["pretrain_gate"]["applied"] is False
    assert "finetune.encoder is set" in report["pretrain_gate"]["decision"]


def test_ablations_off_writes_the_main_arm_only(encoder, data, tmp_path):
    run(
        small_cfg(epochs=1.0), encoder, data, tmp_path, base=BaseArm(encoder=encoder, init="random")
    )
    report = read_arms(tmp_path / "out")
    assert list(report["arms"]) == ["pipeline"] and report["chosen"] == "pipeline"
    assert report["pretrain_gate"]["applied"] is False


def test_arms_file_rejects_unknown_arms_and_missing_files(tmp_path):
    arm = {"test": {}, "holdout": {}}
    with pytest.raises(FinetuneError, match="unknown arms"):
        write_arms(tmp_path, {"chosen": "x", "pretrain_gate": {}, "arms": {"x": arm}})
    write_arms(
        tmp_path,
        {"chosen": "pipeline", "pretrain_gate": {}, "arms": {"full": arm, "pipeline": arm}},
    )
    assert list(read_arms(tmp_path)["arms"]) == ["pipeline", "full"]  # written in ARM_ORDER
    with pytest.raises(FinetuneError, match="no arms.json"):
        read_arms(tmp_path / "nowhere")


def test_default_lora_adapts_attention_and_feed_forward_not_the_head(encoder, data, tmp_path):
    from peft.tuners.lora import LoraLayer

    model = build_model(small_cfg(), method="lora", encoder=encoder, labels=LABELS)
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    for layer in range(2):
        for part in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ):
            assert any(n.endswith(f"encoder.layer.{layer}.{part}") for n in adapted), part
    # head and newly initialised pooler: trained fully (modules_to_save), no adapter inside
    assert not any("classifier" in n or "pooler" in n for n in adapted), sorted(adapted)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save" in n for n in trainable)
    assert any("pooler" in n and "modules_to_save" in n for n in trainable)
    # merge + parity with these targets (the stage checks it and records the difference)
    run(small_cfg(epochs=1.0), encoder, data, tmp_path)
    info = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert info["method_params"]["target_modules"] == "all-linear"
    assert 0.0 <= info["merge_max_abs_logit_diff"] <= 1e-3
    assert info["adapter_reload_max_abs_logit_diff"] <= 1e-3


def test_lora_trains_the_pooler_fully_and_adapts_the_rest(tmp_path):
    """`finetune.lora.train_fully: [pooler]`: the pooler is a trained copy (like the classifier),
    not adapted; every other linear layer of the encoder gets an adapter."""
    from tests.tiny import make_tiny_encoder
    from tunery.config import FinetuneConfig
    from tunery.modeling.methods import build_model

    encoder = make_tiny_encoder(tmp_path / "enc")
    model = build_model(
        FinetuneConfig(), method="lora", encoder=encoder, labels=["a", "b"], total_steps=4
    )
    config = model.peft_config["default"]
    assert any(m.endswith("pooler") for m in config.modules_to_save)
    assert not any("pooler" in t for t in config.target_modules)
    layer0 = [t for t in config.target_modules if "layer.0." in t]
    for name in ("query", "key", "value", "attention.output.dense", "intermediate.dense"):
        assert any(t.endswith(name) for t in layer0), name
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("pooler" in n and "modules_to_save" in n for n in trained)


class Killed(Exception):
    pass


@pytest.mark.parametrize("killed_arm", ["base", "full"])
def test_a_stage_killed_in_a_comparison_arm_resumes_that_arm(
    killed_arm, encoder, other_encoder, data, tmp_path, monkeypatch
):
    """Every arm keeps its own resume point: a stage killed (or timed out) after an arm's first
    complete checkpoint resumes that arm there, not from step 0, and ends as an uninterrupted run."""
    from transformers import TrainerCallback

    from tunery.modeling import arms as finetune_arms

    class KillAtSave(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            raise Killed  # the checkpoint is complete; the process dies right after

    real, resumed_from, kill = finetune_arms.train_variant, {}, [True]

    def spy(cfg, **kw):
        arm = kw.get("arm", "pipeline")
        if arm == killed_arm and kill[0]:
            kill[0] = False
            kw["callbacks"] = (*kw.get("callbacks", ()), KillAtSave())
        result, stats = real(cfg, **kw)
        resumed_from[arm] = stats["resumed_from"]
        return result, stats

    monkeypatch.setattr(finetune_arms, "train_variant", spy)
    cfg = small_cfg(epochs=2.0, ablations={"enabled": True})
    base = BaseArm(encoder=other_encoder, init="pretrained")
    with pytest.raises(Killed):
        run(cfg, encoder, data, tmp_path, base=base)
    again = run(cfg, encoder, data, tmp_path, base=base)
    assert resumed_from[killed_arm] is not None and "checkpoint-" in str(resumed_from[killed_arm])
    assert resumed_from["pipeline"] is not None  # finished before the kill: resumed at its end
    assert not any((tmp_path / "ckpt").iterdir())  # finished: every resume point dropped
    fresh = run(cfg, encoder, data, tmp_path / "fresh", base=base)
    assert resumed_from[killed_arm] is None
    for arm in ("pipeline", "base", "full"):
        key = f"arms.{arm}.holdout_macro_f1"
        assert again[key] == fresh[key], arm
