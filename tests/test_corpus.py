"""The corpus stage's policy: when the pretraining snapshot moves (and so pretrain re-runs)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tasks.corpus import FILES, change_share, run
from tunery.config import CorpusConfig
from tunery.errors import DataValidationError


def prepared(folder: Path, texts: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"text": texts}).to_parquet(folder / "corpus.parquet")
    for split in ("train", "val"):
        pd.DataFrame({"text": texts[:2], "label": ["a", "b"]}).to_parquet(
            folder / f"{split}.parquet"
        )
    return folder


TEXTS = [f"text {i}" for i in range(100)]


def snapshot_texts(out: Path) -> list[str]:
    return pd.read_parquet(out / "corpus.parquet")["text"].tolist()


@pytest.fixture
def first(tmp_path):
    """A snapshot taken from 100 texts; returns (out_dir, a prepared folder to change)."""
    out = tmp_path / "snapshot"
    got = run(CorpusConfig(), prepared_dir=prepared(tmp_path / "p0", TEXTS), out_dir=out)
    assert got["moved"] and got["reason"] == "no snapshot yet"
    assert all((out / name).is_file() for name in FILES)
    return out, tmp_path / "p1"


@pytest.mark.parametrize(
    ("policy", "added", "moved"),
    [
        ("on_corpus_change", 3, False),  # 3 % <= 5 %: pretrain keeps its encoder
        ("on_corpus_change", 6, True),  # 6 % > 5 %
        ("always", 1, True),
        ("always", 0, False),  # nothing changed: nothing to re-run
        ("never", 50, False),
    ],
)
def test_policy_decides_whether_the_snapshot_moves(first, policy, added, moved):
    out, folder = first
    new = TEXTS + [f"new {i}" for i in range(added)]
    cfg = CorpusConfig(pretrain_policy=policy, change_threshold=0.05)
    got = run(cfg, prepared_dir=prepared(folder, new), out_dir=out)
    assert got["moved"] is moved
    assert got["change_share"] == pytest.approx(added / len(TEXTS))
    assert snapshot_texts(out) == (new if moved else TEXTS)


def test_change_share_counts_removals_too():
    assert change_share(pd.Series(["a", "b", "c", "d"]), pd.Series(["a", "b", "e"])) == 0.75


def test_missing_prepared_file_is_a_named_error(tmp_path):
    folder = prepared(tmp_path / "p", TEXTS)
    (folder / "val.parquet").unlink()
    with pytest.raises(DataValidationError, match=r"val.parquet.*\[missing_file\]"):
        run(CorpusConfig(), prepared_dir=folder, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
