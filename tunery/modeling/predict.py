"""Predictions from a PyTorch classifier, and a finetune output loaded to predict.

The ONNX side (what is deployed and served) is `tunery.onnx.runtime`; this is the reference it is
checked against, and what scores the arms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunery.errors import FinetuneError
from tunery.modeling import finetune_dir
from tunery.modeling.methods import load_base, quiet_transformers
from tunery.modeling.training import fingerprint_files as fingerprint
from tunery.modeling.training import length_sorted_batches, model_files


def predict_proba(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int = 128,
    device: str | None = None,
) -> Any:
    """Class probabilities (n, classes) as float32 numpy, batched by length for little padding."""
    import numpy as np
    import torch

    device = device or next(model.parameters()).device.type
    model.to(device).eval()
    out = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    batches = length_sorted_batches(
        tokenizer, texts, max_length=max_length, batch_size=batch_size, device=device
    )
    with torch.inference_mode():
        for idx, batch in batches:
            logits = model(**batch).logits.float()
            out[idx] = torch.softmax(logits, -1).cpu().numpy()
    return out


def logits_on(model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int) -> Any:
    import torch

    model.eval()
    device = next(model.parameters()).device
    batch = tokenizer(
        list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    ).to(device)
    with torch.inference_mode():
        return model(**batch).logits.float().cpu()


@dataclass
class LoadedClassifier:
    model: Any
    tokenizer: Any
    labels: list[str]
    info: dict[str, Any]

    def predict_proba(self, texts: Sequence[str], *, batch_size: int = 128) -> Any:
        return predict_proba(
            self.model,
            self.tokenizer,
            texts,
            max_length=int(self.info.get("max_length", 128)),
            batch_size=batch_size,
        )


def load_classifier(model_dir: Path, *, device: str = "cpu") -> LoadedClassifier:
    """A finetune output ready to predict: `merged/` when there is one, else encoder + adapter."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    quiet_transformers()
    model_dir = Path(model_dir)
    info = finetune_dir.read_info(model_dir)
    labels = finetune_dir.labels(model_dir)
    merged = model_dir / finetune_dir.MERGED_DIR
    if merged.is_dir():
        model = AutoModelForSequenceClassification.from_pretrained(merged)
        tokenizer = AutoTokenizer.from_pretrained(merged)
    else:
        model = _adapter_model(model_dir, info, labels)
        tokenizer = AutoTokenizer.from_pretrained(model_dir / finetune_dir.ADAPTER_DIR)
    if model.config.num_labels != len(labels):
        raise FinetuneError(
            f"{model_dir}: the model has {model.config.num_labels} classes but "
            f"{finetune_dir.LABELS_FILE} lists {len(labels)}"
        )
    model.to(device).eval()
    return LoadedClassifier(model=model, tokenizer=tokenizer, labels=labels, info=info)


def _adapter_model(model_dir: Path, info: dict[str, Any], labels: list[str]) -> Any:
    """The encoder the adapter was trained on (checked by fingerprint) with the adapter on it."""
    from peft import PeftModel

    encoder = Path(info["encoder"])
    want = info.get("encoder_fingerprint")
    if want and fingerprint({}, model_files(encoder)) != want:
        raise FinetuneError(
            f"{model_dir}: the adapter does not match the encoder at {encoder} "
            "(the encoder changed since this fine-tune; re-run finetune)"
        )
    base, _ = load_base(encoder, labels)
    try:
        return PeftModel.from_pretrained(base, str(model_dir / finetune_dir.ADAPTER_DIR))
    except (ValueError, RuntimeError) as exc:
        raise FinetuneError(f"{model_dir}: the adapter does not match the encoder: {exc}") from None
