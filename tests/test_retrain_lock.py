"""At most one retrain per project: a second one is refused at once (not queued), and the lock is
released however the first one ends."""

from __future__ import annotations

import pytest

from tunery.runner.landing import Busy, exclusive


def test_a_second_retrain_is_refused_while_one_runs(tmp_path):
    with exclusive(tmp_path):
        second = exclusive(tmp_path)
        with pytest.raises(Busy, match="another retrain is running"):
            second.__enter__()
    with exclusive(tmp_path):  # released: the next one runs
        pass


def test_the_lock_is_released_when_a_retrain_fails(tmp_path):
    with pytest.raises(RuntimeError), exclusive(tmp_path):
        raise RuntimeError("stage failed")
    with exclusive(tmp_path):
        pass


def test_projects_do_not_share_the_lock(tmp_path):
    with exclusive(tmp_path / "a"), exclusive(tmp_path / "b"):
        pass
