"""The finetune stage under `torchrun --nproc-per-node 2` (gloo on CPU; NCCL on GPUs by the same
code) against one process, and resume after a kill under torchrun (slow, about two minutes).

`finetune.batch_size` is the global batch: each of the two processes takes half of it, so both runs
take the same steps with the same schedule. They still see the rows in another order (the
distributed sampler shuffles per process), so the metrics are compared within a tolerance, not
exactly: TOLERANCE in macro-F1 on the validation, test and holdout splits (30 rows each).

The kill: a wrapper holds both ranks right after the first checkpoint is marked complete, and the
test SIGKILLs the whole torchrun process tree there; the re-run resumes from that checkpoint and
ends where an uninterrupted 2-process run ends (same steps, model weights within 1e-5).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.services import Proc
from tests.test_finetune import tensors, write_splits

TOLERANCE = 0.05  # macro-F1; one misclassified row of 30 moves it by ~0.03
HOLD = """
import os, sys, time
from pathlib import Path

from transformers import TrainerCallback

import tunery.modeling.callbacks as ft

flag, original = Path(os.environ["TUNERY_TEST_HOLD"]), ft.trainer_callbacks


class Hold(TrainerCallback):  # after CompletionMarker: the checkpoint is complete
    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            flag.write_text(str(state.global_step))
        time.sleep(3600)


ft.trainer_callbacks = lambda **kw: [*original(**kw), Hold()]
sys.argv = ["tasks.finetune"]
from tasks.finetune import main

main()
"""


def make_root(tmp_path: Path, name: str, encoder: Path) -> Path:
    root = tmp_path / name
    root.mkdir()
    for package in ("tunery", "tasks"):
        shutil.copytree(
            REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"]["experiment"] = "test"
    params["tracking"]["log_models"] = False
    ft = params["finetune"]
    ft.update(
        method="full",  # what converges on a random tiny encoder (LoRA on random weights stalls)
        encoder=str(encoder),
        warm_start=None,
        epochs=12.0,
        batch_size=8,  # the global batch: 4 per process under torchrun
        max_length=32,
        early_stopping_patience=20,
        device="cpu",
        threads=1,
    )
    ft["full"]["learning_rate"] = 1.0e-3
    ft["ablations"]["enabled"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.yaml").write_text("stages: {}\n")
    write_splits(root / params["prepare"]["out_dir"], n_per_class=60)
    return root


def env_for(root: Path, **extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", **extra)


def torchrun(*script: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        *script,
    ]


def stage(root: Path, argv: list[str]) -> dict:
    done = subprocess.run(
        argv, cwd=root, env=env_for(root), capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return stage_metrics(root, "finetune")


def stage_metrics(root: Path, stage: str) -> dict:
    """Every number the stage wrote: reports/metrics/<stage>.json where the headline file
    metrics/<stage>.json keeps only some (tunery/metrics_files.py), else metrics/<stage>.json."""
    for folder in ("reports/metrics", "metrics"):
        path = root / folder / f"{stage}.json"
        if path.is_file():
            return json.loads(path.read_text())
    raise AssertionError(f"{root}: no metrics of {stage}")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    from tests.tiny import make_tiny_encoder

    return make_tiny_encoder(
        tmp_path_factory.mktemp("ddp-enc") / "encoder", hidden=64, vocab_size=300
    )


@pytest.mark.slow
def test_two_processes_match_one_and_resume_after_a_kill(encoder, tmp_path):
    started = time.monotonic()
    one_root = make_root(tmp_path, "one", encoder)
    one = stage(one_root, [sys.executable, "-m", "tasks.finetune"])
    two_root = make_root(tmp_path, "two", encoder)
    two = stage(two_root, torchrun("-m", "tasks.finetune"))
    print(f"1 process vs 2 (+{time.monotonic() - started:.0f} s):")
    keys = ["best_val_macro_f1", "arms.pipeline.test_macro_f1", "arms.pipeline.holdout_macro_f1"]
    for key in keys:
        print(f"  {key}: {one[key]} vs {two[key]}")
    assert one["steps"] == two["steps"]  # the same global batch, the same schedule
    assert one["best_val_macro_f1"] > 0.9  # converged (chance: 0.33), so order barely matters
    for key in keys:
        assert abs(one[key] - two[key]) <= TOLERANCE, (key, one[key], two[key])
    # rank 0 alone wrote the outputs; the checkpoints went once the outputs were written
    out = two_root / "models" / "finetune"
    assert json.loads((out / "finetune.json").read_text())["method"] == "full"
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert not any((two_root / "checkpoints" / "finetune").iterdir())

    # killed under torchrun right after the first complete checkpoint, then re-run: it resumes
    killed_root = make_root(tmp_path, "killed", encoder)
    script = killed_root / "hold_finetune.py"
    script.write_text(HOLD)
    flag = tmp_path / "held"
    proc = Proc(
        torchrun(str(script)),
        tmp_path / "killed.log",
        env_for(killed_root, TUNERY_TEST_HOLD=str(flag)),
        cwd=killed_root,
    )
    try:
        deadline = time.monotonic() + 600
        while not flag.exists():
            assert proc.alive(), proc.tail()
            assert time.monotonic() < deadline, proc.tail()
            time.sleep(0.2)
    finally:
        proc.stop(signal.SIGKILL)  # torchrun and both ranks, no clean-up of their own
    held_at = int(flag.read_text())
    assert not (killed_root / "models" / "finetune").exists()  # nothing written
    resumed = stage(killed_root, torchrun("-m", "tasks.finetune"))
    assert resumed["resumed"] is True and held_at < resumed["steps"] == two["steps"]
    a = tensors(killed_root / "models" / "finetune" / "adapter" / "model.safetensors")
    b = tensors(out / "adapter" / "model.safetensors")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"resumed from step {held_at}; max weight difference {worst:.2e}")
    assert worst < 1e-5
    print(f"wall {time.monotonic() - started:.0f} s")
