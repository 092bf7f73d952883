"""Self-supervised objectives, their data plumbing, and the representation probe.

Objectives are the model's own `forward` (so `Trainer`, DDP, `torch.compile` and safetensors
checkpoints treat them as any transformers model): `use_objective` swaps a loaded model's class for
a subclass adding the objective, `plain_class` swaps it back before the final save.

- Sparse MLM: the same loss as `*ForMaskedLM`, but the vocabulary projection runs only at the
  ~15 % masked positions (BERT's own pretraining code gathered masked positions the same way);
  with a 30 k vocabulary that head is a fifth of BERT-base's FLOPs and most of its activations.
- Unsupervised SimCSE (Gao et al., 2021): every text twice through the encoder with dropout on,
  pooled, cosine similarities over temperature, the other texts of the batch as negatives. With
  `deletion` the second view also loses that share of its tokens (the deletion augmentation of
  Gao et al.'s ablation, and of TSDAE's noise): a base trained contrastively already tells two
  dropout views apart, so plain SimCSE gives it a loss near 0 and no gradient.
- MLM head warm-up: a base without an MLM head gets a random one; `HeadWarmup` freezes the encoder
  for the first steps so that head's first gradients do not wreck it.

The probe scores what the encoder learned: frozen mean-pooled embeddings of the labelled train
split fit a logistic regression and a k-NN, scored on the val split.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunery.modeling.training import length_sorted_batches

log = logging.getLogger("tunery.pretraining")

_CLASS_CACHE: dict[tuple[type, type], type] = {}


# --------------------------------------------------------------------------- objectives
class SparseMLMMixin:
    """`forward(labels=...)` computes the MLM head only where labels are not -100."""

    accepts_loss_kwargs = True  # Trainer passes num_items_in_batch: exact loss under grad accum/DDP

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        labels=None,
        num_items_in_batch=None,
        **kwargs,
    ):
        if labels is None:
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                **kwargs,
            )
        import torch.nn.functional as F
        from transformers.modeling_outputs import MaskedLMOutput

        encoder = getattr(self, self.base_model_prefix)
        hidden = encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            **kwargs,
        )[0]
        flat = labels.reshape(-1)
        picked = flat.ne(-100).nonzero().squeeze(1)
        head = getattr(self, mlm_head_name(self))
        logits = head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, picked))
        loss = F.cross_entropy(logits.float(), flat.index_select(0, picked), reduction="sum")
        denom = num_items_in_batch if num_items_in_batch is not None else max(picked.numel(), 1)
        return MaskedLMOutput(loss=loss / denom)


def _pair(t: Any, view: Any) -> Any:
    """The batch and its second view stacked (the batch twice where there is no view)."""
    import torch

    if t is None:
        return None
    return torch.cat([t, t if view is None else view])


class SimCSEMixin:
    """`forward` returns the unsupervised SimCSE loss of the batch."""

    accepts_loss_kwargs = False
    simcse_temperature: float = 0.05
    simcse_pooling: str = "mean"

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        view_input_ids=None,
        view_attention_mask=None,
        view_token_type_ids=None,
        **kwargs,
    ):
        import torch
        import torch.nn.functional as F

        kwargs.pop("num_items_in_batch", None)
        n = input_ids.shape[0]
        # One pass over both views: each copy gets its own dropout mask; the second view is the
        # collator's augmented copy where there is one (padded to the same width).
        mask = _pair(attention_mask, view_attention_mask)
        out = super().forward(
            input_ids=_pair(input_ids, view_input_ids),
            attention_mask=mask,
            token_type_ids=_pair(token_type_ids, view_token_type_ids),
        )
        z = pool(out[0], mask, self.simcse_pooling).float()
        z = F.normalize(z, dim=-1)
        sim = z[:n] @ z[n:].T / self.simcse_temperature
        loss = F.cross_entropy(sim, torch.arange(n, device=sim.device))
        return {"loss": loss}


def head_warmup(model: Any, steps: int) -> Any:
    """A `TrainerCallback` that freezes the encoder (the MLM head trains alone) until `steps`."""
    from tunery.modeling.callbacks import HeadWarmup

    return HeadWarmup(model, steps)


def mlm_head_name(model: Any) -> str:
    """The one child module besides the encoder that maps hidden states to vocabulary logits."""
    names = [n for n, _ in model.named_children() if n != model.base_model_prefix]
    if len(names) != 1:
        raise ValueError(f"{type(model).__name__}: no single MLM head module ({names})")
    return names[0]


def supports_sparse_mlm(model: Any) -> bool:
    try:
        mlm_head_name(model)
    except ValueError:
        return False
    return hasattr(model, model.base_model_prefix)


def _subclass(mixin: type, base: type) -> type:
    key = (mixin, base)
    if key not in _CLASS_CACHE:
        name = mixin.__name__.replace("Mixin", "") + base.__name__
        _CLASS_CACHE[key] = type(name, (mixin, base), {"_tunery_plain": base})
    return _CLASS_CACHE[key]


def use_objective(model: Any, objective: str, *, sparse_mlm: bool = True, **options: Any) -> Any:
    """Give `model` the objective's forward (in place); returns the model."""
    if objective == "mlm":
        if not sparse_mlm:
            return model
        if not supports_sparse_mlm(model):
            log.info("%s: no single MLM head module; using its full forward", type(model).__name__)
            return model
        model.__class__ = _subclass(SparseMLMMixin, type(model))
    elif objective == "simcse":
        model.__class__ = _subclass(SimCSEMixin, type(model))
        model.simcse_temperature = float(options.get("temperature", 0.05))
        model.simcse_pooling = str(options.get("pooling", "mean"))
    else:
        raise ValueError(f"unknown objective {objective!r} (mlm or simcse)")
    return model


def plain_class(model: Any) -> Any:
    """Undo `use_objective` (so `save_pretrained` records the real architecture)."""
    plain = getattr(type(model), "_tunery_plain", None)
    if plain is not None:
        model.__class__ = plain
    return model


# --------------------------------------------------------------------------- data
def pool(hidden: Any, mask: Any, how: str = "mean") -> Any:
    if how == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def mlm_collator(
    tok: Any, cfg: Any, *, seed: int | None = None, pad_to_multiple_of: int = 8
) -> Any:
    """BERT masking (`DataCollatorForLanguageModeling`); whole-word masking reads word boundaries
    from the features' `offset_mapping`, padded here to the batch length (the collator does not)."""
    from transformers import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(
        tokenizer=tok,
        mlm=True,
        mlm_probability=cfg.probability,
        mask_replace_prob=1.0 if cfg.whole_word else cfg.mask_replace,
        random_replace_prob=0.0 if cfg.whole_word else cfg.random_replace,
        whole_word_mask=cfg.whole_word,
        pad_to_multiple_of=pad_to_multiple_of,
        seed=seed,
    )
    return _WithOffsets(collate, pad_to_multiple_of) if cfg.whole_word else collate


class _WithOffsets:
    """Pads each feature's `offset_mapping` to the batch width, then collates."""

    def __init__(self, collate: Any, pad_to_multiple_of: int) -> None:
        self.collate, self.multiple = collate, pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        longest = max(len(f["input_ids"]) for f in features)
        width = -(-longest // self.multiple) * self.multiple
        padded = [
            {
                **f,
                "offset_mapping": [
                    *f["offset_mapping"],
                    *[(0, 0)] * (width - len(f["offset_mapping"])),
                ],
            }
            for f in features
        ]
        return self.collate(padded)


TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def simcse_collator(tok: Any, *, deletion: float, pad_to_multiple_of: int = 8) -> Any:
    """Padded batches; with `deletion` > 0 also `view_*` tensors: each text with that share of its
    non-special tokens deleted (at least one kept), padded to the same width as the originals.
    The draws use torch's global generator, which `Trainer` seeds and restores on resume."""
    pad = padding_collator(tok, pad_to_multiple_of=pad_to_multiple_of)
    return _DeletionViews(pad, deletion) if deletion > 0.0 else pad


class _DeletionViews:
    """Collates the features and, as `view_*`, copies with a share of their tokens deleted."""

    def __init__(self, pad: Any, deletion: float) -> None:
        self.pad, self.deletion = pad, deletion

    def delete(self, feature: dict[str, Any]) -> dict[str, Any]:
        import torch

        special = feature["special_tokens_mask"]
        inner = [i for i, s in enumerate(special) if not s]
        if len(inner) < 2:
            return {k: feature[k] for k in TOKEN_KEYS if k in feature}
        dropped = torch.rand(len(inner)) < self.deletion
        if bool(dropped.all()):
            dropped[int(torch.randint(len(inner), ()))] = False
        gone = {i for i, d in zip(inner, dropped.tolist(), strict=True) if d}
        return {
            k: [v for i, v in enumerate(feature[k]) if i not in gone]
            for k in TOKEN_KEYS
            if k in feature
        }

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        n = len(features)
        both = self.pad([*features, *[self.delete(f) for f in features]])
        batch = {k: v[:n] for k, v in both.items()}
        batch.update({f"view_{k}": v[n:] for k, v in both.items()})
        return batch


def padding_collator(tok: Any, *, pad_to_multiple_of: int = 8) -> Any:
    from transformers import DataCollatorWithPadding

    return _TokenInputs(DataCollatorWithPadding(tok, pad_to_multiple_of=pad_to_multiple_of))


class _TokenInputs:
    """Pads the token inputs only (a feature's other keys, e.g. the special-tokens mask, dropped)."""

    def __init__(self, pad: Any) -> None:
        self.pad = pad

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return self.pad([{k: f[k] for k in TOKEN_KEYS if k in f} for f in features])


# --------------------------------------------------------------------------- evaluation
def heldout_mlm_loss(
    model: Any, tok: Any, features: list[dict], cfg: Any, *, batch_size: int = 128, seed: int = 1234
) -> float:
    """Mean MLM loss over masked tokens of held-out texts, with masks fixed by `seed`."""
    import torch

    collate = mlm_collator(tok, cfg, seed=seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(features), batch_size):
            batch = collate([dict(f) for f in features[i : i + batch_size]])
            batch.pop("offset_mapping", None)
            labels = batch["labels"]
            n = int(labels.ne(-100).sum())
            if n == 0:
                continue
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**batch, num_items_in_batch=n) if _sparse(model) else model(**batch)
            total += float(out.loss) * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


def heldout_simcse_loss(
    model: Any,
    tok: Any,
    features: list[dict],
    *,
    batch_size: int,
    deletion: float = 0.0,
    seed: int = 1234,
) -> float:
    """The SimCSE loss on held-out texts (dropout views on, deletions as in training, seeded)."""
    import torch

    collate = simcse_collator(tok, deletion=deletion)
    device = next(model.parameters()).device
    was_training = model.training
    model.train()
    torch.manual_seed(seed)
    losses = []
    with torch.no_grad():
        for i in range(0, len(features) - 1, batch_size):
            chunk = features[i : i + batch_size]
            if len(chunk) < 2:
                break
            batch = {k: v.to(device) for k, v in collate(chunk).items()}
            losses.append(float(model(**batch)["loss"]))
    model.train(was_training)
    return sum(losses) / max(len(losses), 1)


def _sparse(model: Any) -> bool:
    return isinstance(model, SparseMLMMixin)


def embed(
    model: Any, tok: Any, texts: Sequence[str], *, max_length: int, batch_size: int = 128
) -> Any:
    """Mean-pooled last hidden states (float32 numpy), batched by length for speed."""
    import numpy as np
    import torch

    encoder = getattr(model, model.base_model_prefix, model)
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    out = np.zeros((len(texts), encoder.config.hidden_size), dtype=np.float32)
    batches = length_sorted_batches(
        tok, texts, max_length=max_length, batch_size=batch_size, device=device
    )
    with torch.no_grad():
        for idx, enc in batches:
            hidden = encoder(**enc)[0]
            out[idx] = pool(hidden, enc["attention_mask"]).float().cpu().numpy()
    encoder.train(was_training)
    return out


def probe(
    train_x: Any,
    train_y: Sequence[str],
    val_x: Any,
    val_y: Sequence[str],
    *,
    methods: Sequence[str],
    k: int,
) -> dict[str, float]:
    """Accuracy of simple classifiers on frozen embeddings: what the encoder makes linearly/locally separable."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores: dict[str, float] = {}
    for method in methods:
        if method == "logreg":
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
        elif method == "knn":
            clf = KNeighborsClassifier(n_neighbors=min(k, len(train_y)), metric="cosine")
        else:
            raise ValueError(f"unknown probe method {method!r}")
        clf.fit(train_x, list(train_y))
        scores[method] = round(float(clf.score(val_x, list(val_y))), 4)
    return scores


def plot_loss(history: list[dict[str, float]], dest: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tunery.io import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4))
    if history:
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
