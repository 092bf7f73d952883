"""SimCLR (Chen et al., 2020) for a ViT, trained by `transformers.Trainer`.

The objective is the model's own `forward` (as the text side's SimCSE): `ViTForSimCLR` takes two
views of a batch and returns the NT-Xent loss, so the Trainer's checkpoints (safetensors), resume,
gradient accumulation and DDP under `torchrun` apply unchanged; under DDP the loss gathers every
process's projections, so the negatives are the global batch's (as in the paper), and
`simclr.batch_size` is the global batch. The views are made in the collator (`SimCLRCollator`),
seeded from the batch's dataset indices, so a resumed run sees the views the uninterrupted one
would have. The encoder sits under `vit`, so `ViTForImageClassification`
(`vit.build_classifier(base_dir=<saved SimCLR folder>)`) loads it and drops the projection head,
which SimCLR throws away after pretraining anyway.
"""

from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path
from typing import Any

import torch
from transformers import ViTModel, ViTPreTrainedModel

from tunery.modeling.callbacks import WallClockBudget  # the text loops' budget, DDP-aware
from tunery.vision.augment import AugmentConfig, augment, generator
from tunery.vision.processor import ProcessorConfig
from tunery.vision.settings import SimCLRSettings  # defined apart: params load without torch
from tunery.vision.trainer import VisionTrainer
from tunery.vision.vit import VitSpec, build_model, pool

log = logging.getLogger("tunery.vision.simclr")


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent: for each of the 2N views, cross-entropy of its partner among the other 2N - 1
    (cosine similarities over `temperature`); the mean over all 2N views.

    Under DDP (torch.distributed initialised, world size > 1) the negatives are the global
    batch's, as in SimCLR: see `_nt_xent_global`. One process: the local batch, as always.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _nt_xent_global(z1, z2, temperature)
    import torch.nn.functional as F

    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, partner)


def _nt_xent_global(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """This rank's 2n rows against all W ranks' 2Wn views (gathered differentiably, same n on
    every rank), the mean over this rank's rows.

    The global views are ordered as one process would order them, [all first views; all second
    views], so this rank's row i of `z1` sits at rank * n + i and its partner at W * n + rank * n
    + i. The gather's backward sums every rank's gradient into each rank's own views, so rank r's
    gradient is that of sum_r' L_r' through its own images; DDP averages over the W ranks:
    (1/W) sum_r' L_r' is the mean over all 2Wn rows, i.e. one process's loss on the global batch.
    """
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.nn.functional import all_gather

    n, world, rank = z1.shape[0], dist.get_world_size(), dist.get_rank()
    local = F.normalize(torch.cat([z1, z2]).float(), dim=-1)
    views = F.normalize(torch.cat([*all_gather(z1), *all_gather(z2)]).float(), dim=-1)
    sim = local @ views.T / temperature
    rows = torch.arange(2 * n, device=local.device)
    own = torch.where(rows < n, rank * n + rows, world * n + rank * n + rows - n)
    sim = sim.masked_fill(
        own[:, None] == torch.arange(2 * world * n, device=local.device), float("-inf")
    )
    partner = torch.where(rows < n, own + world * n, own - world * n)
    return F.cross_entropy(sim, partner)


class ViTForSimCLR(ViTPreTrainedModel):
    """A ViT encoder, pooled, then a 2-layer projection head; `forward` returns the NT-Xent loss.

    Settings live on the config (`simclr_projection_dim`, `simclr_temperature`,
    `simclr_pooling`), so a saved folder reloads as it trained.
    """

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.vit = ViTModel(config, add_pooling_layer=False)
        hidden = config.hidden_size
        dim = getattr(config, "simclr_projection_dim", 64)
        self.projection = torch.nn.Sequential(
            torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, dim)
        )
        self.post_init()

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The pooled encoder output (what the probe and fine-tune use), before the head."""
        hidden = self.vit(pixel_values=pixel_values).last_hidden_state
        return pool(hidden, getattr(self.config, "simclr_pooling", "mean"))

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        view_pixel_values: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        kwargs.pop("num_items_in_batch", None)
        n = pixel_values.shape[0]
        # One encoder pass over both views: half the kernel launches, and batch-norm-free ViT
        # makes the two halves independent, so this equals two passes.
        z = self.projection(self.embed(torch.cat([pixel_values, view_pixel_values])))
        temperature = getattr(self.config, "simclr_temperature", 0.2)
        return {"loss": nt_xent(z[:n], z[n:], temperature)}


class ImageTensorDataset(torch.utils.data.Dataset):
    """`pixel_values` (and `labels` when given) of preprocessed images, with their index."""

    def __init__(self, pixel_values: torch.Tensor, labels: Any = None) -> None:
        self.pixel_values = pixel_values
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return int(self.pixel_values.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"pixel_values": self.pixel_values[i], "index": i}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


class SimCLRCollator:
    """Stack a batch and make two views of it, seeded by (seed, the batch's indices)."""

    def __init__(self, augment_cfg: AugmentConfig, processor: ProcessorConfig, seed: int) -> None:
        self.augment_cfg, self.processor, self.seed = augment_cfg, processor, seed

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        x = torch.stack([it["pixel_values"] for it in items])
        idx = torch.tensor([it["index"] for it in items], dtype=torch.int64)
        gen = generator(zlib.crc32(idx.numpy().tobytes(), self.seed))
        return {
            "pixel_values": augment(x, self.augment_cfg, self.processor, gen),
            "view_pixel_values": augment(x, self.augment_cfg, self.processor, gen),
        }


def build_simclr(
    processor: ProcessorConfig,
    settings: SimCLRSettings,
    *,
    spec: VitSpec | None = None,
    base_dir: Path | None = None,
) -> ViTForSimCLR:
    """A `ViTForSimCLR` from scratch (`spec`) or on a base folder's encoder."""
    return build_model(
        ViTForSimCLR,
        processor,
        spec=spec,
        base_dir=base_dir,
        seed=settings.seed,
        simclr_projection_dim=settings.projection_dim,
        simclr_temperature=settings.temperature,
        simclr_pooling=settings.pooling,
    )


def per_process_batch(batch_size: int, processes: int) -> int:
    """`simclr.batch_size` is the global batch (as `finetune.batch_size` on the text side): under
    torchrun each of the processes takes its share, and NT-Xent gathers the views of all, so
    the negatives, the steps and the schedule do not depend on the number of processes."""
    if batch_size % processes:
        from tunery.errors import ConfigError

        raise ConfigError(
            f"simclr.batch_size {batch_size} is the global batch and must divide evenly among "
            f"the {processes} training processes"
        )
    return batch_size // processes


def _args(settings: SimCLRSettings, out_dir: Path) -> Any:
    from transformers import TrainingArguments

    from tunery.modeling.training import world_size

    cuda = torch.cuda.is_available()
    processes = world_size()
    ddp = {"ddp_backend": "nccl" if cuda else "gloo"} if processes > 1 else {}
    return TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=per_process_batch(settings.batch_size, processes),
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, int(settings.warmup_share * settings.max_steps)),
        max_steps=settings.max_steps,
        logging_steps=settings.logging_steps,
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or settings.max_steps,
        save_total_limit=2,
        report_to="none",
        remove_unused_columns=False,
        dataloader_drop_last=True,  # NT-Xent's negatives: every step the same batch size
        seed=settings.seed,
        data_seed=settings.seed,
        disable_tqdm=True,
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        **ddp,
    )


def pretrain(
    model: ViTForSimCLR,
    pixel_values: torch.Tensor,
    settings: SimCLRSettings,
    *,
    processor: ProcessorConfig,
    augment_cfg: AugmentConfig,
    out_dir: Path,
    resume: bool = False,
) -> dict[str, Any]:
    """Train `model` on unlabelled `pixel_values`; save it (safetensors) to `out_dir/model`.

    Checkpoints (`save_steps`) go to `out_dir/checkpoint-<step>`; `resume` continues from the
    last one. Returns the run's numbers: steps, images seen, seconds, images/s (each image
    counted once though it is encoded twice), first and last logged loss, the loss history.

    Under torchrun (DDP) `settings.batch_size` is the global batch, split among the processes
    (`per_process_batch`), and the loss is NT-Xent over the global batch (`nt_xent`); rank 0
    writes `out_dir/model`. The views differ from one process's: each process's collator seeds
    them from its own share of the indices.
    """
    from transformers.trainer_utils import get_last_checkpoint

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = _args(settings, out_dir)
    budget = WallClockBudget(settings.max_minutes) if settings.max_minutes else None
    trainer = VisionTrainer(
        model=model,
        args=args,
        train_dataset=ImageTensorDataset(pixel_values),
        data_collator=SimCLRCollator(augment_cfg, processor, settings.seed),
        callbacks=[budget] if budget else None,
    )
    checkpoint = get_last_checkpoint(str(out_dir)) if resume else None
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - t0
    if trainer.is_world_process_zero():  # under torchrun: one writer, the others wait for it
        model.save_pretrained(out_dir / "model")
    trainer.accelerator.wait_for_everyone()
    history = [
        {"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h
    ]
    steps = trainer.state.global_step - _step_of(checkpoint)
    images = steps * settings.batch_size * args.gradient_accumulation_steps  # the global batch
    return {
        "steps": trainer.state.global_step,
        "images": images,
        "seconds": round(seconds, 2),
        "images_per_s": round(images / seconds, 1) if seconds else 0.0,
        "loss_first": history[0]["loss"] if history else None,
        "loss_last": history[-1]["loss"] if history else None,
        "stopped_by_budget": bool(budget and budget.stopped_at is not None),
        "world_size": args.world_size,  # training processes (torchrun); images: the global count
        "history": history,
    }


def _step_of(checkpoint: str | None) -> int:
    return int(checkpoint.rsplit("-", 1)[-1]) if checkpoint else 0
