"""The promotion gate's rules, fail-closed cases included."""

import math

import pytest

from tunery.config import RegistryConfig
from tunery.registry.gate import decide

CFG = RegistryConfig(min_delta=0.01, max_class_drop=0.05, floor_macro_f1=0.6)


def m(f1, **per_class):
    return {"macro_f1": f1, "per_class_f1": per_class or {"a": f1, "b": f1}}


def test_first_model_needs_the_floor():
    assert decide(m(0.7), None, has_champion=False, parity_passed=True, cfg=CFG).promote
    d = decide(m(0.5), None, has_champion=False, parity_passed=True, cfg=CFG)
    assert not d.promote and "floor" in d.reason


def test_better_challenger_is_promoted():
    d = decide(
        m(0.82, a=0.8, b=0.84),
        m(0.80, a=0.8, b=0.8),
        has_champion=True,
        parity_passed=True,
        cfg=CFG,
    )
    assert d.promote, d.reason
    assert d.checks == {"parity": True, "min_delta": True, "max_class_drop": True}


def test_not_better_by_min_delta_is_rejected():
    d = decide(m(0.805), m(0.80), has_champion=True, parity_passed=True, cfg=CFG)
    assert not d.promote and "min_delta" in d.reason


def test_a_class_dropping_too_much_blocks_promotion():
    d = decide(
        m(0.90, a=0.99, b=0.81),
        m(0.80, a=0.70, b=0.90),
        has_champion=True,
        parity_passed=True,
        cfg=CFG,
    )
    assert not d.promote and "'b'" in d.reason and "0.0900" in d.reason


@pytest.mark.parametrize("parity", [False, None])
def test_failed_or_unknown_parity_blocks(parity):
    assert not decide(m(0.99), None, has_champion=False, parity_passed=parity, cfg=CFG).promote


@pytest.mark.parametrize(
    "challenger, champion",
    [
        (None, None),
        ({"per_class_f1": {"a": 1.0}}, m(0.5)),
        ({"macro_f1": math.nan, "per_class_f1": {"a": 1.0}}, m(0.5)),
        ({"macro_f1": "0.9"}, m(0.5)),
        (m(0.9), None),  # a champion exists but its numbers are missing
        (m(0.9), {"macro_f1": 0.5}),  # per-class numbers missing
        (
            {"macro_f1": 0.9, "per_class_f1": {"a": 0.9}},
            m(0.5),
        ),  # class b missing for the challenger
    ],
)
def test_missing_metrics_fail_closed(challenger, champion):
    d = decide(challenger, champion, has_champion=True, parity_passed=True, cfg=CFG)
    assert not d.promote
    assert "missing" in d.reason


def test_a_champion_that_cannot_be_compared_says_why():
    champion = {
        "comparable": False,
        "reason": "champion labels ['a', 'b'] differ from ['a', 'b', 'c']",
    }
    d = decide(m(0.9), champion, has_champion=True, parity_passed=True, cfg=CFG)
    assert not d.promote
    assert "not comparable" in d.reason and "differ" in d.reason and "--force" in d.reason
