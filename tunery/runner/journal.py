"""Streamed stage tracking: a stage run by the pipeline flow writes its MLflow calls to a journal.

Every stage process would pay about three seconds to import mlflow and open the store before it
logs a single number. Under `tunery run` the flow process already has both, so the stage appends
what it would have logged (params, metrics with steps and times, tags, artifacts, models,
datasets) as JSON lines to `<journal>.jsonl`, flushed line by line, and the flow applies them to
the stage's child run *while the stage runs* (`tunery.runner.steps.LiveStageRun`): curves are live in
the MLflow UI, and the run starts and ends at the stage's own times. Plain `dvc repro` sets no
journal: stages then log directly.

On success and on failure (with the error) the stream ends with an `_end` line, and the timing
summary is written atomically to `<journal>` (the .json the flow reads for its overhead table).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunery.io import write_json

JOURNAL_ENV = "TUNERY_TRACKING_JOURNAL"
FORMAT = "tunery-journal/2"
START, END = "_start", "_end"  # the first and last lines of a stream


def journal_path() -> Path | None:
    value = os.environ.get(JOURNAL_ENV)
    return Path(value) if value else None


def stream_path(path: Path) -> Path:
    return Path(path).with_suffix(".jsonl")


class JournalRun:
    """The `tracking.Run` methods stage code calls, streamed to a journal instead of MLflow."""

    def __init__(
        self, stage: str, params: Mapping[str, Any], stream: Path, *, start: float
    ) -> None:
        self.stage = stage
        self.params = dict(params)
        self.stream = Path(stream)
        self.stream.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(self.stream, "w", encoding="utf-8")  # noqa: SIM115 - closed in write()
        self._line({"method": START, "t": start, "stage": stage, "params": self.params})

    def _line(self, record: Mapping[str, Any]) -> None:
        self._out.write(json.dumps(record, default=str) + "\n")
        self._out.flush()  # the flow reads it while the stage runs

    def _record(self, method: str, **kwargs: Any) -> None:
        self._line({"method": method, "t": time.time(), **kwargs})

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._record("log_params", params=dict(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        # Recorded as given; `tracking.Run.log_metrics` keeps the numbers when it is replayed.
        self._record(
            "log_metrics", metrics=json.loads(json.dumps(dict(metrics), default=str)), step=step
        )

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._record("set_tags", tags={k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        # Absolute: the flow replays from the project root, the stage may have another cwd.
        self._record("log_artifact", path=str(Path(path).resolve()), artifact_path=artifact_path)

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        self._record("log_dict", data=json.loads(json.dumps(dict(data), default=str)), name=name)

    def log_model_folder(
        self, kind: str, path: str | Path, *, metrics: Mapping[str, float] | None = None
    ) -> None:
        self._record("log_model_folder", kind=kind, path=str(Path(path).resolve()), metrics=metrics)

    def log_deployable(
        self,
        path: str | Path,
        *,
        finetune_dir: str | Path | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        self._record(
            "log_deployable",
            path=str(Path(path).resolve()),
            finetune_dir=str(Path(finetune_dir).resolve()) if finetune_dir else None,
            metrics=metrics,
        )

    def log_dataset(
        self, *, name: str, digest: str, source: str, context: str, profile: Mapping[str, Any]
    ) -> None:
        self._record(
            "log_dataset",
            name=name,
            digest=digest,
            source=source,
            context=context,
            profile=dict(profile),
        )

    def write(
        self, path: Path, *, status: str, timing: Mapping[str, float], error: str = ""
    ) -> None:
        self._line({"method": END, "t": time.time(), "status": status, "error": error})
        self._out.close()
        write_json(
            path,
            {"format": FORMAT, "stage": self.stage, "status": status, "timing": dict(timing)},
        )


def read(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} journal")
    return data


def read_stream(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The complete lines of a stream from byte `offset` on, and the offset after them."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return [], offset
    end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next read
    lines = chunk[:end].decode("utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()], offset + end


def apply(record: Mapping[str, Any], run: Any) -> None:
    """Apply one streamed call to a real `tracking.Run` (metrics keep their original time)."""
    kwargs = {k: v for k, v in record.items() if k not in ("method", "t")}
    if record["method"] == "log_metrics":
        kwargs["timestamp"] = int(record["t"] * 1000)
    getattr(run, record["method"])(**kwargs)
