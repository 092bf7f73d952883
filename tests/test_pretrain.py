"""The pretrain stage on a tiny config (CPU, seconds): objectives, initialisations, resume, probe,
bad inputs; the 2-process DDP run is `slow`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO, make_rows
from tests.tiny import make_tiny_encoder
from tunery import metrics_files
from tunery.config import PretrainConfig, load_params
from tunery.data.tokens import unpadded
from tunery.errors import EXIT_INPUT, ConfigError, DataValidationError

torch = pytest.importorskip("torch")


def tiny_cfg(**over) -> PretrainConfig:
    base = {
        "init": "scratch",
        "scratch": {
            "layers": 1,
            "hidden": 32,
            "heads": 2,
            "intermediate": 64,
            "max_length": 32,
            "vocab_size": 200,
        },
        "max_length": 32,
        "train": {
            "batch_size": 8,
            "max_steps": 6,
            "save_steps": 3,
            "logging_steps": 2,
            "learning_rate": 1.0e-3,
            "device": "cpu",
            "threads": 1,
            "heldout_fraction": 0.1,
        },
        "probe": {"max_train": 200, "knn_k": 3},
    }
    for key, value in over.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return PretrainConfig.model_validate(base)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    rows = make_rows(40)
    pd.DataFrame({"text": make_rows(60, offset=200)["text"]}).to_parquet(d / "corpus.parquet")
    rows.iloc[::2].to_parquet(d / "train.parquet")
    rows.iloc[1::2].to_parquet(d / "val.parquet")
    return d


def run_stage(cfg: PretrainConfig, data_dir: Path, tmp_path: Path) -> dict:
    from tasks.pretrain import run

    return run(
        cfg,
        data_dir=data_dir,
        out_dir=tmp_path / "encoder",
        checkpoint_dir=tmp_path / "ckpt",
        plots_dir=tmp_path / "plots",
    )


# --------------------------------------------------------------------------- objectives and inits
def test_scratch_mlm_writes_a_loadable_encoder_and_metrics(data_dir, tmp_path):
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    m = run_stage(tiny_cfg(), data_dir, tmp_path)
    out = tmp_path / "encoder"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok("a red animal")
    assert "token_type_ids" in enc and tok.model_max_length == 32
    AutoModel.from_pretrained(out)
    clf = AutoModelForSequenceClassification.from_pretrained(out, num_labels=3)
    assert clf.config.num_labels == 3
    assert m["steps"] == 6 and m["steps_this_run"] == 6 and m["resumed_from_step"] == 0
    assert m["heldout"]["mlm_loss"] < m["heldout"]["random_mlm_loss"]
    assert set(m["probe"]["pretrained"]) == {"logreg", "knn"}
    assert set(m["probe"]["random"]) == {"logreg", "knn"}
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 0
    curve = json.loads((tmp_path / "plots" / "loss.json").read_text())
    assert curve and curve[-1]["step"] <= 6
    ckpts = sorted(p.name for p in (tmp_path / "ckpt").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-3", "checkpoint-6"]
    assert (tmp_path / "ckpt" / "checkpoint-6" / "tunery-complete.json").is_file()
    assert (tmp_path / "ckpt" / "checkpoint-6" / "model.safetensors").is_file()


def test_sparse_mlm_head_gives_the_full_heads_loss():
    import copy

    from transformers import BertConfig, BertForMaskedLM

    from tunery.modeling import objectives as pt

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    full = BertForMaskedLM(cfg).eval()
    sparse = pt.use_objective(copy.deepcopy(full), "mlm")
    assert type(sparse).__name__ == "SparseMLMBertForMaskedLM"
    ids = torch.randint(5, 300, (4, 16))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    labels[1, 9] = 7
    a = full(input_ids=ids, labels=labels).loss
    b = sparse(input_ids=ids, labels=labels).loss
    assert torch.allclose(a, b, atol=1e-6)
    assert pt.plain_class(sparse).__class__ is BertForMaskedLM


def test_simcse_from_a_base_folder(data_dir, tmp_path):
    base = make_tiny_encoder(tmp_path / "base")
    m = run_stage(tiny_cfg(init="base", base=str(base), objective="simcse"), data_dir, tmp_path)
    assert m["objective"] == "simcse" and m["source"] == str(base)
    assert m["heldout"]["simcse_loss"] > 0
    assert "initial" in m["probe"]
    config = json.loads((tmp_path / "encoder" / "config.json").read_text())
    assert config["architectures"] == ["BertModel"]
    # The base's own tokenizer is kept, not a new one.
    from transformers import AutoTokenizer

    kept = AutoTokenizer.from_pretrained(tmp_path / "encoder").get_vocab()
    assert kept == AutoTokenizer.from_pretrained(base).get_vocab()


def headless_base(tmp_path: Path) -> Path:
    """A tiny encoder saved without its MLM head (like all-MiniLM-L6-v2)."""
    from transformers import AutoModel

    full = make_tiny_encoder(tmp_path / "with_head")
    bare = tmp_path / "bare"
    AutoModel.from_pretrained(full).save_pretrained(bare)
    for f in full.iterdir():
        if f.name.startswith(("tokenizer", "special")):
            shutil.copy(f, bare / f.name)
    return bare


def encoder_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    return {k.removeprefix("bert."): v for k, v in state.items() if not k.startswith("cls.")}


def test_mlm_from_a_base_without_head_warms_a_fresh_head_up_first(data_dir, tmp_path, caplog):
    bare = headless_base(tmp_path)
    cfg = tiny_cfg(init="base", base=str(bare), mlm={"head_warmup_steps": 3})
    with caplog.at_level(logging.WARNING, logger="tunery.pretrain"):
        m = run_stage(cfg, data_dir, tmp_path)
    assert m["fresh_head_tensors"] > 0
    assert "freshly initialised" in caplog.text and "frozen for the first 3" in caplog.text
    assert json.loads((tmp_path / "encoder" / "config.json").read_text())["architectures"] == [
        "BertForMaskedLM"
    ]
    # Steps 1-3 trained the head alone: the encoder at checkpoint-3 is the base's, bit for bit;
    # steps 4-6 trained it.
    before = encoder_tensors(bare)
    at3 = encoder_tensors(tmp_path / "ckpt" / "checkpoint-3")
    at6 = encoder_tensors(tmp_path / "ckpt" / "checkpoint-6")
    assert all(torch.equal(at3[k], v) for k, v in before.items() if k in at3)
    assert any(not torch.equal(at6[k], v) for k, v in before.items() if k in at6)
    # The MLM model has no pooler: the saved encoder keeps the base's, so a fine-tune from it
    # starts where one from the base does (the pretrain gate compares like with like).
    out = encoder_tensors(tmp_path / "encoder")
    pooler = [k for k in before if k.startswith("pooler.")]
    assert pooler and all(torch.equal(out[k], before[k]) for k in pooler)


def test_mlm_on_a_base_without_head_and_no_warmup_is_refused(data_dir, tmp_path):
    from tunery.modeling.factory import ModelError

    bare = headless_base(tmp_path)
    with pytest.raises(ModelError, match=r"\[no_mlm_head\].*pretrain.mlm.head_warmup_steps"):
        run_stage(tiny_cfg(init="base", base=str(bare)), data_dir, tmp_path)
    assert not (tmp_path / "encoder").exists() and not (tmp_path / "ckpt").exists()


def test_simcse_deletion_view_gives_a_loss_and_moves_the_weights(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from tunery.modeling import objectives as pt

    base = make_tiny_encoder(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    model = pt.use_objective(AutoModel.from_pretrained(base), "simcse", temperature=0.05)
    feats = unpadded(tok, make_rows(8)["text"].tolist(), max_length=32, special_tokens_mask=True)
    assert "view_input_ids" not in pt.simcse_collator(tok, deletion=0.0)(feats)
    batch = pt.simcse_collator(tok, deletion=0.3)(feats)
    assert batch["view_input_ids"].shape == batch["input_ids"].shape
    kept = batch["view_attention_mask"].sum(1)
    assert (kept < batch["attention_mask"].sum(1)).any() and (kept >= 3).all()  # CLS, SEP, 1+
    assert (batch["view_input_ids"][:, 0] == tok.cls_token_id).all()
    loss = model(**batch)["loss"]
    assert torch.isfinite(loss) and loss > 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss.backward()
    opt.step()
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("encoder.layer.0" in k for k in moved)


def test_whole_word_masking_masks_all_pieces_of_a_word():
    from tunery.modeling import factory as models
    from tunery.modeling import objectives as pt

    texts = make_rows(30)["text"].tolist()
    tok = models.train_wordpiece(texts, vocab_size=120, max_length=32)
    cfg = tiny_cfg(mlm={"whole_word": True, "probability": 0.5}).mlm
    feats = unpadded(
        tok,
        ["unbelievably quarrelsome hippopotamuses"] * 16,
        max_length=32,
        special_tokens_mask=True,
        offsets=True,
    )
    torch.manual_seed(0)
    batch = pt.mlm_collator(tok, cfg)(feats)
    words = tok("unbelievably quarrelsome hippopotamuses").word_ids()
    masked = batch["labels"] != -100
    for row in masked:
        for w in {w for w in words if w is not None}:
            pieces = [row[i].item() for i, wid in enumerate(words) if wid == w]
            assert len(set(pieces)) == 1  # a word is masked whole or not at all
    assert masked.any()


# --------------------------------------------------------------------------- resume
def test_resume_skips_a_half_written_checkpoint(data_dir, tmp_path):
    cfg = tiny_cfg()
    first = run_stage(cfg, data_dir, tmp_path)
    # Simulate a kill while checkpoint-6 was being written: no marker, truncated weights.
    ck6 = tmp_path / "ckpt" / "checkpoint-6"
    (ck6 / "tunery-complete.json").unlink()
    with open(ck6 / "model.safetensors", "r+b") as f:
        f.truncate(100)
    shutil.rmtree(tmp_path / "encoder")  # as DVC does before re-running a stage
    m = run_stage(cfg, data_dir, tmp_path)
    assert m["resumed_from_step"] == 3 and m["steps_this_run"] == 3 and m["steps"] == 6
    assert (ck6 / "tunery-complete.json").is_file()  # re-saved whole
    # The loss curve carries the first run's steps 0-3 (restored state) and this run's 4-6.
    curve = json.loads((tmp_path / "plots" / "loss.json").read_text())
    assert [c["step"] for c in curve] == [1, 2, 4, 6]
    first_curve = [c["loss"] for c in curve if c["step"] <= 3]
    assert first_curve and first["final_loss"] is not None
    assert (tmp_path / "encoder" / "model.safetensors").is_file()


def test_resume_with_the_deletion_view(data_dir, tmp_path):
    base = make_tiny_encoder(tmp_path / "base")
    cfg = tiny_cfg(init="base", base=str(base), objective="simcse", simcse={"deletion": 0.2})
    first = run_stage(cfg, data_dir, tmp_path)
    assert first["heldout"]["simcse_loss"] > 0
    shutil.rmtree(tmp_path / "ckpt" / "checkpoint-6")  # killed before the last checkpoint
    shutil.rmtree(tmp_path / "encoder")
    m = run_stage(cfg, data_dir, tmp_path)
    assert m["resumed_from_step"] == 3 and m["steps_this_run"] == 3 and m["steps"] == 6
    # Other deletion settings shape training differently: not resumed.
    other = tiny_cfg(init="base", base=str(base), objective="simcse", simcse={"deletion": 0.1})
    shutil.rmtree(tmp_path / "encoder")
    assert run_stage(other, data_dir, tmp_path)["resumed_from_step"] == 0


def test_checkpoints_of_other_params_are_not_resumed(data_dir, tmp_path, caplog):
    run_stage(tiny_cfg(), data_dir, tmp_path)
    with caplog.at_level(logging.WARNING, logger="tunery.training"):
        m = run_stage(tiny_cfg(train={"learning_rate": 5.0e-4}), data_dir, tmp_path)
    assert m["resumed_from_step"] == 0 and m["steps_this_run"] == 6
    assert "starting fresh" in caplog.text


def test_compile_settings_do_not_stop_a_resume_but_an_unknown_mode_is_refused(tmp_path):
    from tunery.modeling.pretrainer import resume_fingerprint

    plain = resume_fingerprint(tiny_cfg(), "md5")
    tuned = tiny_cfg(train={"compile": True, "compile_mode": "max-autotune"})
    assert resume_fingerprint(tuned, "md5") == plain
    assert resume_fingerprint(tiny_cfg(train={"batch_size": 4}), "md5") != plain
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"pretrain.train.compile_mode"):
        load_params(path, ["pretrain.train.compile_mode=fastest"])


def test_a_corrupted_checkpoint_is_a_clear_error(data_dir, tmp_path):
    from tunery.modeling.training import CheckpointError

    run_stage(tiny_cfg(), data_dir, tmp_path)
    shutil.rmtree(tmp_path / "encoder")
    target = tmp_path / "ckpt" / "checkpoint-6" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=r"checkpoint-6/model.safetensors: \[checkpoint_corrupted\]"
    ):
        run_stage(tiny_cfg(), data_dir, tmp_path)
    assert not (tmp_path / "encoder").exists()


def test_no_wall_clock_budget_by_default(data_dir, tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["pretrain"]["train"]["max_minutes"] is None
    assert PretrainConfig().train.max_minutes is None
    m = run_stage(tiny_cfg(), data_dir, tmp_path)
    assert m["max_minutes"] is None and m["stopped_by_budget"] is False
    assert m["stopped_at_step"] is None and m["steps"] == m["max_steps"] == 6


def test_wall_clock_budget_stops_and_keeps_a_checkpoint(data_dir, tmp_path):
    m = run_stage(tiny_cfg(train={"max_steps": 1000, "max_minutes": 0.0001}), data_dir, tmp_path)
    assert m["stopped_by_budget"] and m["steps"] < 1000
    assert m["stopped_at_step"] == m["steps"] and m["max_steps"] == 1000
    assert m["max_minutes"] == 0.0001
    assert (tmp_path / "ckpt" / f"checkpoint-{m['steps']}" / "tunery-complete.json").is_file()


# --------------------------------------------------------------------------- probe
def test_probe_separates_informative_from_random_embeddings():
    import numpy as np

    from tunery.modeling.objectives import probe

    rng = np.random.default_rng(0)
    y = ["a", "b", "c"] * 40
    centers = {"a": 0, "b": 1, "c": 2}
    informative = np.stack([np.eye(8)[centers[c]] * 3 + rng.normal(size=8) * 0.3 for c in y])
    noise = rng.normal(size=(len(y), 8))
    good = probe(informative[:90], y[:90], informative[90:], y[90:], methods=["logreg", "knn"], k=5)
    bad = probe(noise[:90], y[:90], noise[90:], y[90:], methods=["logreg", "knn"], k=5)
    assert good["logreg"] > 0.9 and good["knn"] > 0.9
    assert bad["logreg"] < 0.7 and bad["knn"] < 0.7


# --------------------------------------------------------------------------- bad input
def test_empty_corpus(data_dir, tmp_path):
    pd.DataFrame({"text": pd.Series([], dtype=str)}).to_parquet(data_dir / "corpus.parquet")
    with pytest.raises(DataValidationError, match=r"corpus.parquet: \[empty_corpus\]"):
        run_stage(tiny_cfg(), data_dir, tmp_path)
    assert not (tmp_path / "encoder").exists() and not (tmp_path / "ckpt").exists()


def test_corpus_smaller_than_one_batch(data_dir, tmp_path):
    pd.DataFrame({"text": ["one text", "another text"]}).to_parquet(data_dir / "corpus.parquet")
    with pytest.raises(DataValidationError, match=r"corpus.parquet: \[corpus_too_small\]"):
        run_stage(tiny_cfg(), data_dir, tmp_path)
    assert not (tmp_path / "encoder").exists()


def test_base_that_is_not_a_model(data_dir, tmp_path):
    from tunery.modeling.factory import ModelError

    notmodel = tmp_path / "notmodel"
    notmodel.mkdir()
    (notmodel / "readme.txt").write_text("hello")
    with pytest.raises(ModelError, match=r"notmodel: \[not_a_model\] no config.json"):
        run_stage(tiny_cfg(init="base", base=str(notmodel)), data_dir, tmp_path)
    assert not (tmp_path / "encoder").exists() and not (tmp_path / "ckpt").exists()


def test_tokenizer_that_does_not_match_the_model(data_dir, tmp_path):
    from tunery.modeling import factory as models
    from tunery.modeling.factory import ModelError

    base = make_tiny_encoder(tmp_path / "base", vocab_size=120)
    big = models.train_wordpiece(make_rows(200)["text"].tolist() * 3, vocab_size=400, max_length=32)
    assert len(big) > 120
    big.save_pretrained(base)  # a tokenizer from another model
    with pytest.raises(ModelError, match=r"\[tokenizer_mismatch\]"):
        run_stage(tiny_cfg(init="base", base=str(base)), data_dir, tmp_path)
    assert not (tmp_path / "encoder").exists()


def test_unknown_objective_is_a_config_error(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"pretrain.objective"):
        load_params(path, ["pretrain.objective=electra"])
    with pytest.raises(ConfigError, match=r"pretrain"):
        load_params(path, ["pretrain.init=base", "pretrain.base=null"])  # base without `base`


def test_stage_exit_code_and_nothing_written_on_bad_input(data_dir, tmp_path, monkeypatch):
    from tasks import pretrain

    root = tmp_path / "proj"
    root.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"]["experiment"] = "test"
    snapshot = params.get("corpus", {}).get("out_dir") or params["prepare"]["out_dir"]
    (root / snapshot).parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(data_dir, root / snapshot)
    pd.DataFrame({"text": pd.Series([], dtype=str)}).to_parquet(root / snapshot / "corpus.parquet")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(root)
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main([])
    assert exit_info.value.code == EXIT_INPUT
    assert not (root / "metrics" / "pretrain.json").exists()
    assert not (root / params["pretrain"]["out_dir"]).exists()


# --------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_two_process_ddp_on_cpu(data_dir, tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    for name in ("tunery", "tasks"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"]["experiment"] = "test"
    params["pretrain"] = json.loads(
        tiny_cfg(train={"max_steps": 4, "save_steps": 2}).model_dump_json()
    )
    snapshot = params.get("corpus", {}).get("out_dir") or params["prepare"]["out_dir"]
    (root / snapshot).parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(data_dir, root / snapshot)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.yaml").write_text("stages: {}\n")
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "tasks.pretrain",
    ]
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = metrics_files.read(root, "pretrain")
    assert metrics["world_size"] == 2 and metrics["steps"] == 4
    out = root / params["pretrain"]["out_dir"]
    assert (out / "model.safetensors").is_file()
    assert (
        root / params["pretrain"]["checkpoint_dir"] / "checkpoint-4" / "tunery-complete.json"
    ).is_file()


def test_tf32_set_by_trainingarguments_leaves_both_torch_apis_readable():
    # On CUDA, TrainingArguments turns TF32 on through torch's per-backend API only; Inductor's GEMM
    # autotuning (compile mode max-autotune) reads the legacy one and failed with "mix of the
    # legacy and new APIs" on the H100. A fresh process: these are process-wide torch settings.
    code = (
        "import torch\n"
        "from tunery.modeling.training import agree_tf32_settings\n"
        "torch.backends.fp32_precision = 'tf32'  # what enable_tf32(True) does on torch >= 2.9\n"
        "agree_tf32_settings()\n"
        "print(torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision(),"
        " torch.backends.cuda.matmul.fp32_precision)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["True", "high", "tf32"]
