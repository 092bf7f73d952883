"""Drift of new data vs training data: the domain-classifier AUC on hand-made embeddings, and the
measurement with a real (tiny) encoder."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import make_rows
from tunery.errors import TuneryError
from tunery.evaluation import drift


def test_same_distribution_scores_about_half_and_a_shift_scores_near_one():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(400, 16))
    same = rng.normal(size=(200, 16))
    shifted = rng.normal(size=(200, 16)) + np.r_[1.5, np.zeros(15)]
    assert drift.domain_auc(same, ref) == pytest.approx(0.5, abs=0.08)
    assert drift.domain_auc(shifted, ref) > 0.8
    assert drift.centroid_distance(ref, ref) == pytest.approx(0.0, abs=1e-9)


def test_measure_with_an_encoder(tmp_path):
    from tests.tiny import make_tiny_encoder

    encoder = make_tiny_encoder(tmp_path / "encoder")
    rows = make_rows(60).sample(frac=1.0, random_state=0)["text"].tolist()
    reference, similar = rows[:120], rows[120:150]  # two random samples of the same rows
    different = [f"{n} {n * 7} {n * 13} ## 0x{n:04x}" for n in range(30)]
    near = drift.measure(encoder, similar, reference, reference_rows=60)
    far = drift.measure(encoder, different, reference, reference_rows=60)
    assert near["reference_rows"] == 60 and near["new_rows"] == 30
    assert far["auc"] > 0.95 and near["auc"] < 0.8
    with pytest.raises(TuneryError, match="at least 2"):
        drift.measure(encoder, similar[:1], reference)
