"""SimCLR under `torchrun --standalone --nproc-per-node 2` (gloo, CPU) against one process (slow).

The same tiny ViT (seeded) and the same fixed global batch of two views, split in halves between
the two ranks, trained a few steps with plain SGD under DDP; one process trains the whole batch.
NT-Xent gathers the projections of both ranks (`tunery.vision.simclr.nt_xent`), so the step-1
loss (the mean of the ranks' losses) equals the one-process loss, and after the steps the weights
are the same within float tolerance. SGD, not AdamW: Adam's update is nearly blind to the
gradient's scale, SGD's is not, so a doubled or halved gradient (DDP's averaging against the
gather's summed backward) would show in the weights. The local-negatives loss (each half on its
own) is computed too, to show the comparison tells the two apart. (The images are noise: after
the first step the loss sits near ln 15, the uniform guess; the weights still move by ~0.6.)

Then `pretrain` (the library's Trainer loop) runs under torchrun: `simclr.batch_size` is the global
batch, 4 images per process, and the run counts the global images. Last, the `pretrain` stage
itself (`python -m tasks.vision.pretrain`, as vision/dvc.yaml runs it) under torchrun, killed after
its first complete checkpoint and re-run: it resumes there and matches an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

STEPS, LR, N = 4, 0.01, 8
COMMON = """
import json, sys
from pathlib import Path

import torch

from tunery.vision.processor import ProcessorConfig
from tunery.vision.simclr import SimCLRSettings, build_simclr
from tunery.vision.vit import VitSpec

TINY = VitSpec(patch_size=7, hidden_size=32, num_layers=2, num_heads=2)


def views(n):
    gen = torch.Generator().manual_seed(7)
    return torch.randn(n, 1, 28, 28, generator=gen), torch.randn(n, 1, 28, 28, generator=gen)


def model():
    return build_simclr(ProcessorConfig(), SimCLRSettings(seed=0, projection_dim=16), spec=TINY)
"""
DDP_STEPS = (
    COMMON
    + """
import torch.distributed as dist
from safetensors.torch import save_file

steps, lr, n, out = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
x1, x2 = views(n)
share = slice(rank * n // world, (rank + 1) * n // world)
net = torch.nn.parallel.DistributedDataParallel(model())
opt = torch.optim.SGD(net.parameters(), lr=lr)
losses = []
for _ in range(steps):
    opt.zero_grad()
    loss = net(pixel_values=x1[share], view_pixel_values=x2[share])["loss"]
    loss.backward()
    opt.step()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    losses.append(mean.item() / world)
if rank == 0:
    state = {k: v.contiguous() for k, v in net.module.state_dict().items()}
    save_file(state, str(out / "ddp.safetensors"))
    (out / "ddp.json").write_text(json.dumps({"losses": losses, "world": world}))
dist.destroy_process_group()
"""
)
DDP_PRETRAIN = """
import json, sys
from pathlib import Path

import torch

from tunery.vision.augment import AugmentConfig
from tunery.vision.processor import ProcessorConfig
from tunery.vision.simclr import SimCLRSettings, build_simclr, pretrain
from tunery.vision.vit import VitSpec

out = Path(sys.argv[1])
settings = SimCLRSettings(batch_size=8, max_steps=3, logging_steps=1, seed=0)
spec = VitSpec(patch_size=7, hidden_size=32, num_layers=2, num_heads=2)
model = build_simclr(ProcessorConfig(), settings, spec=spec)
x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(3))
result = pretrain(
    model, x, settings, processor=ProcessorConfig(), augment_cfg=AugmentConfig(), out_dir=out
)
dist = torch.distributed  # what nt_xent looks at to gather: the Trainer's process group
result["group"] = dist.get_world_size() if dist.is_initialized() else 0
if dist.get_rank() == 0:
    (out / "result.json").write_text(json.dumps(result))
"""


def torchrun(script: Path, *args: str) -> None:
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [*argv, str(script), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def one_process(namespace: dict) -> tuple[list[float], dict, float]:
    """The same model and views in this process, the whole batch: the reference."""
    from tunery.vision.simclr import nt_xent

    net = namespace["model"]()
    x1, x2 = namespace["views"](N)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    losses = []
    with torch.no_grad():  # each half with its own negatives: what the gather replaces
        halves = (slice(0, N // 2), slice(N // 2, N))
        z = [net.projection(net.embed(torch.cat([x1[h], x2[h]]))) for h in halves]
        local = sum(nt_xent(h[: N // 2], h[N // 2 :], net.config.simclr_temperature) for h in z)
        local = local / 2
    for _ in range(STEPS):
        opt.zero_grad()
        loss = net(pixel_values=x1, view_pixel_values=x2)["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, net.state_dict(), float(local)


@pytest.mark.slow
def test_two_processes_see_the_global_negatives(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "ddp_steps.py"
    script.write_text(DDP_STEPS)
    torchrun(script, str(STEPS), str(LR), str(N), str(tmp_path))
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    namespace: dict = {}
    exec(compile(COMMON, "common", "exec"), namespace)  # the script's model and views
    losses, state, local = one_process(namespace)
    print(f"step losses, 1 process: {losses}; 2 processes: {ddp['losses']}; local-only {local}")
    assert ddp["world"] == 2
    assert ddp["losses"][0] == pytest.approx(losses[0], abs=1e-5)
    assert abs(local - losses[0]) > 1e-3  # the local-negatives loss is another number
    assert ddp["losses"] == pytest.approx(losses, abs=1e-4)
    weights = load_file(str(tmp_path / "ddp.safetensors"))
    moved = max(float((state[k] - namespace["model"]().state_dict()[k]).abs().max()) for k in state)
    worst = max(float((weights[k] - state[k]).abs().max()) for k in state)
    print(f"after {STEPS} SGD steps: weights moved up to {moved:.3e}, 1 vs 2 processes {worst:.2e}")
    assert moved > 1e-3 and worst < 1e-5


@pytest.mark.slow
def test_pretrain_under_torchrun_takes_the_global_batch(tmp_path):
    script = tmp_path / "ddp_pretrain.py"
    script.write_text(DDP_PRETRAIN)
    torchrun(script, str(tmp_path / "out"))
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    print({k: v for k, v in result.items() if k != "history"})
    assert result["world_size"] == result["group"] == 2 and result["steps"] == 3
    assert result["images"] == 3 * 8  # the global batch, 4 per process
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result["history"])
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()


def test_batch_size_must_split_evenly_among_the_processes():
    from tunery.errors import ConfigError
    from tunery.vision.pretrain_loop import per_process_batch

    assert per_process_batch(256, 1) == 256 and per_process_batch(256, 2) == 128
    with pytest.raises(ConfigError, match="global batch"):
        per_process_batch(10, 4)


# --------------------------------------------------------------------------- the stage
HOLD = """
import os, sys, time
from pathlib import Path

from transformers import TrainerCallback

import tunery.modeling.callbacks as cb

flag, original = Path(os.environ["TUNERY_TEST_HOLD"]), cb.trainer_callbacks


class Hold(TrainerCallback):  # after CompletionMarker: the checkpoint is complete
    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            flag.write_text(str(state.global_step))
        time.sleep(3600)


cb.trainer_callbacks = lambda **kw: [*original(**kw), Hold()]
sys.argv = ["tasks.vision.pretrain"]
from tasks.vision.pretrain import main

main()
"""
STAGE_STEPS, SAVE_STEPS = 6, 2


@pytest.fixture(scope="module")
def snapshot_root(tmp_path_factory) -> Path:
    """A tiny image project up to the corpus stage's snapshot (in this process), ready for
    `tasks.vision.pretrain`: three classes of 28x28 PNGs, a 2-layer ViT, 6 SimCLR steps of a
    global batch of 8, a checkpoint every 2."""
    import yaml

    from tasks.vision import corpus, ingest, prepare
    from tests.test_vision_pipeline import class_images, tiny_tree
    from tunery.vision.params import VisionParams

    root = tmp_path_factory.mktemp("vision-ddp") / "proj"
    for package in ("tunery", "tasks"):
        shutil.copytree(
            REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    class_images(root / "data" / "source", per_class=16)
    tree = tiny_tree({"kind": "folder", "path": "data/source"})
    tree["tracking"]["log_models"] = False
    tree["pretrain"]["simclr"].update(
        batch_size=8, max_steps=STAGE_STEPS, save_steps=SAVE_STEPS, logging_steps=1
    )
    (root / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    (root / "dvc.yaml").write_text("stages: {}\n")
    p = VisionParams.model_validate(tree)
    raw, data = root / p.ingest.out_dir, root / p.prepare.out_dir
    ingest.run(p.ingest, root=root, out_dir=raw)
    prepare.run(p.prepare, raw_dir=raw, out_dir=data)
    corpus.run(p.corpus, root=root, raw_dir=raw, data_dir=data, out_dir=root / p.corpus.out_dir)
    return root


def stage_env(root: Path, **extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", **extra)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def run_stage(root: Path) -> dict:
    argv = [*TORCHRUN, "-m", "tasks.vision.pretrain"]
    done = subprocess.run(
        argv, cwd=root, env=stage_env(root), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((root / "models" / "encoder" / "pretrain.json").read_text())


@pytest.mark.slow
def test_the_pretrain_stage_under_torchrun_resumes_after_a_kill(snapshot_root, tmp_path):
    """The stage's `cmd` under torchrun: rank 0 alone probes and writes; killed (SIGKILL to the
    whole torchrun tree) right after its first complete checkpoint, the re-run resumes there and
    ends with the weights of an uninterrupted two-process run."""
    import signal
    import time

    from safetensors.torch import load_file

    from tests.services import Proc

    whole_root, killed_root = tmp_path / "whole", tmp_path / "killed"
    for root in (whole_root, killed_root):
        shutil.copytree(snapshot_root, root)
    whole = run_stage(whole_root)
    assert whole["world_size"] == 2 and whole["steps"] == STAGE_STEPS
    assert whole["images"] == STAGE_STEPS * 8 and whole["resumed_from_step"] == 0
    assert set(whole["probe"]) >= {"simclr", "init"}
    assert not (whole_root / "checkpoints" / "pretrain").exists()  # gone once written

    script = killed_root / "hold_pretrain.py"
    script.write_text(HOLD)
    flag = tmp_path / "held"
    proc = Proc(
        [*TORCHRUN, str(script)],
        tmp_path / "killed.log",
        stage_env(killed_root, TUNERY_TEST_HOLD=str(flag)),
        cwd=killed_root,
    )
    try:
        deadline = time.monotonic() + 300
        while not flag.exists():
            assert proc.alive(), proc.tail()
            assert time.monotonic() < deadline, proc.tail()
            time.sleep(0.2)
    finally:
        proc.stop(signal.SIGKILL)  # torchrun and both ranks, no clean-up of their own
    held_at = int(flag.read_text())
    assert held_at == SAVE_STEPS
    assert not (killed_root / "models" / "encoder").exists()  # nothing written
    resumed = run_stage(killed_root)
    assert not list((killed_root / "models").glob(".encoder.*"))  # the killed run's temp folder
    assert resumed["resumed_from_step"] == held_at and resumed["steps"] == STAGE_STEPS
    assert resumed["images"] == (STAGE_STEPS - held_at) * 8  # only the steps it still took
    a = load_file(str(killed_root / "models" / "encoder" / "model" / "model.safetensors"))
    b = load_file(str(whole_root / "models" / "encoder" / "model" / "model.safetensors"))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"resumed from step {held_at}; max weight difference to the whole run {worst:.2e}")
    assert worst < 1e-5
