"""Retraining the image pipeline: drops in the landing folder taken in (checked, moved, versioned),
a bad drop refused with nothing moved, drift on the SimCLR encoder's image embeddings, the
Fashion-MNIST demo drop (CPU, seconds; tiny generated images). The slow test runs `tunery retrain`
inside a copy of vision/ end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from tests.conftest import init_repo, tool_env
from tests.test_vision_pipeline import (
    CLASSES,
    class_images,
    fake_fashion_mnist,
    pattern,
    tiny_tree,
)
from tunery import modality
from tunery.errors import DataValidationError
from tunery.runner import landing
from tunery.vision.params import VisionParams

REPO = Path(__file__).resolve().parents[1]


def project(root: Path, *, repo: bool = False) -> VisionParams:
    """A tiny image project in `root` (a folder-per-class source of three classes)."""
    class_images(root / "data" / "source", per_class=12)
    tree = tiny_tree({"kind": "folder", "path": "data/source"})
    tree["retrain"] = {"landing": "data/landing", "push": repo}
    (root / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    if repo:
        init_repo(root)
    return modality.load_params(root / "params.yaml")


def drop(folder: Path, per_class: int = 6, start: int = 1000) -> Path:
    """A folder-per-class drop of images the source does not have (other seeds)."""
    for c, label in enumerate(CLASSES):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(pattern(c, start + 100 * c + i)).save(folder / label / f"n{i}.png")
    return folder


def test_image_params_pick_the_image_intake(tmp_path):
    p = project(tmp_path)
    assert isinstance(p, VisionParams) and modality.is_image(p)
    assert modality.intake_of(p).name == "image"
    assert isinstance(modality.intake_of(p), modality.Intake)
    text = modality.load_params(REPO / "params.yaml")
    assert modality.intake_of(text).name == "text"


def test_a_good_drop_is_taken_in_versioned_and_joins_the_next_ingest(tmp_path):
    from tasks.vision import ingest

    p = project(tmp_path, repo=True)
    landed = drop(tmp_path / "data" / "landing" / "week-01")
    assert landing.landing_files(tmp_path, p) == [landed]
    new = landing.check_landed(tmp_path, p, [landed])
    assert len(new) == 18 and all(Path(f).is_file() for f in new)

    added = landing.take_in(tmp_path, p, [landed])
    dest = tmp_path / "data" / "incoming" / "week-01"
    assert added == [dest] and not landed.exists()
    assert sorted(f.name for f in (dest / "bag").iterdir()) == [f"n{i}.png" for i in range(6)]
    assert (tmp_path / "data" / "incoming" / "week-01.dvc").is_file()  # versioned by DVC
    assert list((tmp_path.parent / "remote").rglob("*"))  # and pushed to the default remote

    metrics = ingest.run(p.ingest, root=tmp_path, out_dir=tmp_path / "data" / "raw")
    data = pd.read_parquet(tmp_path / "data" / "raw" / "labelled.parquet")
    assert metrics["rows"] == 36 + 18 and metrics["incoming_drops"] == 1
    new_rows = data[data["origin"] == "incoming:week-01"]
    assert len(new_rows) == 18 and set(new_rows["root"]) == {"data/incoming/week-01"}
    assert "bag/n0.png" in set(new_rows["image"])


def test_a_corrupt_image_stops_the_intake_naming_it_and_nothing_moves(tmp_path):
    p = project(tmp_path)
    good = drop(tmp_path / "data" / "landing" / "a-good")
    bad = drop(tmp_path / "data" / "landing" / "b-bad", start=5000)
    broken = bad / "boot" / "n2.png"
    broken.write_bytes(broken.read_bytes()[:60])  # cut short
    before = sorted(str(f) for f in (tmp_path / "data").rglob("*"))
    with pytest.raises(DataValidationError) as info:
        landing.take_in(tmp_path, p, landing.landing_files(tmp_path, p))
    assert info.value.rule == "truncated_image" and "n2.png" in str(info.value)
    assert sorted(str(f) for f in (tmp_path / "data").rglob("*")) == before  # nothing moved
    assert good.is_dir() and not (tmp_path / "data" / "incoming").exists()


def test_bad_drops_are_refused_by_the_ingest_rules(tmp_path):
    p = project(tmp_path)
    land = tmp_path / "data" / "landing"
    # a manifest drop with a class the data does not have
    (land / "m" / "img").mkdir(parents=True)
    Image.fromarray(pattern(0, 9000)).save(land / "m" / "img" / "x.png")
    Image.fromarray(pattern(1, 9001)).save(land / "m" / "img" / "y.png")
    pd.DataFrame({"image": ["img/x.png", "img/y.png"], "label": ["bag", "hat"]}).to_csv(
        land / "m" / "manifest.csv", index=False
    )
    with pytest.raises(DataValidationError) as info:
        landing.check_landed(tmp_path, p, [land / "m"])
    assert info.value.rule == "unknown_label" and info.value.rows == [2]
    assert "'hat'" in str(info.value) and "manifest" not in info.value.file  # the drop is named
    # not an image (a text file with a .png name)
    (land / "t" / "bag").mkdir(parents=True)
    (land / "t" / "bag" / "fake.png").write_text("hello")
    with pytest.raises(DataValidationError, match=r"fake\.png.*\[not_image\]"):
        landing.check_landed(tmp_path, p, [land / "t"])
    # a loose file is not a drop; a drop of images the data already has brings nothing new
    (land / "loose.png").write_bytes(b"x")
    with pytest.raises(DataValidationError, match=r"loose\.png: \[file_type\] a drop is a folder"):
        landing.check_landed(tmp_path, p, [land / "loose.png"])
    shutil.copytree(tmp_path / "data" / "source", land / "again")
    with pytest.raises(DataValidationError, match=r"again: \[nothing_new\]"):
        landing.check_landed(tmp_path, p, [land / "again"])


def test_drift_is_measured_on_the_simclr_encoders_image_embeddings(tmp_path):
    from tasks.vision import ingest, prepare
    from tunery.vision import pretraining

    p = project(tmp_path)
    ingest.run(p.ingest, root=tmp_path, out_dir=tmp_path / p.ingest.out_dir)
    prepare.run(
        p.prepare, raw_dir=tmp_path / p.ingest.out_dir, out_dir=tmp_path / p.prepare.out_dir
    )
    assert landing.measure_drift(tmp_path, p, []) is None  # no encoder yet: not measured
    # an untrained SimCLR ViT of the configured size, saved where the pretrain stage puts it
    pretraining.build(p.pretrain, p.processor, tmp_path).save_pretrained(
        tmp_path / p.pretrain.out_dir / "model"
    )
    land = tmp_path / "data" / "landing"
    near = landing.check_landed(tmp_path, p, [drop(land / "near", per_class=8)])
    far_dir = land / "far" / "bag"
    far_dir.mkdir(parents=True)
    for i in range(24):  # another kind of image: bright vertical stripes
        x = np.random.default_rng(i).integers(0, 60, (28, 28)).astype(np.uint8)
        x[:, (i % 4) * 7 : (i % 4) * 7 + 4] = 255
        Image.fromarray(x).save(far_dir / f"{i}.png")
    far = landing.check_landed(tmp_path, p, [land / "far"])
    near_d = landing.measure_drift(tmp_path, p, near)
    far_d = landing.measure_drift(tmp_path, p, far)
    assert near_d["new_rows"] == 24 and near_d["reference_rows"] > 2
    assert near_d["encoder"].endswith("models/encoder/model")
    assert far_d["auc"] > 0.95 and far_d["auc"] > near_d["auc"] + 0.15, (near_d, far_d)
    assert near_d["triggered"] and near_d["min_auc"] is None
    strict = p.model_copy(
        update={
            "retrain": p.retrain.model_copy(
                update={"drift": p.retrain.drift.model_copy(update={"min_auc": 0.99})}
            )
        }
    )
    assert not landing.measure_drift(tmp_path, strict, near)["triggered"]


def test_demo_drops_are_fashion_mnist_images_the_pipeline_has_not_used(tmp_path):
    from tunery.data import fashion_mnist as fm

    fmnist = fake_fashion_mnist(tmp_path / "fmnist", per_class=40)
    source = {"kind": "fashion_mnist", "path": str(fmnist), "per_class": 10, "unlabelled_max": 100}
    tree = tiny_tree(source)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree))
    p = modality.load_params(tmp_path / "params.yaml")
    first = landing.release_demo_shard(tmp_path, p, 5)
    second = landing.release_demo_shard(tmp_path, p, 5)
    assert [first.name, second.name] == ["fashion-mnist-shard-000", "fashion-mnist-shard-001"]
    chosen = fm.labelled_subset(fm.load("train", fmnist)[1], 10)
    used = set(chosen.tolist()) | set(fm.unlabelled_pool(400, chosen, limit=100).tolist())
    names = []
    for shard in (first, second):
        manifest = pd.read_csv(shard / "manifest.csv")
        assert len(manifest) == 50 and manifest["label"].value_counts().eq(5).all()
        names += [int(Path(i).stem.split("-")[1]) for i in manifest["image"]]
    assert len(set(names)) == 100 and not set(names) & used
    assert len(landing.check_landed(tmp_path, p, [first, second])) == 100  # valid drops
    with pytest.raises(Exception, match="too few unused images"):
        landing.release_demo_shard(tmp_path, p, 30)


def test_stale_stages_are_the_projects_own_and_always_changed_ones_do_not_count(tmp_path):
    """Two pipeline folders in one DVC repository (the text root and vision/): each retrain looks
    at its own dvc.yaml only, and an `always_changed` stage (vision's register) is not staleness."""
    init_repo(tmp_path)
    (tmp_path / "vision").mkdir()
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "vision" / "b.txt").write_text("b")
    (tmp_path / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {"one": {"cmd": "cp a.txt o", "deps": ["a.txt"], "outs": ["o"]}}})
    )
    two = {"cmd": "cp b.txt o", "deps": ["b.txt"], "outs": ["o"]}
    register = {"cmd": "true", "always_changed": True}
    (tmp_path / "vision" / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {"two": two, "register": register}})
    )
    assert landing.stale_stages(tmp_path) == ["one"]
    assert landing.stale_stages(tmp_path / "vision") == ["two"]


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_tunery_retrain_inside_vision_takes_in_a_demo_drop_and_gates(tmp_path):
    from tunery import metrics_files, tracking

    proj = tmp_path / "proj"
    for name in ("tunery", "tasks", "flows"):
        shutil.copytree(REPO / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):  # the text pipeline beside it, in the same DVC repo
        shutil.copy(REPO / name, proj / name)
    vision = proj / "vision"
    shutil.copytree(
        REPO / "vision",
        vision,
        ignore=shutil.ignore_patterns(
            "metrics",
            "reports",
            "models",
            "mlflow.db*",
            "mlartifacts",
            "checkpoints",
            "plots",
            "dvc.lock",
            ".prefect",
            ".cache",
            "raw",
            "prepared",
        ),
    )
    for leftover in ("landing", "incoming"):  # only their committed files
        for p in (vision / "data" / leftover).iterdir():
            if p.name not in (".gitignore", "README.md"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    source = {
        "kind": "fashion_mnist",
        "path": str(fake_fashion_mnist(tmp_path / "fmnist", per_class=60)),
        "per_class": 24,
        "unlabelled_max": 100,
    }
    tree = tiny_tree(source)
    tree["evaluate"]["champion"] = "registry"
    tree["retrain"] = yaml.safe_load((REPO / "vision" / "params.yaml").read_text())["retrain"]
    # the drop's ~16 train images are ~8 % of this tiny pool (~200 images): under 20 % SimCLR's
    # snapshot stays, so the retrain fine-tunes on the new labels from the same encoder
    tree["corpus"]["change_threshold"] = 0.2
    (vision / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    init_repo(proj)

    def tunery(*argv: str, ok: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "tunery.cli", *argv],
            cwd=vision,
            env=tool_env(proj),
            capture_output=True,
            text=True,
        )
        assert (result.returncode == 0) == ok, result.stdout + result.stderr
        return result

    first = json.loads(tunery("run", "--json").stdout)
    assert first["registry"]["promoted"], first["registry"]
    assert {"corpus", "pretrain"} <= set(first["stages_ran"])
    assert metrics_files.read(vision, "corpus")["reason"] == "no snapshot yet"
    name = tree["registry"]["model_name"]

    # a corrupt image in a drop: the retrain stops naming it, and nothing moves
    bad = vision / "data" / "landing" / "bad"
    drop(bad)
    broken = bad / "bag" / "n1.png"
    broken.write_bytes(broken.read_bytes()[:60])  # cut short
    result = tunery("retrain", ok=False)
    assert "n1.png" in result.stderr and "[truncated_image]" in result.stderr, result.stderr
    assert bad.is_dir() and not list((vision / "data" / "incoming").glob("bad*"))
    shutil.rmtree(bad)

    out = tunery("demo-shard", "--per-class", "4").stdout
    assert "data/landing/fashion-mnist-shard-000" in out
    doc = json.loads(tunery("retrain", "--json").stdout)
    assert doc["status"] == "retrained" and doc["modality"] == "image"
    assert [Path(a).name for a in doc["added"]] == ["fashion-mnist-shard-000"]
    assert 0.0 <= doc["drift"]["auc"] <= 1.0 and doc["drift"]["new_rows"] == 40
    assert {"ingest", "prepare", "corpus", "finetune", "evaluate", "register"} <= set(
        doc["stages_ran"]
    )
    corpus = metrics_files.read(vision, "corpus")
    assert "pretrain" not in doc["stages_ran"] and not corpus["moved"], corpus
    assert 0 < corpus["change_share"] <= 0.2 and "<= threshold 20.0%" in corpus["reason"]
    assert (vision / "data" / "incoming" / "fashion-mnist-shard-000.dvc").is_file()
    assert not list((vision / "data" / "landing").iterdir()) or [
        p.name for p in (vision / "data" / "landing").iterdir()
    ] == [".gitignore"]
    ingest = json.loads((vision / "metrics" / "ingest.json").read_text())
    assert ingest["rows"] == 240 + 40
    register = doc["registry"]
    assert register["summary"] and "version" in register
    champion = tracking.alias_version(vision, name, "champion")
    assert champion == (
        register["version"] if register["promoted"] else first["registry"]["version"]
    )
    assert not (vision / ".dvc").exists()

    # nothing new and nothing stale (the always-run register stage and the text pipeline's
    # stages in the same DVC repository aside): nothing to do
    again = json.loads(tunery("retrain", "--json").stdout)
    assert again["status"] == "nothing to do", again
