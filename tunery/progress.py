"""Progress of long work as log lines: done/total, percent, rate and ETA, throttled.

Why lines and not a redrawn tqdm bar: a stage's output is a pipe (the stage → DVC → the Prefect
task's logger → the terminal and Prefect's database), where every redraw of a bar becomes a line
of its own (hundreds per stage) and carriage returns garble the UI's log view. One line per 10 %
(and at least one every `heartbeat` seconds while it runs) reads the same in both places. The
formatting of times is tqdm's (`tqdm.format_interval`).

    p = Progress("finetune lora/base", total=188, unit="step")
    for i in ...: p.update(i + 1)
    # finetune lora/base:  40 % 76/188 steps, 2.31 steps/s, elapsed 0:33, ETA 0:48
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("tunery.progress")


def _interval(seconds: float) -> str:
    from tqdm import tqdm

    return tqdm.format_interval(max(0.0, seconds))


class Progress:
    """Throttled progress lines for `total` units of work (`start`: units already done, e.g. on a
    resume; rate and ETA count only the work done here)."""

    def __init__(
        self,
        what: str,
        total: int,
        *,
        unit: str = "step",
        start: int = 0,
        every: float = 0.1,
        heartbeat: float = 60.0,
        logger: logging.Logger = log,
    ) -> None:
        self.what, self.total, self.unit, self.start = what, max(int(total), 0), unit, start
        self.every, self.heartbeat, self.logger = every, heartbeat, logger
        self.done = start
        self.note = ""  # appended to each line (e.g. the latest loss)
        self._t0 = self._last_time = time.monotonic()
        self._last_bucket = self._bucket(start)

    def _bucket(self, done: int) -> int:
        # integer arithmetic: 60/100/0.1 is 5.999... in floats
        return done * round(1 / self.every) // self.total if self.total else 0

    def line(self, done: int, now: float) -> str:
        elapsed = now - self._t0
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        pct = 100 * done / self.total if self.total else 100.0
        eta = (self.total - done) / rate if rate > 0 else None
        return (
            f"{self.what}: {pct:3.0f} % {done}/{self.total} {self.unit}s, "
            f"{rate:.3g} {self.unit}s/s, elapsed {_interval(elapsed)}"
            + (f", ETA {_interval(eta)}" if eta is not None and done < self.total else "")
            + (f", {self.note}" if self.note else "")
        )

    def update(self, done: int) -> None:
        """Record that `done` units are finished; log a line when a 10 % step is crossed, the
        heartbeat is due, or the work is complete."""
        self.done = min(int(done), self.total) if self.total else int(done)
        now = time.monotonic()
        bucket = self._bucket(self.done)
        if bucket > self._last_bucket or now - self._last_time >= self.heartbeat:
            self._last_bucket, self._last_time = bucket, now
            self.logger.info(self.line(self.done, now))
