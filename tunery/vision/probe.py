"""What an encoder learned, without training it: a linear probe on frozen embeddings.

SimCLR's own yardstick (Chen et al., 2020, section 4): logistic regression on the frozen,
pooled representation. Comparing a SimCLR-pretrained encoder with the same architecture at its
random initialisation separates what pretraining taught from what a random ViT's patch
projection already gives (a random ViT is a decent random-features model on small images).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tunery.vision.vit import encoder_of, pool


def embed(model: Any, pixel_values: Any, *, pooling: str = "mean", batch_size: int = 512) -> Any:
    """Pooled last hidden states (float32 numpy `[N, hidden]`) of `model`'s ViT encoder."""
    import numpy as np
    import torch

    encoder = encoder_of(model)
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(pixel_values), batch_size):
            batch = pixel_values[start : start + batch_size].to(device)
            hidden = encoder(pixel_values=batch).last_hidden_state
            chunks.append(pool(hidden, pooling).float().cpu().numpy())
    encoder.train(was_training)
    width = encoder.config.hidden_size
    return np.concatenate(chunks) if chunks else np.zeros((0, width), dtype=np.float32)


def logreg_accuracy(
    train_x: Any, train_y: Sequence[int], test_x: Any, test_y: Sequence[int], *, c: float = 1.0
) -> float:
    """Test accuracy of a standardised logistic regression fitted on (train_x, train_y)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=c))
    clf.fit(train_x, list(train_y))
    return round(float(clf.score(test_x, list(test_y))), 4)


def probe(
    encoders: Mapping[str, Any],
    train_pixels: Any,
    train_y: Sequence[int],
    test_pixels: Any,
    test_y: Sequence[int],
    *,
    pooling: str = "mean",
) -> dict[str, float]:
    """Probe accuracy per named encoder (e.g. {"simclr": ..., "random": ...}), same data each."""
    scores = {}
    for name, model in encoders.items():
        train_x = embed(model, train_pixels, pooling=pooling)
        test_x = embed(model, test_pixels, pooling=pooling)
        scores[name] = logreg_accuracy(train_x, train_y, test_x, test_y)
    return scores


def pixel_baseline(
    train_pixels: Any, train_y: Sequence[int], test_pixels: Any, test_y: Sequence[int]
) -> float:
    """The same logistic regression on raw pixels: the floor an encoder has to clear."""
    flat = train_pixels.reshape(len(train_pixels), -1).numpy()
    test_flat = test_pixels.reshape(len(test_pixels), -1).numpy()
    return logreg_accuracy(flat, train_y, test_flat, test_y)
