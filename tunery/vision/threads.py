"""CPU threading for the image stages: OpenMP threads that sleep instead of spinning.

Measured on this project's 2-core machine shared with other jobs (load average 5-6): one SimCLR
step (2 x 256 views, the demo's ViT) took 2,036 ms wall and 1,142 ms CPU with torch's 2 OpenMP
threads under the default wait policy, 454 ms wall / 233 ms CPU with 1 thread, and 612-801 ms
wall / 287-296 ms CPU with 2 threads under `OMP_WAIT_POLICY=PASSIVE`. With the default policy a
thread that finishes its share of an op spins until the other one (descheduled by a neighbour's
job) catches up, so every one of the model's hundreds of small ops per step waits on the
slowest thread and burns the core the other job needed; the fine-tune arms (64 images a step,
even smaller ops) were hit hardest (~1.5 s a step). Passive waiting keeps both threads for a
quiet machine and costs little on a loaded one.

libgomp reads the variable once, when torch loads it, so `passive_omp()` runs in a stage's
`main` before anything imports torch; an explicit `OMP_WAIT_POLICY` (or a later call, after
torch is loaded, as in tests) is left alone.
"""

from __future__ import annotations

import os
import sys


def passive_omp() -> bool:
    """Set `OMP_WAIT_POLICY=PASSIVE` unless it is set or torch is already loaded; True if set."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
