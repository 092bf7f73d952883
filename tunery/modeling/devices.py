"""Where fine-tuning runs and what it costs: the device, the precision, the peak memory of a block.

torch is imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

from tunery.errors import FinetuneError

if TYPE_CHECKING:
    from tunery.config import FinetuneConfig


def resolve_device(cfg: FinetuneConfig) -> str:
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("finetune.device is cuda but no CUDA device is available")
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def resolve_precision(cfg: FinetuneConfig, device: str) -> str:
    import torch

    if cfg.precision == "bf16" and device == "cpu":
        raise FinetuneError("finetune.precision bf16 needs a GPU here; use auto or fp32 on CPU")
    if cfg.precision == "auto":
        return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return cfg.precision


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak on a GPU, sampled process RSS on CPU.

    On CPU `peak_mb` is the process's peak resident memory during the block and `delta_mb` its rise
    above the start (what the block itself needed, roughly).
    """

    def __init__(self, device: str, interval_s: float = 0.05) -> None:
        self.device, self.interval_s = device, interval_s
        self.peak_mb = self.delta_mb = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start = self._peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _rss_bytes())
        self.peak_mb = round(peak / 2**20, 1)
        self.delta_mb = round((peak - self._start) / 2**20, 1)
