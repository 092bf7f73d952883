"""The module the ONNX exporter traces: a classifier's logits from positional inputs.

torch is imported at module level: `tunery.onnx.export.export_onnx` imports this inside itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class Logits(torch.nn.Module):
    """transformers' forward takes its inputs by keyword; the exporter passes them by position."""

    def __init__(self, inner: Any, names: Sequence[str]) -> None:
        super().__init__()
        self.inner = inner
        self.names = list(names)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.inner(**dict(zip(self.names, args, strict=True))).logits
