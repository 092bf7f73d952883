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
batch, 4 images per process, and the run counts the global images.
"""

from __future__ import annotations

import json
import os
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
    from tunery.vision.simclr import per_process_batch

    assert per_process_batch(256, 1) == 256 and per_process_batch(256, 2) == 128
    with pytest.raises(ConfigError, match="global batch"):
        per_process_batch(10, 4)
