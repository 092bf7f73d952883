"""Deterministic splits keyed on the example itself.

Split membership is a function of one key alone, a salted hash of the normalised text or of an
image's bytes, so appending data never moves an existing example between splits and an exact
duplicate can never sit in two splits.
"""

from __future__ import annotations

import pandas as pd

from tunery.config import PrepareConfig
from tunery.data.text import normalize, unit_hash

SPLITS = ("train", "val", "test", "holdout")
BASE_ORIGIN_PREFIX = "source:"


def assign(df: pd.DataFrame, cfg: PrepareConfig) -> pd.Series:
    """The split of every row of `df` (columns `text`, `origin`)."""
    return assign_by_key(df["text"].map(normalize), df["origin"], cfg)


def assign_by_key(keys: pd.Series, origins: pd.Series, cfg: PrepareConfig) -> pd.Series:
    """The split of each key (a normalised text, an image's sha256): equal keys, equal splits."""
    f = cfg.fractions
    u = keys.map(lambda k: unit_hash(k, cfg.split_salt))
    split = pd.Series("train", index=keys.index)
    split[u < f.holdout + f.test + f.val] = "val"
    split[u < f.holdout + f.test] = "test"
    split[u < f.holdout] = "holdout"
    if cfg.freeze_holdout:
        # Only the original source populates the holdout; later additions that hash into it are
        # scored in test instead, so the holdout stays the same set for every model ever trained.
        appended = ~origins.str.startswith(BASE_ORIGIN_PREFIX)
        split[(split == "holdout") & appended] = "test"
    return split
