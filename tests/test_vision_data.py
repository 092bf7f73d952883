"""`tunery data add` / `tunery data withdraw` in the image pipeline folder: a drop folder checked
with the ingest's image rules and versioned, refusals that say what to do instead, a withdrawal by
name recorded like text's (tiny PNGs made here, CPU, seconds)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from tests.test_vision_pipeline import pattern
from tests.test_vision_retrain import drop, project
from tunery import cli, metrics_files


def tunery(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        cli.main(list(argv))
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


@pytest.fixture
def proj(tmp_path, monkeypatch):
    """A tiny image project (three classes, a DVC repository) as the cwd; returns its params."""
    root = tmp_path / "proj"
    params = project(root, repo=True)
    (root / "dvc.yaml").write_text("stages: {}\n")  # the project markers: params.yaml + dvc.yaml
    monkeypatch.chdir(root)
    return root, params


def ingest(root: Path, params) -> pd.DataFrame:
    """The ingest stage's run and its metrics file (what a withdrawal reads the data version from)."""
    from tasks.vision import ingest as stage

    metrics_files.write(
        root, "ingest", stage.run(params.ingest, root=root, out_dir=root / "data/raw")
    )
    return pd.read_parquet(root / params.ingest.out_dir / "labelled.parquet")


def test_a_drop_folder_is_checked_copied_versioned_and_ingested(proj, capsys):
    root, params = proj
    source = drop(root.parent / "week-01")  # a folder per class, outside the project
    code, out, err = tunery(capsys, "data", "add", str(source))
    assert code == 0, err
    dest = root / "data" / "incoming" / "week-01"
    assert "data/incoming/week-01" in out and source.is_dir()  # copied; the source stays
    assert (root / "data" / "incoming" / "week-01.dvc").is_file()
    assert sorted(p.name for p in (dest / "shirt").iterdir()) == [f"n{i}.png" for i in range(6)]
    rows = ingest(root, params)
    assert (rows["origin"] == "incoming:week-01").sum() == 18

    code, _, err = tunery(capsys, "data", "add", str(source))  # the same drop again
    assert code != 0 and "already taken in" in err

    landed = drop(root / "data" / "landing" / "week-02", start=4000)  # from the landing folder:
    assert tunery(capsys, "data", "add", str(landed))[0] == 0  # taken out of it, as a retrain does
    assert not landed.exists() and (root / "data" / "incoming" / "week-02").is_dir()


def test_a_manifest_drop_is_a_folder_and_a_lone_manifest_is_refused(proj, capsys):
    root, _ = proj
    folder = root.parent / "m"
    (folder / "img").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(pattern(i % 3, 7000 + i)).save(folder / "img" / f"{i}.png")
    names = [f"img/{i}.png" for i in range(6)]
    labels = ["bag", "boot", "shirt"] * 2
    pd.DataFrame({"image": names, "label": labels}).to_csv(folder / "list.csv", index=False)

    code, _, err = tunery(capsys, "data", "add", str(folder / "list.csv"))
    assert code != 0 and "[file_type] an image drop is a folder" in err, err
    assert f"tunery data add {folder}" in err  # what to do instead
    assert not (root / "data" / "incoming").exists()

    code, _, err = tunery(capsys, "data", "add", str(folder))
    assert code == 0, err
    assert (root / "data" / "incoming" / "m" / "list.csv").is_file()


def test_a_bad_image_or_a_text_only_flag_stops_the_add_and_nothing_moves(proj, capsys):
    root, _ = proj
    bad = drop(root.parent / "bad")
    broken = bad / "boot" / "n3.png"
    broken.write_bytes(broken.read_bytes()[:60])
    code, _, err = tunery(capsys, "data", "add", str(bad))
    assert code == 3 and "n3.png" in err and "[truncated_image]" in err, err
    assert not (root / "data" / "incoming").exists()

    good = drop(root.parent / "good", start=3000)
    code, _, err = tunery(capsys, "data", "add", str(good), "--allow-new-labels")
    assert code != 0 and "ingest.checks.labels" in err, err
    assert not (root / "data" / "incoming").exists()


def test_a_drop_is_withdrawn_by_name_and_recorded(proj, capsys):
    root, params = proj
    assert tunery(capsys, "data", "add", str(drop(root.parent / "week-01")))[0] == 0
    with_it = ingest(root, params)
    version = metrics_files.read(root, "ingest")["data_version"]

    code, _, err = tunery(capsys, "data", "withdraw", "nope", "--reason", "x")
    assert code != 0 and "no such incoming drop" in err and "week-01" in err  # lists what is there
    code, out, err = tunery(capsys, "data", "withdraw", "week-01", "--reason", "mislabelled shirts")
    assert code == 0, err
    assert "18 images" in out and version in out
    incoming = root / "data" / "incoming"
    assert not (incoming / "week-01").exists() and not (incoming / "week-01.dvc").exists()
    record = json.loads((root / "data" / "withdrawn.jsonl").read_text().splitlines()[-1])
    assert record["file"] == "week-01" and record["rows"] == 18
    assert record["in_data_version"] == version and record["reason"] == "mislabelled shirts"
    assert len(record["md5"]) == 32
    without = ingest(root, params)
    assert len(without) == len(with_it) - 18 and "incoming:week-01" not in set(without["origin"])


def test_the_drop_md5_follows_its_content(tmp_path):
    from tunery.data.intake import _describe

    a = drop(tmp_path / "a")
    shutil.copytree(a, tmp_path / "b")
    assert _describe(a, True) == _describe(tmp_path / "b", True)
    (tmp_path / "b" / "bag" / "n0.png").write_bytes((a / "bag" / "n1.png").read_bytes())
    assert _describe(a, True)[0] != _describe(tmp_path / "b", True)[0]
