"""Pipeline steps shared by `tunery run` and the Prefect flows: no Prefect import here.

DVC stays the DAG: stages are brought up to date one by one, in `dvc.yaml` order, with
`dvc repro --single-item`, so DVC alone decides what is stale. This module adds what DVC does not
do: the lineage on the MLflow parent run, and the registry step after the stages.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from tunery import metrics_files, orphans
from tunery.errors import EXIT_FAILED, EXIT_INPUT, EXIT_REFUSED, TuneryError

log = logging.getLogger("tunery.pipeline")


def stage_names(root: Path) -> list[str]:
    """The stages of `dvc.yaml`, in the order written there (a valid run order)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text()).get("stages") or {}
    return list(stages)


def tool_env() -> dict[str, str]:
    """This environment with the venv's bin first, so `dvc` and the stages run our `python`."""
    environ = dict(os.environ)
    environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environ.get("PATH", "")])
    return environ


class StageFailed(TuneryError):
    """A stage (or DVC) failed. `user_error` is set when the stage exited 3 or 4 (bad input or
    params, a refusal: `tunery run` exits with that code); `named` when the stage stopped on an
    error it named itself ("tunery <stage>: error: ...", tunery/stage.py), e.g. its MLflow server
    went away (exit 1). The flow retries neither (flows/pipeline.py): the same inputs meet the same
    error, and a stage DVC saw fail on a dead server must not be skipped as done."""

    def __init__(
        self, message: str, *, user_error: bool, named: bool = False, code: int | None = None
    ) -> None:
        super().__init__(message)
        self.user_error, self.named = user_error, named
        self.exit_code = code if code is not None else EXIT_INPUT if user_error else EXIT_FAILED


# DVC's last line for a stage command that failed: "... failed to run: python -m tasks.X, exited with N".
_STAGE_EXIT = re.compile(r"failed to run: .*, exited with (-?\d+)")


def stage_exit_code(lines: list[str]) -> int | None:
    """The exit code of the stage command DVC ran, from DVC's error line; None when DVC itself failed."""
    for line in reversed(lines):
        found = _STAGE_EXIT.search(line)
        if found:
            return int(found.group(1))
    return None


def _finish(argv: tuple[str, ...], code: int, lines: list[str]) -> str:
    if code != 0:
        tail = "".join(lines[-15:])
        # The stage's own exit code says what kind of failure it was (tunery/errors.py): a stage
        # whose MLflow server went away names it and exits 1 (run time), not 3 (bad input).
        stage_code = stage_exit_code(lines)
        user_error = stage_code in (EXIT_INPUT, EXIT_REFUSED)
        raise StageFailed(
            f"`dvc {' '.join(argv)}` failed (exit {code}):\n{tail}",
            user_error=user_error,
            named=any(line.startswith("tunery ") and ": error: " in line for line in lines),
            code=stage_code if user_error else EXIT_FAILED,
        )
    return "".join(lines)


def _print(text: str) -> None:
    print(text, end="", flush=True)


def dvc_command(
    root: Path,
    *argv: str,
    on_line: Callable[[str], None] | None = None,
    extra_env: dict[str, str] | None = None,
) -> str:
    """Run `dvc ARGV...` in the project, streaming its output line by line; raise on failure.

    Through the project's DVC worker when one is running (`start_dvc_worker`), else as a process.
    """
    worker = _WORKERS.get(root.resolve())
    if worker is not None:
        code, lines = worker.run(argv, extra_env or {}, on_line or _print)
        return _finish(argv, code, lines)
    exe = shutil.which("dvc", path=tool_env()["PATH"])
    if exe is None:
        raise TuneryError("`dvc` is not installed in this environment; run `make setup`")
    proc = subprocess.Popen(
        [exe, *argv],
        cwd=root,
        env={**tool_env(), **(extra_env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    lines = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.append(line)
            (on_line or _print)(line)
    except BaseException:  # a timeout or Ctrl-C while streaming: do not leave DVC running
        proc.kill()
        raise
    return _finish(argv, proc.wait(), lines)


class DvcWorker:
    """One `python -m tunery.runner.dvc_worker` process for a project: DVC imported once, commands run
    one at a time through `dvc.cli.main` (see tunery/runner/dvc_worker.py for why and the protocol)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._ready = False
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "tunery.runner.dvc_worker"],
            cwd=root,
            env=orphans.child_env(tool_env()),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,  # Ctrl-C reaches us; `close` stops the worker and its stage
        )

    def _read_until_sentinel(self, on_line: Callable[[str], None]) -> tuple[str, list[str]]:
        from tunery.runner.dvc_worker import SENTINEL

        assert self.proc.stdout is not None
        lines: list[str] = []
        for line in self.proc.stdout:
            if line.startswith(SENTINEL):
                return line[len(SENTINEL) :].strip(), lines
            lines.append(line)
            on_line(line)
        raise TuneryError(
            f"the DVC worker exited (code {self.proc.wait()}) before finishing; output:\n"
            + "".join(lines[-15:])
        )

    def run(
        self, argv: tuple[str, ...], extra_env: dict[str, str], on_line: Callable[[str], None]
    ) -> tuple[int, list[str]]:
        with self._lock:
            try:
                if not self._ready:
                    self._read_until_sentinel(on_line)  # DVC imported
                    self._ready = True
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"argv": list(argv), "env": extra_env}) + "\n")
                self.proc.stdin.flush()
                code, lines = self._read_until_sentinel(on_line)
                return int(code), lines
            except BaseException:  # a timeout, Ctrl-C or a dead worker: stop it and the stage
                self.close(kill=True)
                raise

    def close(self, *, kill: bool = False) -> None:
        if _WORKERS.get(self.root) is self:
            del _WORKERS[self.root]
        if self.proc.poll() is not None:
            return
        if not kill and self.proc.stdin is not None:
            self.proc.stdin.close()  # the worker ends at end of input
            try:
                self.proc.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the worker and the stage it runs
        self.proc.wait()


_WORKERS: dict[Path, DvcWorker] = {}


def start_dvc_worker(root: Path) -> DvcWorker:
    """The project's DVC worker, started if needed (its DVC import runs in the background)."""
    root = root.resolve()
    worker = _WORKERS.get(root)
    if worker is None or worker.proc.poll() is not None:
        from tunery import screen

        screen.mark_flow()  # its stages' output is forwarded line by line to a logger
        worker = _WORKERS[root] = DvcWorker(root)
    return worker


@contextlib.contextmanager
def dvc_worker(root: Path) -> Iterator[DvcWorker]:
    """`start_dvc_worker` for the duration of a block; the worker is stopped at its end."""
    worker = start_dvc_worker(root)
    try:
        yield worker
    finally:
        worker.close()


@atexit.register
def _stop_workers() -> None:
    for worker in list(_WORKERS.values()):
        worker.close()


def repro_stage(
    root: Path,
    stage: str,
    *,
    force: bool = False,
    on_line: Callable[[str], None] | None = None,
    extra_env: dict[str, str] | None = None,
) -> bool:
    """Bring one stage up to date; return whether it actually ran."""
    out = dvc_command(
        root,
        "repro",
        "--single-item",
        *(["--force"] if force else []),
        stage,
        on_line=on_line,
        extra_env=extra_env,
    )
    return f"Running stage '{stage}'" in out


JOURNAL_DIR = ".cache/tunery/journal"


@dataclasses.dataclass
class StageTiming:
    """Where one stage's wall time went: the stage process itself, DVC around it, tracking."""

    stage: str
    ran: bool
    seconds: float = 0.0  # the stage body (metrics/<stage>.json "seconds")
    process: float = 0.0  # the stage process, interpreter start-up and imports included
    dvc: float = 0.0  # `dvc repro` wall time minus the stage process
    tracking: float = 0.0  # applying the rest of the stage's journal after it ended


def run_stage(
    root: Path,
    stage: str,
    *,
    experiment: str,
    force: bool = False,
    on_line: Callable[[str], None] | None = None,
) -> StageTiming:
    """`repro_stage` with streamed tracking: the stage writes its tracking calls to a journal
    (tunery/runner/journal.py) that a thread here applies, while the stage runs, to a child of the active
    pipeline run; each stage process is spared the import of mlflow and the opening of the store."""
    from tunery.runner import journal

    path = root / JOURNAL_DIR / f"{stage}.json"
    stream = journal.stream_path(path)
    path.unlink(missing_ok=True)
    stream.unlink(missing_ok=True)
    live = LiveStageRun(root, experiment, stream)
    live.start()
    start = time.perf_counter()
    failure: StageFailed | None = None
    try:
        ran = repro_stage(
            root,
            stage,
            force=force,
            on_line=on_line,
            extra_env={journal.JOURNAL_ENV: str(path.resolve())},
        )
    except StageFailed as exc:
        ran, failure = True, exc
    finally:
        wall = time.perf_counter() - start
        t0 = time.perf_counter()
        live.finish()  # the calls the stage made last (its outputs, its final metrics)
        drained = time.perf_counter() - t0
    timing = StageTiming(stage, ran, dvc=wall, tracking=drained)
    if path.is_file():
        data = journal.read(path)
        timing.seconds = float(data["timing"].get("seconds", 0.0))
        timing.process = float(data["timing"].get("process", 0.0))
        timing.dvc = max(wall - timing.process, 0.0)
        path.unlink()
    stream.unlink(missing_ok=True)
    if failure is not None:
        raise failure
    if live.error is not None:
        raise live.error
    return timing


class LiveStageRun(threading.Thread):
    """Follows a stage's journal stream and applies it to the stage's MLflow child run as it
    grows: the run opens at the stage's start time on its first line, metrics arrive with their
    own times (live curves in the UI), and it closes at the stage's end time with its status.

    MLflow's active run is per thread, so this thread's child run never touches the flow's
    pipeline run. A stage that DVC skipped writes nothing: no run. One that died without its
    last line is closed FAILED.
    """

    POLL_S = 1.0

    def __init__(self, root: Path, experiment: str, stream: Path) -> None:
        super().__init__(name=f"tunery-tracking-{stream.stem}", daemon=True)
        self.root, self.experiment, self.stream = root, experiment, stream
        self._done = threading.Event()
        self._run: Any = None
        self._ended = False
        self.error: BaseException | None = None

    def finish(self, timeout: float = 600.0) -> None:
        self._done.set()
        self.join(timeout)

    def run(self) -> None:
        from tunery.runner.journal import read_stream

        offset = 0
        try:
            while True:
                last = self._done.is_set()  # read once more after the stage ended
                records, offset = read_stream(self.stream, offset)
                for record in records:
                    self._apply(record)
                if last:
                    break
                self._done.wait(self.POLL_S)
            if self._run is not None and not self._ended:
                self._close("FAILED", time.time(), "the stage ended without closing its journal")
        except BaseException as exc:  # raised by run_stage in the flow's thread
            self.error = exc

    def _apply(self, record: dict[str, Any]) -> None:
        from tunery import tracking
        from tunery.runner import journal

        method = record["method"]
        if method == journal.START:
            self._run = tracking.open_stage_run(
                self.root, self.experiment, record["stage"], record["params"], start=record["t"]
            )
        elif method == journal.END:
            self._close(record["status"], record["t"], record.get("error", ""))
        elif self._run is not None:
            journal.apply(record, self._run)

    def _close(self, status: str, end: float, error: str) -> None:
        from tunery import tracking

        if status != "FINISHED":
            self._run.set_tags({"tunery.error": error[:5000]})
        tracking.close_run(self._run, status, end=end)
        self._ended = True


def _git(root: Path, *argv: str) -> str:
    """A git command's output in `root`; empty when git is missing or fails (not a repository)."""
    try:
        return subprocess.run(
            ["git", *argv], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def git_state(root: Path) -> dict[str, str]:
    commit = _git(root, "rev-parse", "HEAD")
    dirty = bool(_git(root, "status", "--porcelain"))
    return {"git.commit": commit or "unknown", "git.dirty": str(dirty)}


def data_version(root: Path, labelled_path: str) -> str | None:
    """The md5 DVC recorded for the raw dataset in `dvc.lock` (None before the first ingest)."""
    lock_file = root / "dvc.lock"
    if not lock_file.is_file():
        return None
    stages = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {})
    for out in stages.get("ingest", {}).get("outs", []):
        if out.get("path") == labelled_path:
            return out.get("md5")
    return None


def log_lineage(root: Path, run: Any, labelled_path: str) -> dict[str, Any]:
    """params.yaml, dvc.lock, the git commit and the data version, on the pipeline's parent run."""
    tags = git_state(root)
    version = data_version(root, labelled_path)
    if version:
        tags["data_version"] = version
        rows = (metrics_files.read(root, "ingest") or {}).get("rows")
        run.log_dataset(
            name="raw",
            digest=version,
            source=labelled_path,
            context="training",
            profile={"rows": rows},
        )
    run.set_tags(tags)
    for name in ("params.yaml", "dvc.yaml", "dvc.lock"):
        if (root / name).is_file():
            run.log_artifact(root / name, "lineage")
    return tags
