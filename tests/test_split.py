import pandas as pd

from tasks import prepare
from tests.conftest import make_rows
from tunery.config import PrepareConfig
from tunery.data import split
from tunery.data.text import normalize

CFG = PrepareConfig.model_validate({"fractions": {"val": 0.1, "test": 0.1, "holdout": 0.1}})


def with_origin(df: pd.DataFrame, origin: str) -> pd.DataFrame:
    return df.assign(origin=origin)


def test_split_is_deterministic_and_roughly_proportional():
    df = with_origin(make_rows(400), "source:x")
    a, b = split.assign(df, CFG), split.assign(df.sample(frac=1, random_state=1).sort_index(), CFG)
    assert (a == b).all()
    share = a.value_counts(normalize=True)
    assert 0.6 < share["train"] < 0.8
    for name in ("val", "test", "holdout"):
        assert 0.05 < share[name] < 0.15


def test_adding_data_never_moves_existing_examples():
    old = with_origin(make_rows(200), "source:x")
    new = with_origin(make_rows(100, offset=200), "incoming:new.csv")
    before = split.assign(old, CFG)
    combined = pd.concat([new, old], ignore_index=True)  # order must not matter either
    after = split.assign(combined, CFG)
    after_old = after.iloc[len(new) :].reset_index(drop=True)
    assert (after_old == before).all()


def test_frozen_holdout_takes_no_new_rows():
    new = with_origin(make_rows(300), "incoming:new.csv")
    frozen = split.assign(new, CFG)
    assert "holdout" not in set(frozen)
    unfrozen = split.assign(new, CFG.model_copy(update={"freeze_holdout": False}))
    assert ((unfrozen == "holdout") == ((frozen == "test") & (unfrozen != "test"))).all()


def test_duplicates_never_cross_splits():
    df = with_origin(make_rows(100), "source:x")
    variants = df.assign(text=df["text"].str.upper() + " ")
    both = pd.concat([df, variants], ignore_index=True)
    s = split.assign(both, CFG)
    key = both["text"].map(normalize)
    assert (s.groupby(key).nunique() == 1).all()


def test_prepare_outputs_and_corpus_excludes_scored_texts(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    labelled = with_origin(make_rows(60), "source:x")
    labelled.to_parquet(raw / "labelled.parquet", index=False)
    pd.DataFrame({"text": ["extra unlabelled text one", "extra unlabelled text two"]}).to_parquet(
        raw / "unlabelled.parquet"
    )
    card = prepare.run(CFG, raw_dir=raw, out_dir=tmp_path / "prep", plot_path=tmp_path / "plot.png")
    parts = {n: pd.read_parquet(tmp_path / "prep" / f"{n}.parquet") for n in split.SPLITS}
    corpus = set(pd.read_parquet(tmp_path / "prep" / "corpus.parquet")["text"])
    assert sum(len(p) for p in parts.values()) == len(labelled)
    assert corpus.isdisjoint(parts["test"]["text"]) and corpus.isdisjoint(parts["holdout"]["text"])
    assert set(parts["train"]["text"]) <= corpus and "extra unlabelled text one" in corpus
    assert card["rows"]["corpus"] == len(corpus)
    assert card["per_class"]["train"]["animal"] == int((parts["train"]["label"] == "animal").sum())
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "prep" / "labels.json").read_text().count('"') == 6
