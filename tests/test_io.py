"""Atomic writes (tunery/io.py): the old output or the new one, never half of either; what a
killed writer leaves behind is removed by the next writer of the same output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tunery.io import atomic_dir

KILLED = """
import os, signal, sys
from pathlib import Path
from tunery.io import atomic_dir

with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "half.bin").write_bytes(b"x" * 10)
    os.kill(os.getpid(), signal.SIGKILL)  # no `finally` runs
"""


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "out"
    with atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError), atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("two")
        raise RuntimeError("the stage failed")
    assert (dest / "a.txt").read_text() == "one"  # the last good output stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_writers_folder_is_removed_by_the_next_writer(tmp_path):
    dest = tmp_path / "encoder"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", KILLED, str(dest)], env=env, check=False)
    assert done.returncode == -signal.SIGKILL
    (left,) = tmp_path.glob(".encoder.*.tmp")
    assert (left / "half.bin").is_file() and not dest.exists()
    live = tmp_path / f".encoder.{os.getpid()}.abc.tmp"  # a live writer's (this process)
    live.mkdir()
    with atomic_dir(dest) as tmp:
        (tmp / "model.bin").write_text("whole")
    assert not left.exists() and live.is_dir()
    assert (dest / "model.bin").read_text() == "whole"
