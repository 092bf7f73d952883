"""The built-in demo source: WordNet 3.0 glosses from Debian's `wordnet-base` package.

Each noun synset gives one example: text = its gloss (the definition, by default without the quoted
usage examples, which often contain the word itself), label = its lexicographer file, e.g.
`noun.animal`. Data is read from the installed package, never copied into the repo.
WordNet 3.0 licence: https://wordnet.princeton.edu/license-and-commercial-use (permissive; keep the notice).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from tunery.config import WordnetSource
from tunery.data.text import normalize, unit_hash
from tunery.errors import ConfigError, DataValidationError

# lexnames(5WN): the lexicographer file numbers used in the data.* files, in order.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body "
    "verb.change verb.cognition verb.communication verb.competition verb.consumption verb.contact "
    "verb.creation verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative "
    "verb.weather adj.ppl"
).split()
DATA_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
INSTALL_HINT = "install it with `sudo apt-get install wordnet-base` (or `make wordnet`)"


def _gloss(raw: str, include_examples: bool) -> str:
    gloss = raw.strip()
    if not include_examples:
        # Usage examples follow the definition as `; "..."`.
        cut = gloss.find('; "')
        if cut != -1:
            gloss = gloss[:cut]
        elif gloss.startswith('"'):
            return ""
    return gloss.strip().rstrip(";").strip()


def iter_glosses(folder: Path, filename: str, include_examples: bool) -> Iterator[tuple[str, str]]:
    """(lexname, gloss) for every synset of one `data.*` file."""
    path = folder / filename
    try:
        handle = path.open(encoding="utf-8")
    except FileNotFoundError:
        raise DataValidationError(
            path, "missing_file", f"WordNet data file not found; {INSTALL_HINT}"
        ) from None
    with handle:
        for lineno, line in enumerate(handle, 1):
            if line.startswith("  "):  # licence header
                continue
            head, sep, gloss = line.partition(" | ")
            fields = head.split()
            if not sep or len(fields) < 3 or not fields[1].isdigit():
                raise DataValidationError(
                    path, "wordnet_format", f"line {lineno} is not a WordNet synset record"
                )
            lex = int(fields[1])
            if lex >= len(LEXNAMES):
                raise DataValidationError(
                    path, "wordnet_format", f"line {lineno}: unknown lexicographer file {lex}"
                )
            text = _gloss(gloss, include_examples)
            if text:
                yield LEXNAMES[lex], text


def _ranked(texts: list[str]) -> list[str]:
    # A stable, content-keyed order: the cap (and each demo shard) takes the same glosses everywhere.
    return sorted(texts, key=lambda t: unit_hash(normalize(t), "wordnet-sample"))


def _check(cfg: WordnetSource) -> Path:
    folder = Path(cfg.path)
    if not (folder / "data.noun").is_file():
        raise DataValidationError(
            folder / "data.noun", "missing_file", f"WordNet is not installed here; {INSTALL_HINT}"
        )
    nouns = [name for name in LEXNAMES if name.startswith("noun.")]
    unknown = sorted(set(cfg.categories) - set(nouns))
    if unknown:
        raise ConfigError(
            f"params.yaml: ingest.source.categories: unknown {unknown}; choose from {nouns}"
        )
    return folder


def shard(cfg: WordnetSource, index: int, per_class: int) -> pd.DataFrame:
    """Demo shard `index` (0, 1, ...): `per_class` glosses per category that lie beyond the cap.

    Shards never overlap each other or the base dataset, so releasing them one by one simulates
    new labelled data arriving for a scheduled re-fine-tune.
    """
    folder = _check(cfg)
    wanted = set(cfg.categories)
    by_class: dict[str, list[str]] = {c: [] for c in cfg.categories}
    for lexname, text in iter_glosses(folder, "data.noun", cfg.include_examples):
        if lexname in wanted:
            by_class[lexname].append(text)
    start = cfg.max_per_class + index * per_class
    rows = [
        (t, label)
        for label, texts in by_class.items()
        for t in _ranked(texts)[start : start + per_class]
    ]
    return pd.DataFrame(rows, columns=["text", "label"])


def load(cfg: WordnetSource) -> tuple[pd.DataFrame, list[str]]:
    """Labelled examples (text, label, origin) for the configured categories, and unlabelled texts."""
    folder = _check(cfg)
    wanted = set(cfg.categories)
    by_class: dict[str, list[str]] = {c: [] for c in cfg.categories}
    rest: list[str] = []
    for filename in DATA_FILES:
        for lexname, text in iter_glosses(folder, filename, cfg.include_examples):
            (by_class[lexname] if lexname in wanted else rest).append(text)

    rows = []
    for label, texts in by_class.items():
        ranked = _ranked(texts)
        rows += [(t, label) for t in ranked[: cfg.max_per_class]]
        rest += ranked[cfg.max_per_class :]
    labelled = pd.DataFrame(rows, columns=["text", "label"])
    labelled["origin"] = "source:wordnet"
    labelled["row"] = range(1, len(labelled) + 1)

    rest.sort(key=lambda t: unit_hash(normalize(t), "wordnet-corpus"))
    return labelled, rest[: cfg.unlabelled_max]
