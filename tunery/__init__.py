"""Tunery: keep a fine-tuned transformer fresh, from versioned data to a served, compressed model."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Predictor", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: `import tunery` stays cheap (no transformers/onnxruntime until a Predictor is asked for).
    if name == "Predictor":
        from tunery.onnx.runtime import Predictor

        return Predictor
    raise AttributeError(f"module 'tunery' has no attribute {name!r}")
