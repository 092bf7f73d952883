"""The image pipeline's corpus stage: SimCLR's pool snapshot moves only when the policy says so,
measured on image content hashes (CPU, milliseconds; the image files are empty stand-ins: the
stage reads tables and checks that files exist, it decodes nothing)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tasks.vision.corpus import run
from tunery.config import CorpusConfig
from tunery.errors import DataValidationError
from tunery.vision import corpus


def table(root: Path, names: list[str], label: str | None = None) -> pd.DataFrame:
    """Rows naming image files under `root/imgs` (created), keyed by a fake content hash."""
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / "imgs" / name).touch()
    df = pd.DataFrame({"image": names, "root": "imgs", "sha256": [f"h-{n}" for n in names]})
    if label is not None:
        df["label"], df["split"] = label, "train"
    return df


def inputs(root: Path, unlabelled: list[str], train: list[str], val: list[str]) -> tuple:
    """ingest's and prepare's outputs as the corpus stage reads them; (raw_dir, data_dir)."""
    raw, data = root / "raw", root / "prepared"
    raw.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    table(root, unlabelled).to_parquet(raw / "unlabelled.parquet")
    table(root, train, "a").to_parquet(data / "train.parquet")
    table(root, val, "a").to_parquet(data / "val.parquet")
    (data / "labels.json").write_text(json.dumps(["a"]))
    return raw, data


POOL = [f"u{i}.png" for i in range(90)]
TRAIN = [f"t{i}.png" for i in range(10)]  # the pool: 100 images
VAL = ["v0.png", "v1.png"]


def stage(root: Path, cfg: CorpusConfig, raw: Path, data: Path) -> dict:
    return run(cfg, root=root, raw_dir=raw, data_dir=data, out_dir=root / "corpus")


@pytest.fixture
def first(tmp_path):
    raw, data = inputs(tmp_path, POOL, TRAIN, VAL)
    got = stage(tmp_path, CorpusConfig(), raw, data)
    assert got["moved"] and got["reason"] == "no snapshot yet" and got["images"] == 100
    assert sorted(p.name for p in (tmp_path / "corpus").iterdir()) == sorted(corpus.FILES)
    return tmp_path


def snapshot_train(root: Path) -> list[str]:
    return pd.read_parquet(root / "corpus" / "train.parquet")["image"].tolist()


@pytest.mark.parametrize(
    ("policy", "new_train", "moved"),
    [
        ("on_corpus_change", 3, False),  # a small labelled drop: 3 % of the pool <= 5 %
        ("on_corpus_change", 6, True),
        ("always", 1, True),
        ("always", 0, False),  # no image added or removed: nothing to re-run
        ("never", 50, False),
    ],
)
def test_policy_on_the_pools_content_hashes(first, policy, new_train, moved):
    train = TRAIN + [f"n{i}.png" for i in range(new_train)]
    raw, data = inputs(first, POOL, train, VAL)
    cfg = CorpusConfig(pretrain_policy=policy, change_threshold=0.05)
    got = stage(first, cfg, raw, data)
    assert got["moved"] is moved
    assert got["change_share"] == pytest.approx(new_train / 100)
    assert snapshot_train(first) == (train if moved else TRAIN)
    if policy == "on_corpus_change":
        cmp = ">" if moved else "<="
        assert got["reason"] == f"corpus changed by {new_train / 100:.1%} {cmp} threshold 5.0%"


def test_an_image_moving_from_the_pool_to_train_or_a_new_val_is_no_change(first):
    """The pool is unlabelled + train by bytes: labelling a pool image, or new val images (the
    probe's split, not trained on), change no key."""
    raw, data = inputs(first, POOL[1:], [*TRAIN, POOL[0]], [*VAL, "v2.png"])
    got = stage(first, CorpusConfig(pretrain_policy="always"), raw, data)
    assert not got["moved"] and got["change_share"] == 0.0


def test_a_kept_snapshot_whose_images_are_gone_moves(first):
    """A withdrawn drop's images are deleted: a snapshot naming them could not be trained on again."""
    (first / "imgs" / "t3.png").unlink()
    raw, data = inputs(first, POOL, [t for t in TRAIN if t != "t3.png"], VAL)
    got = stage(first, CorpusConfig(pretrain_policy="never"), raw, data)
    assert got["moved"] and "1 of the snapshot's images are gone" in got["reason"]
    assert "t3.png" not in snapshot_train(first)


def test_missing_input_is_a_named_error(tmp_path):
    raw, data = inputs(tmp_path, POOL, TRAIN, VAL)
    (data / "labels.json").unlink()
    with pytest.raises(DataValidationError, match=r"labels.json.*\[missing_file\]"):
        stage(tmp_path, CorpusConfig(), raw, data)
    assert not (tmp_path / "corpus").exists()


def test_pool_frame_reads_the_snapshot_as_pretrain_does(first):
    pool = corpus.pool_frame(first / "corpus", first / "corpus")
    assert len(pool) == 100 and pool["sha256"].is_unique
