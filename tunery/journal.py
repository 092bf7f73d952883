"""Deferred stage tracking: a stage run by the pipeline flow records its MLflow calls in a journal.

Every stage process pays about three seconds to import mlflow and open the store before it logs a
single number. Under `tunery run` the flow process already has both, so the stage writes what it
would have logged (params, metrics with steps, tags, artifact paths, dicts, datasets) to a JSON
journal named by `TUNERY_TRACKING_JOURNAL`, and the flow replays it into the stage's child run
(`tunery.pipeline.replay_journal`) right after `dvc repro` returns, while the stage's outputs are
exactly what the stage wrote. Plain `dvc repro` sets no journal: stages then log directly.

The journal is written atomically on success and on failure (with the error), so a failed stage
still shows up in MLflow as a FAILED child run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunery.io import write_json

JOURNAL_ENV = "TUNERY_TRACKING_JOURNAL"
FORMAT = "tunery-journal/1"


def journal_path() -> Path | None:
    value = os.environ.get(JOURNAL_ENV)
    return Path(value) if value else None


class JournalRun:
    """The `tracking.Run` methods stage code calls, recorded instead of sent to MLflow."""

    def __init__(self, stage: str, params: Mapping[str, Any]) -> None:
        self.stage = stage
        self.params = dict(params)
        self.calls: list[dict[str, Any]] = []

    def _record(self, method: str, **kwargs: Any) -> None:
        self.calls.append({"method": method, **kwargs})

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
        write_json(
            path,
            {
                "format": FORMAT,
                "stage": self.stage,
                "status": status,
                "error": error,
                "params": self.params,
                "timing": dict(timing),
                "calls": self.calls,
            },
        )


def read(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} journal")
    return data


def replay(data: Mapping[str, Any], run: Any) -> None:
    """Apply the recorded calls to a real `tracking.Run`."""
    for call in data["calls"]:
        kwargs = {k: v for k, v in call.items() if k != "method"}
        getattr(run, call["method"])(**kwargs)
