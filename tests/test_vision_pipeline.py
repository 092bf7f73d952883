"""The image pipeline's stages (tasks/vision/*) on a tiny generated image set (CPU, seconds).

One module-scoped chain runs every stage's `run()` in order (ingest -> prepare -> pretrain ->
finetune -> export -> compress -> evaluate) on three classes of 28x28 grey PNGs in a folder per
class, with a 2-layer 32-wide ViT and a few steps; each test checks one stage's outputs and file
contracts. The slow test runs `dvc repro vision/dvc.yaml` in a copy of the project and checks that
the register stage leaves a champion in the registry.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.conftest import init_repo, tool_env
from tunery.errors import ConfigError, DataValidationError
from tunery.vision.params import VisionParams, load_vision_params

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("bag", "boot", "shirt")


def pattern(label: int, seed: int) -> np.ndarray:
    """A learnable 28x28 grey image: a bright band whose place depends on the class, plus noise."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 90, (28, 28))
    x[label * 9 : label * 9 + 9, :] += 150
    return x.clip(0, 255).astype(np.uint8)


def class_images(root: Path, per_class: int = 24) -> Path:
    for c, label in enumerate(CLASSES):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(pattern(c, 100 * c + i)).save(root / label / f"{i}.png")
    return root


def tiny_tree(source: dict) -> dict:
    """vision/params.yaml shrunk: tiny ViT, a few steps, fp32 + int8 variants, quick benches."""
    tree = yaml.safe_load((REPO / "vision" / "params.yaml").read_text())
    tree["tracking"]["experiment"] = "test-vision"
    tree["registry"]["floor_macro_f1"] = 0.0
    tree["ingest"]["source"] = source
    tree["ingest"]["checks"]["min_per_class"] = 5
    tree["prepare"]["fractions"] = {"val": 0.2, "test": 0.2, "holdout": 0.2}
    pre = tree["pretrain"]
    pre["vit"] = {"patch_size": 7, "hidden_size": 32, "num_layers": 2, "num_heads": 2}
    pre["simclr"].update(batch_size=8, max_steps=2, save_steps=0, logging_steps=1)
    tree["finetune"].update(max_steps=3, batch_size=8)
    tree["compress"]["variants"] = ["fp32", "int8_dynamic", "fp16"]
    tree["compress"]["max_f1_drop"] = 1.0
    tree["compress"]["calibration_samples"] = 8
    tree["compress"]["prune"]["recovery"].update(steps=2, batch_size=4)
    tree["compress"]["prune"]["images"] = 8
    tree["compress"]["bench"] = {
        "warmup": 1,
        "latency_runs": 2,
        "throughput_batch": 4,
        "throughput_batches": 1,
        "throughput_repeats": 1,
        "threads": 1,
    }
    tree["evaluate"]["champion"] = None
    tree["evaluate"]["confident_wrong"] = 4
    return tree


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    """Every stage's run() in order on the tiny set; returns the root, params and metrics."""
    from tasks.vision import compress, evaluate, export, finetune, ingest, prepare
    from tunery.vision import pretraining

    root = tmp_path_factory.mktemp("vision")
    class_images(root / "data" / "source")
    p = VisionParams.model_validate(tiny_tree({"kind": "folder", "path": "data/source"}))
    out = {"root": root, "params": p}
    out["ingest"] = ingest.run(p.ingest, root=root, out_dir=root / p.ingest.out_dir)
    data = root / p.prepare.out_dir
    out["prepare"] = prepare.run(p.prepare, raw_dir=root / p.ingest.out_dir, out_dir=data)
    out["pretrain"] = pretraining.run(
        p.pretrain,
        p.processor,
        root=root,
        raw_dir=root / p.ingest.out_dir,
        data_dir=data,
        out_dir=root / p.pretrain.out_dir,
        checkpoint_dir=root / p.pretrain.checkpoint_dir,
    )
    ft = root / p.finetune.out_dir
    out["finetune"] = finetune.run(
        p.finetune,
        p.processor,
        root=root,
        data_dir=data,
        encoder=root / p.pretrain.out_dir,
        out_dir=ft,
    )
    onnx_dir = root / p.export.out_dir
    out["export"] = export.run(
        p.export, p.processor, root=root, finetune=ft, data_dir=data, out_dir=onnx_dir
    )
    c = p.compress
    out["compress"] = compress.run(
        c,
        p.processor,
        root=root,
        finetune=ft,
        export_dir=onnx_dir,
        data_dir=data,
        variants_dir=root / c.variants_dir,
        out_dir=root / c.out_dir,
        report_dir=root / c.report_dir,
        raw_dir=root / p.ingest.out_dir,
    )
    out["evaluate"] = evaluate.run(
        p.evaluate,
        p.processor,
        root=root,
        model_dir=root / c.out_dir,
        finetune=ft,
        compress_report=root / c.report_dir / "report.json",
        data_dir=data,
        report_dir=root / p.evaluate.report_dir,
        plot_dir=root / "plots" / "evaluate",
    )
    return out


def test_ingest_and_prepare_write_tables_and_hash_splits(chain):
    import pandas as pd

    root, p = chain["root"], chain["params"]
    assert chain["ingest"]["rows"] == 72 and chain["ingest"]["classes"] == 3
    labelled = pd.read_parquet(root / p.ingest.out_dir / "labelled.parquet")
    assert set(labelled["label"]) == set(CLASSES) and labelled["sha256"].is_unique
    assert labelled["root"].unique().tolist() == ["data/source"]  # as the project names it
    splits = {
        n: pd.read_parquet(root / p.prepare.out_dir / f"{n}.parquet")
        for n in ("train", "val", "test", "holdout")
    }
    assert sum(len(s) for s in splits.values()) == 72 == chain["prepare"]["rows"]["total"]
    seen = [set(s["sha256"]) for s in splits.values()]
    assert all(a.isdisjoint(b) for i, a in enumerate(seen) for b in seen[i + 1 :])
    assert json.loads((root / p.prepare.out_dir / "labels.json").read_text()) == sorted(CLASSES)


def test_pretrain_keeps_its_starting_weights_and_probes_both(chain):
    root, p = chain["root"], chain["params"]
    enc = root / p.pretrain.out_dir
    assert (enc / "init" / "model.safetensors").is_file()
    assert (enc / "model" / "model.safetensors").is_file()
    m = chain["pretrain"]
    assert m["steps"] == 2 and m["objective"] == "simclr"
    assert set(m["probe"]) == {"pretrained", "init", "diff_pt"}
    assert not (root / p.pretrain.checkpoint_dir).exists()  # removed once the output is written


def test_mae_writes_the_same_encoder_folder_from_the_same_start(chain, tmp_path):
    """`pretrain.objective: mae`: the same starting weights as SimCLR's (init/), an encoder
    folder the fine-tune reads as it reads SimCLR's, with MAE's encoder weights in it."""
    from safetensors.torch import load_file

    from tunery.vision import encoder_dir, pretraining
    from tunery.vision.vit import build_classifier

    root, p = chain["root"], chain["params"]
    tree = p.model_dump(mode="json")
    tree["pretrain"].update(objective="mae")
    tree["pretrain"]["mae"].update(batch_size=8, max_steps=3, logging_steps=1)
    cfg = VisionParams.model_validate(tree).pretrain
    out = tmp_path / "encoder"
    m = pretraining.run(
        cfg,
        p.processor,
        root=root,
        raw_dir=root / p.ingest.out_dir,
        data_dir=root / p.prepare.out_dir,
        out_dir=out,
        checkpoint_dir=tmp_path / "ckpt",
    )
    assert m["objective"] == "mae" and m["steps"] == 3 and m["loss_last"] > 0
    assert set(m["probe"]) == {"pretrained", "init", "diff_pt"}
    simclr_init = load_file(str(root / p.pretrain.out_dir / "init" / "model.safetensors"))
    mae_init = load_file(str(out / "init" / "model.safetensors"))
    assert all(torch.equal(simclr_init[k], mae_init[k]) for k in simclr_init)  # one start
    trained = load_file(str(out / "model" / "model.safetensors"))
    moved = [k for k in trained if not torch.equal(trained[k], mae_init[k])]
    assert "vit.embeddings.position_embeddings" in moved  # MAE's fixed sin-cos
    assert any(".attention.attention.query.weight" in k for k in moved)
    clf = build_classifier(p.processor, ["a", "b", "c"], base_dir=encoder_dir.model_dir(out))
    assert torch.equal(clf.vit.embeddings.cls_token, trained["vit.embeddings.cls_token"])


def test_finetune_trains_every_arm_and_gates_pretraining(chain):
    root, p = chain["root"], chain["params"]
    arms = json.loads((root / p.finetune.out_dir / "arms.json").read_text())
    assert p.finetune.method == "full"  # the demo's default: LoRA is the reference arm
    assert list(arms["arms"]) == ["probe", "base", "pipeline", "full", "lora"]
    for arm in arms["arms"].values():
        assert {"val", "test", "holdout"} <= set(arm)
    gate = arms["pretrain_gate"]
    better = arms["arms"]["pipeline"]["val"]["macro_f1"] >= arms["arms"]["base"]["val"]["macro_f1"]
    assert gate["pays"] is better and arms["chosen"] == ("pipeline" if better else "base")
    assert ("steps aside" in gate["decision"]) is (not better)
    assert arms["arms"]["full"] == arms["arms"][arms["chosen"]]  # the method itself
    assert arms["arms"]["pipeline"]["trainable_share"] == 1.0
    assert 0 < arms["arms"]["lora"]["trainable_share"] < 1  # LoRA + the classifier


def test_pretrain_gate_steps_aside_when_simclr_loses():
    from tunery.vision.arms import gate

    worse = gate({"val": {"macro_f1": 0.40}}, {"val": {"macro_f1": 0.45}}, "lora")
    assert worse["pays"] is False and "does NOT pay" in worse["decision"]
    assert worse["val_macro_f1_diff_pt"] == -5.0
    assert gate({"val": {"macro_f1": 0.5}}, {"val": {"macro_f1": 0.5}}, "lora")["pays"] is True
    mae = gate({"val": {"macro_f1": 0.5}}, {"val": {"macro_f1": 0.4}}, "full", "mae")
    assert mae["decision"].startswith("MAE pays: full val macro-F1 0.5000 vs 0.4000")


def test_export_folder_is_an_image_model_with_parity(chain):
    from tunery.onnx.export import verify_model_dir
    from tunery.vision.processor import ProcessorConfig, from_contract

    root, p = chain["root"], chain["params"]
    manifest = verify_model_dir(root / p.export.out_dir)
    assert manifest["modality"] == "image" and manifest["variant"] == "fp32"
    assert from_contract(manifest["processor"]) == ProcessorConfig()
    assert chain["export"]["parity"]["agreement"] == 1.0
    assert chain["export"]["parity"]["max_abs_logit_diff"] < 1e-3


def test_compress_judges_variants_and_deploys_a_calibrated_one(chain):
    from tunery.onnx.export import verify_model_dir

    root, p = chain["root"], chain["params"]
    report = json.loads((root / p.compress.report_dir / "report.json").read_text())
    assert set(report["variants"]) == {
        "fp32",
        "int8_dynamic",
        "fp16",
        "pruned_fp32",
        "pruned_int8_dynamic",
    }
    assert "parity" in report["variants"]["int8_dynamic"]
    assert "parity" in report["variants"]["pruned_int8_dynamic"]
    assert report["prune"]["heads_per_layer"] == 1 and report["prune"]["recovery"]["steps"] == 2
    assert (
        "Pruned: layers [0, 1] kept, 1 heads"
        in (root / p.compress.report_dir / "report.md").read_text()
    )
    assert (
        report["variants"]["fp16"].get("skipped") or "cuda" in report["variants"]["fp16"]["bench"]
    )
    assert report["selected"] in report["eligible"] and report["selected"] != "fp16"
    manifest = verify_model_dir(root / p.compress.out_dir)
    assert manifest["modality"] == "image" and manifest["calibration"]["temperature"] > 0
    assert manifest["calibration"]["fitted_on"] == "val+test"  # every judged row, as for text
    assert manifest["calibration"]["rows"] == report["judged_rows"]
    assert report["parity_passed"] is True


def test_evaluate_writes_the_gate_input_stage_value_table_and_grid(chain):
    root, p = chain["root"], chain["params"]
    report_dir = root / p.evaluate.report_dir
    gate = json.loads((report_dir / "gate.json").read_text())
    assert gate["split"] == "holdout" and gate["challenger"]["macro_f1"] is not None
    assert gate["champion"] is None
    table = json.loads((report_dir / "stage_value.json").read_text())
    rows = [r["row"] for r in table["rows"]]
    # full fine-tuning is the method: its arm is the pipeline row, not a second "full" row
    assert rows == ["tfidf", "probe", "base", "pipeline", "lora", "deployed"]
    assert table["rows"][0]["what"] == "logistic regression on raw pixels"
    assert all(r["macro_f1"] is not None for r in table["rows"])
    assert "pretrain" in table["verdicts"] and "baseline" in table["verdicts"]
    assert "images" in (report_dir / "stage_value.md").read_text()
    assert (root / "plots" / "evaluate" / "confident_wrong.png").stat().st_size > 0
    assert chain["evaluate"]["stage_value"]["deployed"] == gate["challenger"]["macro_f1"]


def test_a_bad_image_stops_ingest_naming_it_and_nothing_is_written(tmp_path):
    from tasks.vision import ingest

    class_images(tmp_path / "data" / "source", per_class=6)
    bad = tmp_path / "data" / "source" / "bag" / "3.png"
    bad.write_bytes(bad.read_bytes()[:60])  # cut short
    p = VisionParams.model_validate(tiny_tree({"kind": "folder", "path": "data/source"}))
    with pytest.raises(DataValidationError) as info:
        ingest.run(p.ingest, root=tmp_path, out_dir=tmp_path / "data" / "raw")
    assert info.value.rule == "truncated_image" and "3.png" in str(info.value)
    assert not (tmp_path / "data" / "raw" / "labelled.parquet").exists()


def test_vision_params_file_loads_and_refuses_mistakes(tmp_path):
    p = load_vision_params(REPO / "vision" / "params.yaml")
    assert p.registry.model_name == "tunery-image-classifier"
    assert p.finetune.method == "full" and p.section("register") is p.registry
    # what tunery/stage.py logs as LoggedModels (tracking.log_models picks among these)
    assert p.model_outputs("pretrain") == {"encoder": p.pretrain.out_dir}
    assert p.model_outputs("evaluate") == {} and p.model_outputs("register") == {}
    tree = tiny_tree({"kind": "folder", "path": "x"})
    tree["finetune"]["lora"]["rank"] = 4
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=r"finetune\.lora\.rank: unknown key"):
        load_vision_params(tmp_path / "params.yaml")
    with pytest.raises(ConfigError, match="modality: image"):
        load_vision_params(REPO / "params.yaml")


# --------------------------------------------------------------------------- end to end
def fake_fashion_mnist(folder: Path, per_class: int = 40) -> Path:
    """The package's four idx files with learnable stand-in images (10 classes)."""
    folder.mkdir(parents=True)
    from tunery.data.fashion_mnist import FILES

    for image_file, label_file in FILES.values():
        n = per_class * 10
        labels = np.arange(n) % 10
        x = np.stack([pattern(int(y) % 3, i) for i, y in enumerate(labels)])
        x[:, 0, :] = (labels * 25)[:, None]  # the class in the top row: learnable by every arm
        for name, array in ((image_file, x), (label_file, labels)):
            header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
            (folder / name).write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))
    return folder


@pytest.mark.slow
def test_dvc_repro_of_vision_registers_a_champion(tmp_path):
    from tunery import tracking

    proj = tmp_path / "proj"
    for name in ("tunery", "tasks"):
        shutil.copytree(REPO / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    (proj / "vision").mkdir()
    shutil.copy(REPO / "vision" / "dvc.yaml", proj / "vision" / "dvc.yaml")
    # The committed incoming folder (a dependency of the ingest stage), as a clone has it.
    (proj / "vision" / "data" / "incoming").mkdir(parents=True)
    shutil.copy(REPO / "vision/data/incoming/README.md", proj / "vision/data/incoming/README.md")
    source = {
        "kind": "fashion_mnist",
        "path": str(fake_fashion_mnist(tmp_path / "fmnist")),
        "per_class": 24,
        "unlabelled_max": 100,
    }
    tree = tiny_tree(source)
    tree["evaluate"]["champion"] = "registry"
    (proj / "vision" / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    init_repo(proj)

    def repro() -> str:
        result = subprocess.run(
            [sys.executable, "-m", "dvc", "repro", "vision/dvc.yaml"],
            cwd=proj,
            env=tool_env(proj),
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout + result.stderr

    out = repro()
    stages = "ingest prepare corpus pretrain finetune export compress evaluate".split()
    for stage in stages:
        assert f"Running stage 'vision/dvc.yaml:{stage}'" in out
    register = json.loads((proj / "vision" / "metrics" / "register.json").read_text())
    assert register["registered"] and register["promoted"], register
    name = tree["registry"]["model_name"]
    assert tracking.alias_version(proj / "vision", name, "champion") == register["version"]
    assert not (proj / "vision" / ".dvc").exists()  # the pipeline folder never becomes a sub-repo

    # `tunery run` inside vision/: the same DVC stages; nothing changed, so only the always-run
    # register stage, which registers nothing new
    result = subprocess.run(
        [sys.executable, "-m", "tunery.cli", "run", "--json"],
        cwd=proj / "vision",
        env=tool_env(proj),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert doc["modality"] == "image" and doc["stages_ran"] == ["register"], doc["stages_ran"]
    assert doc["registry"]["registered"] is False
    assert doc["registry"]["version"] == register["version"]
    assert [r["row"] for r in doc["stage_value"]["rows"]][-1] == "deployed"
    assert not (proj / "vision" / ".dvc").exists()

    # the champion scores a folder of PNGs through `tunery predict` (its default model)
    import pandas as pd
    from PIL import Image

    pngs = proj / "incoming"
    (pngs / "sub").mkdir(parents=True)
    for i in range(3):
        Image.new("L", (28, 28), 40 * i).save(pngs / f"{i}.png")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(pngs / "sub" / "colour.png")  # converted
    result = subprocess.run(
        [sys.executable, "-m", "tunery.cli", "predict", str(pngs), "-o", str(proj / "scored.csv")],
        cwd=proj / "vision",
        env=tool_env(proj),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    scored = pd.read_csv(proj / "scored.csv")
    classes = {c.removeprefix("prob_") for c in scored.columns if c.startswith("prob_")}
    assert len(scored) == 4 and len(classes) == 10 and set(scored["prediction"]) <= classes
    assert sorted(scored["image"]) == ["0.png", "1.png", "2.png", "sub/colour.png"]
    assert scored["score"].between(0, 1).all()


def test_stage_value_table_of_a_full_fine_tune_shows_lora_as_the_reference():
    from tunery.vision import evaluation as vev

    def arm(f1: float, method: str) -> dict:
        return {"method": method, "holdout": {"macro_f1": f1, "accuracy": f1}, "params": 1000}

    arms = {
        "chosen": "pipeline",
        "pretrain_gate": {},
        "arms": {
            "probe": arm(0.78, "probe"),
            "base": arm(0.72, "full"),
            "pipeline": arm(0.80, "full"),
            "full": arm(0.80, "full"),
            "lora": arm(0.77, "lora"),
        },
    }
    deployed = {"variant": "fp32", "macro_f1": 0.80, "method": "full", "shipped_arm": "pipeline"}
    table = vev.table(arms, {"holdout": {"macro_f1": 0.76, "accuracy": 0.76}}, deployed)
    what = {r["row"]: r["what"] for r in table["rows"]}
    assert list(what) == ["tfidf", "probe", "base", "pipeline", "lora", "deployed"]  # full once
    assert what["lora"].startswith("LoRA")
    v = table["verdicts"]["finetune"]
    assert v.startswith("lora holdout macro-F1 0.7700 vs full fine-tuning 0.8000 (-0.0300)")
    assert "NOT within 0.005; full fine-tuning is the method and ships" in v
    assert what["pipeline"] == "full on this pipeline's SimCLR encoder"
    mae = vev.table(arms, None, deployed, "mae")
    assert {r["row"]: r["what"] for r in mae["rows"]}["probe"].startswith("MAE encoder frozen")
