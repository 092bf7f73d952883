"""finetune on a tiny BERT (CPU, seconds): every method's outputs and merge parity, determinism,
resume after a kill, warm start, and bad input failing before anything is written. The arms and
the pretrain gate: tests/test_finetune_arms.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import make_rows
from tunery.config import FinetuneConfig
from tunery.errors import EXIT_INPUT, DataValidationError, FinetuneError
from tunery.modeling.methods import build_model
from tunery.modeling.predict import load_classifier
from tunery.modeling.trainer import class_weight_vector
from tunery.modeling.training import last_complete_checkpoint

LABELS = ["animal", "food", "tool"]


def write_splits(dest: Path, n_per_class: int = 24) -> Path:
    """train/val/test/holdout parquet files and labels.json from the conftest toy rows."""
    dest.mkdir(parents=True, exist_ok=True)
    rows = make_rows(n_per_class).assign(origin="test")
    part = rows.index % 6
    splits = {"train": part < 3, "val": part == 3, "test": part == 4, "holdout": part == 5}
    for name, mask in splits.items():
        rows[mask].reset_index(drop=True).to_parquet(dest / f"{name}.parquet", index=False)
    (dest / "labels.json").write_text(json.dumps(LABELS))
    return dest


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    from tests.tiny import make_tiny_encoder

    return make_tiny_encoder(tmp_path_factory.mktemp("enc") / "encoder")


@pytest.fixture
def data(tmp_path) -> Path:
    return write_splits(tmp_path / "data")


def small_cfg(**kw) -> FinetuneConfig:
    base = {"epochs": 2.0, "batch_size": 16, "early_stopping_patience": 5}
    return FinetuneConfig(**(base | kw))


def run(cfg, encoder, data, tmp_path, name="out", **kw):
    from tasks import finetune

    return finetune.run(
        cfg,
        encoder=encoder,
        data_dir=data,
        out_dir=tmp_path / name,
        checkpoint_root=tmp_path / "ckpt",
        plot_dir=tmp_path / "plots",
        root=tmp_path,
        **kw,
    )


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


@pytest.mark.parametrize("method", ["lora", "ia3", "adalora", "prefix", "full"])
def test_every_method_writes_the_contract(method, encoder, data, tmp_path):
    cfg = small_cfg(method=method, class_weights="balanced" if method == "ia3" else "none")
    metrics = run(cfg, encoder, data, tmp_path)
    out = tmp_path / "out"
    info = json.loads((out / "finetune.json").read_text())
    assert info["method"] == method
    assert json.loads((out / "labels.json").read_text()) == LABELS
    assert info["max_length"] <= 64 - (16 if method == "prefix" else 0)  # tiny: 64 positions

    mergeable = method != "prefix"
    assert info["mergeable"] is mergeable
    assert (out / "merged").is_dir() is mergeable
    if mergeable:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        merged = AutoModelForSequenceClassification.from_pretrained(out / "merged")
        assert merged.config.id2label == dict(enumerate(LABELS))
        assert AutoTokenizer.from_pretrained(out / "merged")("a red animal")["input_ids"]
        # merge parity, measured on a validation batch and recorded
        assert 0.0 <= info["merge_max_abs_logit_diff"] <= cfg.merge_tolerance
    else:
        assert info["merge_max_abs_logit_diff"] is None

    if method == "full":
        assert metrics["trainable_share"] == 1.0
        assert (out / "adapter" / "model.safetensors").is_file()
    else:
        assert 0.0 < metrics["trainable_share"] < 0.5
        weights = tensors(out / "adapter" / "adapter_model.safetensors")
        # the head is trained and saved with every method (peft modules_to_save)
        assert any("classifier" in k for k in weights), sorted(weights)[:5]
        assert info["adapter_reload_max_abs_logit_diff"] <= cfg.merge_tolerance

    for key in ("samples_per_s", "tokens_per_s", "peak_memory_mb", "train_seconds"):
        assert metrics[key] > 0, key
    assert (tmp_path / "plots" / "val.csv").is_file()
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())

    clf = load_classifier(out)
    probs = clf.predict_proba(["a red animal that lives in the wild", "a hand tool"])
    assert probs.shape == (2, 3) and abs(probs.sum() - 2.0) < 1e-4


def test_full_finetune_learns_and_is_deterministic(encoder, data, tmp_path):
    cfg = small_cfg(
        method="full",
        epochs=8.0,
        warmup=0.0,
        full={"learning_rate": 3.0e-3},
        deterministic=True,  # the default on CPU; on CUDA (run by hand) it must be asked for
    )
    first = run(cfg, encoder, data, tmp_path / "a")
    run(cfg, encoder, data, tmp_path / "b")
    # Separable toy classes; one-class guessing scores 0.17. (tests/tiny.py's WordPiece vocabulary
    # differs between processes, so the score does too: the bound leaves room for that.)
    assert first["best_val_macro_f1"] > 0.45
    a = tensors(tmp_path / "a" / "out" / "merged" / "model.safetensors")
    b = tensors(tmp_path / "b" / "out" / "merged" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)


class Killed(Exception):
    pass


def test_resume_after_kill_matches_uninterrupted_run(encoder, data, tmp_path):
    from transformers import TrainerCallback

    class KillAfterFirstCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            raise Killed  # the checkpoint is complete; the process dies right after

    cfg = small_cfg(method="lora", epochs=3.0)
    with pytest.raises(Killed):
        run(cfg, encoder, data, tmp_path, name="resumed", callbacks=(KillAfterFirstCheckpoint(),))
    assert not (tmp_path / "resumed").exists()  # nothing written
    [folder] = list((tmp_path / "ckpt").iterdir())
    assert last_complete_checkpoint(folder).name.startswith("checkpoint-")
    (folder / "checkpoint-999").mkdir()  # a half-written later checkpoint is ignored and removed

    resumed = run(cfg, encoder, data, tmp_path, name="resumed")
    assert resumed["resumed"] is True
    assert not (folder / "checkpoint-999").exists()
    fresh = run(cfg, encoder, data, tmp_path / "fresh", name="fresh")
    assert fresh["resumed"] is False
    assert resumed["steps"] == fresh["steps"]
    a = tensors(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    b = tensors(tmp_path / "fresh" / "fresh" / "adapter" / "adapter_model.safetensors")
    assert all(float((a[k] - b[k]).abs().max()) < 1e-6 for k in a)


def test_changed_params_do_not_resume(encoder, data, tmp_path):
    from transformers import TrainerCallback

    class KillAtSave(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            raise Killed

    with pytest.raises(Killed):
        run(small_cfg(epochs=2.0), encoder, data, tmp_path, callbacks=(KillAtSave(),))
    metrics = run(small_cfg(epochs=2.0, seed=7), encoder, data, tmp_path)
    assert metrics["resumed"] is False


def test_warm_start_continues_from_the_adapter(encoder, data, tmp_path):
    from peft.utils import get_peft_model_state_dict

    cfg = small_cfg(method="lora")
    run(cfg, encoder, data, tmp_path, name="champion")
    champion = tmp_path / "champion"
    saved = tensors(champion / "adapter" / "adapter_model.safetensors")
    warm_cfg = small_cfg(method="lora", warm_start=str(champion))
    model = build_model(
        warm_cfg, method="lora", encoder=encoder, labels=LABELS, warm_start=champion
    )
    state = get_peft_model_state_dict(model)
    assert set(saved) <= set(state)
    assert all((state[k] == saved[k]).all() for k in saved)  # starts exactly where it ended
    metrics = run(warm_cfg, encoder, data, tmp_path, name="next")
    info = json.loads((tmp_path / "next" / "finetune.json").read_text())
    assert info["warm_start"] == str(champion) and metrics["steps"] > 0


def test_warm_start_mismatches_are_clear_errors(encoder, data, tmp_path):
    from tests.tiny import make_tiny_encoder

    run(small_cfg(method="lora", epochs=1.0), encoder, data, tmp_path, name="champion")
    champion = tmp_path / "champion"
    with pytest.raises(FinetuneError, match="warm start from a 'lora' fine-tune"):
        build_model(
            small_cfg(method="ia3"),
            method="ia3",
            encoder=encoder,
            labels=LABELS,
            warm_start=champion,
        )
    with pytest.raises(FinetuneError, match="labels"):
        build_model(
            small_cfg(),
            method="lora",
            encoder=encoder,
            labels=[*LABELS, "zzz"],
            warm_start=champion,
        )
    other = make_tiny_encoder(tmp_path / "wide", hidden=48)
    with pytest.raises(FinetuneError, match="does not match the encoder"):
        build_model(small_cfg(), method="lora", encoder=other, labels=LABELS, warm_start=champion)
    with pytest.raises(FinetuneError, match="not a finetune output"):
        run(small_cfg(warm_start=str(tmp_path / "nowhere")), encoder, data, tmp_path, name="x")
    assert not (tmp_path / "x").exists()


def test_prefix_adapter_refuses_a_changed_encoder(encoder, data, tmp_path):
    enc = tmp_path / "enc"
    shutil.copytree(encoder, enc)
    run(small_cfg(method="prefix", epochs=1.0), enc, data, tmp_path)
    from tests.tiny import make_tiny_encoder

    shutil.rmtree(enc)
    make_tiny_encoder(enc, seed=1)  # same shapes, other weights: the prefix would silently drift
    with pytest.raises(FinetuneError, match="does not match the encoder"):
        load_classifier(tmp_path / "out")


@pytest.mark.parametrize(
    ("mutate", "rule"),
    [
        (lambda d: pd.read_parquet(d / "val.parquet").iloc[:0], "empty_split"),
        (lambda d: pd.read_parquet(d / "val.parquet").assign(label="mineral"), "unknown_label"),
    ],
)
def test_bad_validation_split_fails_before_training(mutate, rule, encoder, data, tmp_path):
    mutate(data).to_parquet(data / "val.parquet", index=False)
    with pytest.raises(DataValidationError, match=rf"val.parquet.*\[{rule}\]"):
        run(small_cfg(), encoder, data, tmp_path)
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckpt").exists()


def test_unsupported_method_architecture_fails_before_training(encoder, data, tmp_path):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    distil = tmp_path / "distil"
    DistilBertForMaskedLM(
        DistilBertConfig(
            vocab_size=200, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=64
        )
    ).save_pretrained(distil)
    for f in encoder.glob("tokenizer*"):
        shutil.copy(f, distil / f.name)
    with pytest.raises(FinetuneError, match="prefix tuning needs an encoder that accepts"):
        run(small_cfg(method="prefix"), distil, data, tmp_path)
    with pytest.raises(FinetuneError, match="match no module"):
        run(small_cfg(lora={"target_modules": ["nonexistent"]}), encoder, data, tmp_path)
    assert not (tmp_path / "out").exists()


def test_unknown_method_is_a_config_error_with_exit_2(tmp_path, monkeypatch, capsys):
    from tasks import finetune

    repo = Path(__file__).resolve().parents[1]
    shutil.copy(repo / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(repo / "dvc.yaml", tmp_path / "dvc.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        finetune.main(["--set", "finetune.method=lorax"])
    assert done.value.code == EXIT_INPUT
    assert "finetune.method" in capsys.readouterr().err
    assert not (tmp_path / "models").exists() and not (tmp_path / "metrics").exists()


def test_merge_parity_failure_writes_nothing(encoder, data, tmp_path, monkeypatch):
    from tunery.modeling import save

    monkeypatch.setattr(save, "max_diff", lambda a, b: 1.0)
    with pytest.raises(FinetuneError, match="differs from the trained model"):
        run(small_cfg(epochs=1.0), encoder, data, tmp_path)
    assert not (tmp_path / "out").exists()


def test_class_weights_by_hand():
    assert class_weight_vector([0, 0, 0, 1], 2) == [4 / 6, 4 / 2]
    assert class_weight_vector([0, 1, 2], 3) == [1.0, 1.0, 1.0]


def test_last_complete_checkpoint(tmp_path):
    from tunery.modeling.training import write_marker

    assert last_complete_checkpoint(tmp_path / "none") is None
    for step, complete in ((5, True), (10, True), (15, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
        if complete:  # the marker (written by `CompletionMarker` on save) makes it complete
            write_marker(tmp_path / f"checkpoint-{step}")
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-10"
    assert not (tmp_path / "checkpoint-15").exists()


def test_finished_stage_drops_every_resume_point_and_nothing_else(tmp_path):
    from tunery.modeling.training import drop_resume_points

    assert drop_resume_points(tmp_path / "none") == []
    for key in ("0123456789abcdef", "fedcba9876543210"):  # this run's and an abandoned one's
        (tmp_path / key / "checkpoint-5").mkdir(parents=True)
    (tmp_path / "notes").mkdir()  # a user's folder beside them
    (tmp_path / "README").write_text("mine")
    assert drop_resume_points(tmp_path) == ["0123456789abcdef", "fedcba9876543210"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README", "notes"]
