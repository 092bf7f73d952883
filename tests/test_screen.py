"""What a person sees: the quiet default's line filter, progress lines, file modes of outputs."""

from __future__ import annotations

import logging
import os
import stat

import pytest

from tunery import screen
from tunery.io import _umask, atomic_dir, atomic_path, write_json
from tunery.progress import Progress

# As `dvc repro` prints them around a stage (DVC 3), one stage's worth.
DVC_STAGE_OUTPUT = """\
Running stage 'prepare':
> python -m tasks.prepare
prepare: wrote 3007 train rows
Updating lock file 'dvc.lock'

To track the changes with git, run:

\tgit add dvc.lock

To enable auto staging, run:

\tdvc config core.autostage true
Use `dvc push` to send your updates to remote storage.
WARNING prepare: 3 texts longer than max_length
"""


def test_quiet_default_hides_dvc_hints_and_keeps_ours(monkeypatch):
    monkeypatch.delenv(screen.VERBOSE_ENV, raising=False)
    kept = [line for line in DVC_STAGE_OUTPUT.splitlines(keepends=True) if screen.shown(line)]
    assert kept == [
        "Running stage 'prepare':\n",
        "prepare: wrote 3007 train rows\n",
        "WARNING prepare: 3 texts longer than max_length\n",
    ]
    monkeypatch.setenv(screen.VERBOSE_ENV, "1")  # -v: everything
    assert all(screen.shown(line) for line in DVC_STAGE_OUTPUT.splitlines(keepends=True))


def test_stage_lines_under_the_flow_carry_no_second_time_or_info_level():
    fmt = screen.StageLineFormatter()
    info = logging.LogRecord("tunery.finetune", logging.INFO, __file__, 1, "epoch %d", (1,), None)
    warn = logging.LogRecord("tunery.finetune", logging.WARNING, __file__, 1, "slow", (), None)
    assert fmt.format(info) == "tunery.finetune: epoch 1"
    assert fmt.format(warn) == "WARNING tunery.finetune: slow"


def test_progress_logs_each_tenth_with_rate_and_eta(caplog, monkeypatch):
    clock = iter(float(t) for t in range(1000))
    monkeypatch.setattr("tunery.progress.time.monotonic", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="tunery.progress")
    p = Progress("finetune base arm (lora)", 50, unit="step", heartbeat=1e9)
    for step in range(1, 51):
        p.update(step)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10  # one per 10 %, not one per step
    assert lines[0].startswith("finetune base arm (lora):  10 % 5/50 steps, ")
    assert "steps/s" in lines[0] and "ETA " in lines[0]
    assert (
        lines[-1].startswith("finetune base arm (lora): 100 % 50/50 steps")
        and "ETA" not in lines[-1]
    )


def test_progress_after_a_resume_counts_the_rate_from_here(caplog, monkeypatch):
    clock = iter([0.0, 10.0])
    monkeypatch.setattr("tunery.progress.time.monotonic", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="tunery.progress")
    p = Progress("pretrain mlm", 100, start=50, heartbeat=1e9)
    p.update(60)  # 10 steps in 10 s: 1 step/s, 40 left
    assert "1 steps/s" in caplog.records[0].getMessage()
    assert "ETA 00:40" in caplog.records[0].getMessage()


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
def test_outputs_get_the_modes_any_tool_gives_new_files(tmp_path):
    old = os.umask(0o022)
    _umask.cache_clear()  # read once per process: read it again under this umask
    try:
        write_json(tmp_path / "metrics.json", {"a": 1})
        with atomic_path(tmp_path / "plot.png") as tmp:
            tmp.write_bytes(b"png")
        with atomic_dir(tmp_path / "deploy") as tmp:
            (tmp / "model.onnx").write_bytes(b"onnx")
    finally:
        os.umask(old)
        _umask.cache_clear()
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "metrics.json") == 0o644
    assert mode(tmp_path / "plot.png") == 0o644
    assert mode(tmp_path / "deploy") == 0o755
    assert mode(tmp_path / "deploy" / "model.onnx") == 0o644
