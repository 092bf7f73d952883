"""Image sources, their validation rules, the bytes-hash splits and the Fashion-MNIST demo source.

Images are tiny PNGs made with PIL in tmp folders; each bad-input test crafts one bad file and
expects its named rule.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tunery.config import PrepareConfig
from tunery.data import fashion_mnist, images
from tunery.data.images import ImageChecks
from tunery.errors import DataValidationError

CFG = PrepareConfig.model_validate({"fractions": {"val": 0.1, "test": 0.1, "holdout": 0.1}})


def png(path: Path, seed: int, mode: str = "L", size: tuple[int, int] = (4, 4)) -> Path:
    """A distinct tiny image (its pixels follow from `seed`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def class_folder(root: Path, per_class: int = 3, classes=("cat", "dog"), start: int = 0) -> Path:
    for c, label in enumerate(classes):
        for i in range(start, start + per_class):
            png(root / label / f"{i}.png", seed=1000 * c + i)
    return root


def rule_of(call) -> DataValidationError:
    with pytest.raises(DataValidationError) as info:
        call()
    return info.value


# --------------------------------------------------------------------------- sources
def test_folder_source_reads_labels_hashes_and_keeps_pixels_on_disk(tmp_path):
    root = class_folder(tmp_path / "data")
    (root / "cat" / "notes.txt").write_text("not data")
    png(root / "dog" / "deeper" / "x.jpg", seed=99, mode="RGB")
    png(root / "dog" / "w.webp", seed=98, mode="RGB")
    df = images.read_folder(root)
    assert list(df["label"].value_counts().sort_index()) == [3, 5]
    assert {"image", "root", "label", "origin", "sha256", "row", "width", "mode"} <= set(df)
    assert "dog/deeper/x.jpg" in set(df["image"]) and (df["origin"] == "source:data").all()
    first = df.iloc[0]
    raw = (Path(first["root"]) / first["image"]).read_bytes()
    assert first["sha256"] == hashlib.sha256(raw).hexdigest()
    assert df.attrs["skipped"] == [str(root / "cat" / "notes.txt")]
    assert df["sha256"].str.len().eq(64).all() and df.memory_usage(deep=True).sum() < 10_000


def test_folder_layout_rules(tmp_path):
    assert rule_of(lambda: images.read_folder(tmp_path / "none")).rule == "missing_file"
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    assert rule_of(lambda: images.read_folder(tmp_path / "empty")).rule == "missing_file"
    root = class_folder(tmp_path / "data")
    png(root / "loose.png", 1)
    assert rule_of(lambda: images.read_folder(root)).rule == "no_label"


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_manifest_source_paths_relative_to_the_manifest(tmp_path, suffix):
    for i in range(4):
        png(tmp_path / "imgs" / f"{i}.png", seed=i)
    table = pd.DataFrame({"path": [f"imgs/{i}.png" for i in range(4)], "y": list("aabb")})
    manifest = tmp_path / f"m{suffix}"
    if suffix == ".csv":
        table.to_csv(manifest, index=False)
    elif suffix == ".jsonl":
        table.to_json(manifest, orient="records", lines=True)
    else:
        table.to_parquet(manifest)
    df = images.read_manifest(manifest, image_column="path", label_column="y")
    assert list(df["label"]) == list("aabb") and (df["root"] == str(tmp_path)).all()
    assert list(df["row"]) == [1, 2, 3, 4]


def test_unlabelled_folder_and_modes_converted(tmp_path):
    png(tmp_path / "u" / "a.png", 1, mode="RGBA")
    png(tmp_path / "u" / "b" / "c.png", 2, mode="P")
    png(tmp_path / "u" / "d.bmp", 3, mode="L")
    df = images.read_unlabelled(tmp_path / "u")
    assert "label" not in df and sorted(df["mode"]) == ["L", "P", "RGBA"]
    opened = {
        m: images.open_image(Path(r) / i).mode for m, r, i in df[["mode", "root", "image"]].values
    }
    assert opened == {"RGBA": "RGB", "P": "RGB", "L": "L"}


# --------------------------------------------------------------------------- per-image rules
def broken_folder(tmp_path: Path, name: str, writer) -> Path:
    """A valid two-class folder plus one bad file `cat/<name>` written by `writer(path)`."""
    root = class_folder(tmp_path / "data")
    writer(root / "cat" / name)
    return root


def truncated(path: Path) -> None:
    png(path, 7, size=(64, 64))
    path.write_bytes(path.read_bytes()[:-60])


def cut_pixels(path: Path) -> None:
    # Header and the start of the pixel data intact: open() and the header read succeed.
    png(path, 8, mode="RGB", size=(64, 64))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data).to_bytes(4, "big")
    return len(data).to_bytes(4, "big") + kind + data + crc


def zero_pixels(path: Path) -> None:
    # A well-formed PNG header declaring 0 x 0 pixels (PIL will not write one).
    ihdr = (0).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b""))


CASES = {
    "truncated_image": ("t.png", truncated),
    "truncated_image ": ("h.png", cut_pixels),
    "truncated_image  ": ("cut.jpg", lambda p: cut_pixels(p.with_suffix(".jpg"))),
    "not_image": ("text.png", lambda p: p.write_text("hello, I am text")),
    "zero_size": ("empty.png", lambda p: p.write_bytes(b"")),
    "zero_size ": ("zero.png", zero_pixels),
    "unsupported_mode": ("cmyk.jpg", lambda p: png(p, 3, mode="CMYK")),
    "unsupported_mode ": ("deep.png", lambda p: png(p, 3, mode="I;16")),
}


@pytest.mark.parametrize("rule", list(CASES))
def test_each_bad_image_fails_with_its_rule_naming_the_file(tmp_path, rule):
    name, writer = CASES[rule]
    root = broken_folder(tmp_path, name, writer)
    err = rule_of(lambda: images.read_folder(root))
    assert err.rule == rule.strip() and err.file == str(root / "cat" / name)
    if name == "zero.png":
        assert "0x0" in err.detail
    if err.rule == "unsupported_mode":
        assert "RGBA→RGB" in err.detail  # says which modes are accepted


def test_unreadable_file(tmp_path):
    png(tmp_path / "0.png", 0)
    (tmp_path / "folder.png").mkdir()  # read_bytes fails even for root
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,label\n0.png,a\nfolder.png,b\n")
    err = rule_of(lambda: images.read_manifest(manifest))
    assert (err.rule, err.rows) == ("unreadable_file", [2])
    if os.geteuid() != 0:  # root reads any file whatever its mode
        (tmp_path / "0.png").chmod(0)
        assert rule_of(lambda: images.read_manifest(manifest)).rows == [1, 2]


def test_decompression_bomb_is_refused(tmp_path):
    root = broken_folder(tmp_path, "big.png", lambda p: png(p, 1, size=(300, 300)))
    err = rule_of(lambda: images.read_folder(root, ImageChecks(max_pixels=10_000)))
    assert err.rule == "image_too_large"


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    outside = png(tmp_path / "elsewhere" / "secret.png", 42)
    root = class_folder(tmp_path / "data")
    (root / "cat" / "link.png").symlink_to(outside)
    err = rule_of(lambda: images.read_folder(root))
    assert err.rule == "outside_root" and "link.png" in err.file
    (root / "dog" / "inner.png").symlink_to(root / "cat" / "0.png")  # inside: fine
    (root / "cat" / "link.png").unlink()
    assert len(images.read_folder(root)) == 7


def test_manifest_dotdot_and_absolute_paths_are_refused_with_their_rows(tmp_path):
    png(tmp_path / "outside.png", 1)
    for i in range(3):
        png(tmp_path / "set" / f"{i}.png", seed=10 + i)
    rows = ["0.png", "../outside.png", "1.png", str(tmp_path / "outside.png"), "2.png"]
    manifest = tmp_path / "set" / "m.csv"
    pd.DataFrame({"image": rows, "label": list("abab" + "a")}).to_csv(manifest, index=False)
    err = rule_of(lambda: images.read_manifest(manifest))
    assert (err.rule, err.file, err.rows) == ("outside_root", str(manifest), [2, 4])


def test_manifest_collects_rows_of_bad_images(tmp_path):
    root = tmp_path / "set"
    for i in range(4):
        png(root / f"{i}.png", seed=i)
    (root / "1.png").write_text("text")
    (root / "3.png").write_text("text")
    manifest = root / "m.jsonl"
    pd.DataFrame({"image": [f"{i}.png" for i in range(4)], "label": list("abab")}).to_json(
        manifest, orient="records", lines=True
    )
    err = rule_of(lambda: images.read_manifest(manifest))
    assert (err.rule, err.rows) == ("not_image", [2, 4]) and "rows 2, 4" in str(err)


def test_manifest_column_and_null_rules(tmp_path):
    png(tmp_path / "0.png", 0)
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,label\n0.png,a\n")
    assert rule_of(lambda: images.read_manifest(manifest)).rule == "missing_column"
    manifest.write_text("image,label\n0.png,a\n,b\n0.png,\n")
    err = rule_of(lambda: images.read_manifest(manifest))
    assert (err.rule, err.rows) == ("null_path", [2])
    manifest.write_text("image,label\n0.png,a\n0.png,\n")
    assert rule_of(lambda: images.read_manifest(manifest)).rows == [2]
    manifest.write_text("image,label\nmissing.png,a\n")
    assert rule_of(lambda: images.read_manifest(manifest)).rule == "missing_file"
    manifest.write_text("image,label\nnotes.gif,a\n")
    assert rule_of(lambda: images.read_manifest(manifest)).rule == "file_type"


# --------------------------------------------------------------------------- dataset rules
def test_unknown_label_names_its_rows(tmp_path):
    for i in range(3):
        png(tmp_path / f"{i}.png", i)
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"image": ["0.png", "1.png", "2.png"], "label": ["cat", "cow", "dog"]}).to_csv(
        manifest, index=False
    )
    err = rule_of(lambda: images.read_manifest(manifest, ImageChecks(labels=["cat", "dog"])))
    assert (err.rule, err.rows) == ("unknown_label", [2]) and "cow" in err.detail
    root = class_folder(tmp_path / "f", classes=("cat", "emu"))
    err = rule_of(lambda: images.read_folder(root, ImageChecks(labels=["cat", "dog"])))
    assert (err.rule, err.file) == ("unknown_label", str(root / "emu"))


def test_too_few_examples_and_classes(tmp_path):
    df = images.read_folder(class_folder(tmp_path / "d", per_class=2))
    err = rule_of(lambda: images.check_classes(df, ImageChecks(min_per_class=3), "d"))
    assert err.rule == "too_few_examples" and "'cat': 2" in err.detail
    one = df[df["label"] == "cat"]
    assert rule_of(lambda: images.check_classes(one, ImageChecks(), "d")).rule == "too_few_classes"
    images.check_classes(df, ImageChecks(min_per_class=2), "d")


def test_duplicates_dropped_and_conflicting_labels_refused(tmp_path):
    root = class_folder(tmp_path / "d")
    (root / "cat" / "copy.png").write_bytes((root / "cat" / "0.png").read_bytes())
    kept, stats = images.deduplicate(images.read_folder(root), ImageChecks())
    assert stats == {"duplicates_dropped": 1, "conflicts_dropped": 0} and len(kept) == 6
    (root / "dog" / "clash.png").write_bytes((root / "cat" / "1.png").read_bytes())
    df = images.read_folder(root)
    err = rule_of(lambda: images.deduplicate(df, ImageChecks()))
    assert err.rule == "conflicting_labels" and err.file == str(root / "cat" / "1.png")
    assert "'dog/clash.png' labelled 'dog'" in err.detail
    kept, stats = images.deduplicate(df, ImageChecks(conflicts="drop"))
    assert stats["conflicts_dropped"] == 2 and "cat/1.png" not in set(kept["image"])


def test_combine_keeps_the_first_copy_and_checks_classes(tmp_path):
    source = images.read_folder(class_folder(tmp_path / "src"))
    drop = tmp_path / "drop"
    png(drop / "dog" / "new.png", seed=5000)
    (drop / "cat").mkdir()
    (drop / "cat" / "again.png").write_bytes((tmp_path / "src" / "cat" / "0.png").read_bytes())
    incoming = images.read_folder(drop, origin="incoming:drop")
    data, stats = images.combine([source, incoming], ImageChecks(), "src")
    assert stats["duplicates_dropped"] == 1 and len(data) == 7
    assert data.loc[data["sha256"] == source["sha256"][0], "origin"].tolist() == ["source:src"]
    err = rule_of(lambda: images.combine([incoming], ImageChecks(min_per_class=2), "drop"))
    assert err.rule == "too_few_examples"


# --------------------------------------------------------------------------- splits
def test_splits_stable_under_appends_and_duplicates_share_a_split(tmp_path):
    old = images.read_folder(class_folder(tmp_path / "old", per_class=60))
    new = images.read_folder(
        class_folder(tmp_path / "new", per_class=30, start=60), origin="incoming:new"
    )
    before = images.assign_splits(old, CFG)
    after = images.assign_splits(pd.concat([new, old], ignore_index=True), CFG)
    assert (after.iloc[len(new) :].reset_index(drop=True) == before).all()
    share = before.value_counts(normalize=True)
    assert 0.55 < share["train"] < 0.85 and set(share.index) == {"train", "val", "test", "holdout"}
    copies = old.assign(origin="incoming:copies", image="elsewhere/" + old["image"])
    both = pd.concat([old, copies], ignore_index=True)
    by_hash = images.assign_splits(both.assign(origin="source:x"), CFG).groupby(both["sha256"])
    assert (by_hash.nunique() == 1).all()


def test_frozen_holdout_sends_later_images_to_test(tmp_path):
    new = images.read_folder(class_folder(tmp_path / "d", per_class=60), origin="incoming:d")
    frozen = images.assign_splits(new, CFG)
    assert "holdout" not in set(frozen)
    unfrozen = images.assign_splits(new, CFG.model_copy(update={"freeze_holdout": False}))
    assert (unfrozen == "holdout").any()
    assert (frozen[unfrozen == "holdout"] == "test").all()
    assert (frozen[unfrozen != "holdout"] == unfrozen[unfrozen != "holdout"]).all()


# --------------------------------------------------------------------------- Fashion-MNIST
def idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture
def fake_fmnist(tmp_path: Path) -> Path:
    """A 40-image stand-in with the package's file names (4 per class)."""
    rng = np.random.default_rng(0)
    for image_file, label_file in fashion_mnist.FILES.values():
        idx(tmp_path / image_file, rng.integers(0, 256, (40, 28, 28)))
        idx(tmp_path / label_file, np.arange(40) % 10)
    return tmp_path


def test_idx_reader_and_its_errors(fake_fmnist):
    x, y = fashion_mnist.load("train", fake_fmnist)
    assert x.shape == (40, 28, 28) and x.dtype == np.uint8 and list(y[:3]) == [0, 1, 2]
    raw = gzip.decompress((fake_fmnist / "train-labels-idx1-ubyte.gz").read_bytes())
    (fake_fmnist / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw[:-1]))
    assert rule_of(lambda: fashion_mnist.load("train", fake_fmnist)).rule == "idx_format"
    err = rule_of(lambda: fashion_mnist.load("test", fake_fmnist / "nowhere"))
    assert err.rule == "missing_file" and "apt-get install dataset-fashion-mnist" in str(err)


def test_materialised_subset_reads_back_through_the_manifest_source(fake_fmnist, tmp_path):
    x, y = fashion_mnist.load("train", fake_fmnist)
    chosen = fashion_mnist.labelled_subset(y, per_class=2)
    later = fashion_mnist.labelled_subset(y, per_class=2, offset=2)
    assert len(chosen) == 20 and not set(chosen) & set(later)
    manifest = fashion_mnist.materialise(tmp_path / "fm", x, chosen, labels=y)
    df = images.read_manifest(manifest, ImageChecks(labels=list(fashion_mnist.CLASSES)))
    assert set(df["label"]) == set(fashion_mnist.CLASSES) and (df["mode"] == "L").all()
    back = np.asarray(images.open_image(Path(df["root"][0]) / df["image"][0]))
    assert (back == x[chosen[0]]).all()
    again = fashion_mnist.materialise(tmp_path / "fm2", x, chosen, labels=y)
    assert list(images.read_manifest(again)["sha256"]) == list(df["sha256"])  # byte-stable
    pool = fashion_mnist.unlabelled_pool(len(x), chosen)
    folder = fashion_mnist.materialise(tmp_path / "pool", x, pool)
    assert len(images.read_unlabelled(folder)) == 20


@pytest.mark.skipif(
    not (fashion_mnist.DEFAULT_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed (make fashion-mnist)",
)
def test_installed_fashion_mnist(tmp_path):
    x, y = fashion_mnist.load("train")
    xt, yt = fashion_mnist.load("test")
    assert x.shape == (60000, 28, 28) and xt.shape == (10000, 28, 28)
    assert np.bincount(y).tolist() == [6000] * 10 and np.bincount(yt).tolist() == [1000] * 10
    chosen = fashion_mnist.labelled_subset(y, per_class=5)
    manifest = fashion_mnist.materialise(tmp_path / "fm", x, chosen, labels=y)
    df, _ = images.combine([images.read_manifest(manifest)], ImageChecks(), manifest)
    assert df["label"].value_counts().tolist() == [5] * 10
    assert set(images.assign_splits(df, CFG)) <= {"train", "val", "test", "holdout"}
