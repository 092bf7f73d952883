from pathlib import Path

import pytest

from tunery.config import WordnetSource
from tunery.data import wordnet
from tunery.errors import ConfigError, DataValidationError

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"


def record(offset: int, lex: int, word: str, gloss: str) -> str:
    return f"{offset:08d} {lex:02d} n 01 {word} 0 000 | {gloss}  \n"


@pytest.fixture
def wn(tmp_path: Path) -> Path:
    nouns = [HEADER]
    for i in range(6):
        nouns.append(record(i, 5, f"beast{i}", f'a kind of animal number {i}; "the beast{i} ran"'))
        nouns.append(record(100 + i, 13, f"dish{i}", f"a kind of food number {i}"))
        nouns.append(record(200 + i, 20, f"herb{i}", f"a kind of plant number {i}"))
    (tmp_path / "data.noun").write_text("".join(nouns))
    (tmp_path / "data.verb").write_text(
        HEADER + "00000001 29 v 01 run 0 000 | move fast by using one's feet  \n"
    )
    (tmp_path / "data.adj").write_text(HEADER)
    (tmp_path / "data.adv").write_text(HEADER)
    return tmp_path


def test_labels_are_lexicographer_files_and_examples_are_stripped(wn):
    cfg = WordnetSource(path=str(wn), categories=["noun.animal", "noun.food"], max_per_class=4)
    labelled, unlabelled = wordnet.load(cfg)
    assert sorted(labelled["label"].unique()) == ["noun.animal", "noun.food"]
    assert (labelled["label"].value_counts() == 4).all()
    assert not labelled["text"].str.contains('"').any()
    assert "move fast by using one's feet" in unlabelled  # other POS feed the corpus
    assert any("plant" in t for t in unlabelled)  # unused categories too
    assert len(unlabelled) == 6 + 1 + 2 * 2  # plants, the verb, and the 2 over-cap per class


def test_cap_sample_is_stable(wn):
    cfg = WordnetSource(path=str(wn), categories=["noun.animal", "noun.food"], max_per_class=3)
    assert wordnet.load(cfg)[0].equals(wordnet.load(cfg)[0])


def test_missing_package_says_how_to_install(tmp_path):
    cfg = WordnetSource(
        path=str(tmp_path / "none"), categories=["noun.animal", "noun.food"], max_per_class=3
    )
    with pytest.raises(DataValidationError, match="apt-get install wordnet-base"):
        wordnet.load(cfg)


def test_unknown_category(wn):
    with pytest.raises(ConfigError, match="noun.animals"):
        wordnet.load(
            WordnetSource(path=str(wn), categories=["noun.animals", "noun.food"], max_per_class=3)
        )


def test_corrupt_record_names_line(wn):
    (wn / "data.noun").write_text(HEADER + "garbage\n")
    with pytest.raises(DataValidationError, match="line 2"):
        wordnet.load(
            WordnetSource(path=str(wn), categories=["noun.animal", "noun.food"], max_per_class=3)
        )


@pytest.mark.skipif(
    not Path("/usr/share/wordnet/data.noun").exists(), reason="wordnet-base not installed"
)
def test_real_wordnet_default_subset():
    from tunery.config import load_params

    cfg = load_params(Path(__file__).resolve().parents[1] / "params.yaml").ingest.source
    labelled, unlabelled = wordnet.load(cfg)
    assert labelled["label"].nunique() >= 8
    assert labelled["label"].value_counts().max() <= cfg.max_per_class
    assert len(unlabelled) > 1000


def test_demo_shards_are_disjoint_from_the_base_and_each_other(wn):
    cfg = WordnetSource(path=str(wn), categories=["noun.animal", "noun.food"], max_per_class=2)
    base = set(wordnet.load(cfg)[0]["text"])
    s0, s1 = wordnet.shard(cfg, 0, 2), wordnet.shard(cfg, 1, 2)
    assert len(s0) == len(s1) == 4
    assert (
        base.isdisjoint(s0["text"])
        and base.isdisjoint(s1["text"])
        and set(s0["text"]).isdisjoint(s1["text"])
    )
    assert wordnet.shard(
        cfg, 2, 2
    ).empty  # 6 glosses per class: the base (2) and two shards (2 + 2)
