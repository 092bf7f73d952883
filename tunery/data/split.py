"""Deterministic splits keyed on the text itself.

Split membership is a function of the normalised text alone (a salted hash), so appending data never
moves an existing example between splits and an exact duplicate can never sit in two splits.
"""

from __future__ import annotations

import pandas as pd

from tunery.config import PrepareConfig
from tunery.data.text import normalize, unit_hash

SPLITS = ("train", "val", "test", "holdout")
BASE_ORIGIN_PREFIX = "source:"


def assign(df: pd.DataFrame, cfg: PrepareConfig) -> pd.Series:
    """The split of every row of `df` (columns `text`, `origin`)."""
    f = cfg.fractions
    u = df["text"].map(lambda t: unit_hash(normalize(t), cfg.split_salt))
    split = pd.Series("train", index=df.index)
    split[u < f.holdout + f.test + f.val] = "val"
    split[u < f.holdout + f.test] = "test"
    split[u < f.holdout] = "holdout"
    if cfg.freeze_holdout:
        # Only the original source populates the holdout; later additions that hash into it are
        # scored in test instead, so the holdout stays the same set for every model ever trained.
        appended = ~df["origin"].str.startswith(BASE_ORIGIN_PREFIX)
        split[(split == "holdout") & appended] = "test"
    return split
