"""SimCLR (Chen et al., 2020) for a ViT, trained by `transformers.Trainer`.

The objective is the model's own `forward` (as the text side's SimCSE), trained by the image
objectives' one loop (`tunery.vision.pretrain_loop.fit`): `ViTForSimCLR` takes two
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
import zlib
from pathlib import Path
from typing import Any

import torch
from transformers import ViTModel, ViTPreTrainedModel

from tunery.vision.augment import AugmentConfig, augment, generator
from tunery.vision.processor import ProcessorConfig
from tunery.vision.settings import SimCLRSettings  # defined apart: params load without torch
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


def pretrain(
    model: ViTForSimCLR,
    pixel_values: torch.Tensor,
    settings: SimCLRSettings,
    *,
    processor: ProcessorConfig,
    augment_cfg: AugmentConfig,
    out_dir: Path,
    resume: str | None = None,
) -> dict[str, Any]:
    """Train `model` on unlabelled `pixel_values` (`pretrain_loop.fit`: checkpoints, resume by
    fingerprint `resume`, budget); save it (safetensors) to `out_dir/model`.

    Under torchrun (DDP) `settings.batch_size` is the global batch, split among the processes,
    and the loss is NT-Xent over the global batch (`nt_xent`). The views differ from one
    process's: each process's collator seeds them from its own share of the indices.
    """
    from tunery.vision.pretrain_loop import fit

    collator = SimCLRCollator(augment_cfg, processor, settings.seed)
    return fit(
        model,
        ImageTensorDataset(pixel_values),
        collator,
        settings,
        out_dir=out_dir,
        resume=resume,
        what="pretrain simclr",
    )
