"""Drift between newly landed data and the training data, measured with the pipeline's own encoder.

The score is a domain classifier's ROC AUC: logistic regression on frozen mean-pooled embeddings,
asked to tell new items from a sample of training items, scored out of fold (stratified k-fold).
0.5 means the new data looks like the training data to the encoder; towards 1.0 it is separable,
that is, it has drifted. A second, simpler number is the cosine distance between the two centroids.
Both are logged; `retrain.drift.min_auc` can make drift a trigger condition (tunery/runner/landing.py).
`score` takes embeddings of either modality: `measure` embeds texts with a text encoder; the image
pipeline embeds images with its SimCLR encoder (tunery/vision/retrain.py) and scores them here.

Why not a library: the usual drift packages (evidently, alibi-detect) are not in the dependency
set, and this classifier test is a few lines of scikit-learn on embeddings we already compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunery.errors import TuneryError


def domain_auc(new: Any, reference: Any, *, folds: int = 5, seed: int = 0) -> float:
    """Out-of-fold ROC AUC of a classifier separating `new` rows from `reference` rows."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.vstack([new, reference])
    y = np.r_[np.ones(len(new)), np.zeros(len(reference))]
    folds = max(2, min(folds, len(new), len(reference)))
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=1000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_predict(model, x, y, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, scores))


def centroid_distance(new: Any, reference: Any) -> float:
    """1 - cosine similarity of the mean embeddings."""
    import numpy as np

    a, b = np.asarray(new).mean(axis=0), np.asarray(reference).mean(axis=0)
    return float(1.0 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def sample_reference(items: Sequence[Any], rows: int, seed: int = 0) -> list[Any]:
    """At most `rows` of `items`, a seeded sample without replacement (all of them when fewer)."""
    import numpy as np

    items = list(items)
    if len(items) <= rows:
        return items
    rng = np.random.default_rng(seed)
    return [items[i] for i in rng.choice(len(items), rows, False)]


def score(new_x: Any, reference_x: Any, *, seed: int = 0) -> dict[str, Any]:
    """The drift of `new_x` vs `reference_x` (embeddings, one row per item, of any modality)."""
    if len(new_x) < 2 or len(reference_x) < 2:
        raise TuneryError("drift needs at least 2 new and 2 reference items")
    return {
        "auc": round(domain_auc(new_x, reference_x, seed=seed), 4),
        "centroid_distance": round(centroid_distance(new_x, reference_x), 6),
        "new_rows": len(new_x),
        "reference_rows": len(reference_x),
    }


def measure(
    encoder: Path,
    new_texts: Sequence[str],
    reference_texts: Sequence[str],
    *,
    reference_rows: int = 1000,
    max_length: int = 128,
    seed: int = 0,
) -> dict[str, Any]:
    """Embed both sets of texts with `encoder` (a model folder) and score their drift."""
    from tunery.modeling.factory import load_encoder
    from tunery.modeling.objectives import embed

    if len(new_texts) < 2 or len(reference_texts) < 2:
        raise TuneryError("drift needs at least 2 new and 2 reference texts")
    reference = sample_reference(reference_texts, reference_rows, seed)
    model, tok, _ = load_encoder(str(encoder))
    new_x = embed(model, tok, list(new_texts), max_length=max_length)
    ref_x = embed(model, tok, reference, max_length=max_length)
    return {**score(new_x, ref_x, seed=seed), "encoder": str(encoder)}
