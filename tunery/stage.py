"""The shared entry point of every stage (`python -m tasks.<stage>`).

It applies the project's offline settings, parses `params.yaml` once, opens the stage's MLflow run,
calls the stage's `run()` and writes its metrics files atomically (tunery/metrics_files.py). A `TuneryError` becomes one
clear line on stderr and its exit code (3 for bad params or data, 1 otherwise: tunery/errors.py),
with no metrics written.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tunery import env, metrics_files
from tunery.config import Params, load_params
from tunery.errors import TuneryError
from tunery.runner import journal

log = logging.getLogger("tunery")

StageBody = Callable[[Params, Path, Any], Mapping[str, Any]]


def setup_logging(verbose: bool = False) -> None:
    """Log lines to stderr; the quiet default or `-v` (tunery/screen.py), inherited by stages."""
    from tunery import screen

    loud = screen.configure(verbose)
    logging.basicConfig(
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if screen.under_flow():  # Prefect's logger adds its own time and level to each line
        for handler in logging.getLogger().handlers:
            handler.setFormatter(screen.StageLineFormatter())
    screen.log_levels(loud)
    for noisy in ("httpx", "httpcore"):  # one line per Prefect API call otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)


def numeric_items(prefix: str, value: Any) -> dict[str, float]:
    """Flatten nested metrics to dotted keys, keeping numbers only (what MLflow accepts)."""
    out: dict[str, float] = {}
    if isinstance(value, Mapping):
        for k, v in value.items():
            out.update(numeric_items(f"{prefix}.{k}" if prefix else str(k), v))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = float(value)
    return out


def log_outputs(
    params: Params, root: Path, stage: str, run: Any, metrics: dict[str, float]
) -> bool:
    """Log the stage's chosen model outputs (the folders its params section declares:
    `Section.OUTPUTS`); the first carries the stage's metrics (linked to it). Whether any was logged."""
    linked = False
    for kind, folder in params.model_outputs(stage).items():
        if kind not in params.tracking.log_models or not (root / folder).is_dir():
            continue
        own = None if linked else metrics
        if kind == "deploy":
            run.log_deployable(
                root / folder, finetune_dir=root / params.finetune.out_dir, metrics=own
            )
        else:
            run.log_model_folder(kind, root / folder, metrics=own)
        linked = True
    return linked


def _module(stage: str) -> str:
    """The stage's module as run (`tasks.vision.pretrain` for the image pipeline's)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", "") or ""
    return name if name.startswith("tasks.") else f"tasks.{stage}"


def stage_main(
    stage: str,
    body: StageBody,
    argv: list[str] | None = None,
    *,
    loader: Callable[..., Any] = load_params,
) -> None:
    """`python -m tasks.<stage>`: parse the params file with `loader` (the text pipeline's
    `load_params`, or the image pipeline's `tunery.vision.params.load_vision_params`), open the
    stage's tracking run, run `body`, write its metrics."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {_module(stage)}", description=f"Run the `{stage}` stage."
    )
    parser.add_argument(
        "-p", "--params", default="params.yaml", help="params file (default: params.yaml)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a param"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    root = env.configure()
    journal_file = journal.journal_path()
    try:
        params = loader(root / args.params, args.set)
        section = params.section(stage)
        if journal_file is not None:
            _run_journaled(stage, body, params, root, section.model_dump(mode="json"), journal_file)
            _exit_if_entry_point(stage)
            return
        from tunery import tracking  # imported late: mlflow costs seconds and the GPU box lacks it

        start = time.perf_counter()
        with tracking.stage_run(
            root, params.tracking.experiment, stage, section.model_dump(mode="json")
        ) as run:
            metrics = _finish(stage, body(params, root, run), start, params, root, run)
        log.info("%s done in %.1f s", stage, metrics["seconds"])
    except TuneryError as exc:
        print(f"tunery {stage}: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    _exit_if_entry_point(stage)


def _exit_if_entry_point(stage: str) -> None:
    """End a successful `python -m tasks.<stage>` process without the interpreter's teardown.

    Freeing every module's objects one by one at exit took 1.9-2.8 s in the stages that import
    torch (export and evaluate, measured on 2 cores; 0.6-0.9 s for `import torch` alone): time
    the user waits for and DVC gets charged for. Everything a stage writes is closed and renamed
    into place before this point, and exit handlers (atexit) still run; only the final module
    teardown is skipped. Only for the process's own entry point: never when a stage's `main` is
    called in-process (tests)."""
    main_module = sys.modules.get("__main__")
    spec = getattr(main_module, "__spec__", None)
    if spec is None or spec.name != f"tasks.{stage}":
        return
    import atexit

    atexit._run_exitfuncs()  # the handlers a normal exit runs (temporary folders, log handlers)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _finish(
    stage: str, result: Mapping[str, Any], start: float, params: Params, root: Path, run: Any
) -> dict[str, Any]:
    """Time, log and write the stage's metrics; log its model folders when asked to."""
    metrics = dict(result)
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    numeric = numeric_items("", metrics)
    if not log_outputs(params, root, stage, run, numeric):
        run.log_metrics(numeric)
    metrics_files.write(root, stage, metrics)
    return metrics


def process_seconds() -> float:
    """How long this process has run: interpreter start-up and imports count.

    On Linux from the kernel's own clocks (start time in clock ticks since boot, and the boot-time
    clock now), precise to 10 ms. psutil's `create_time()` adds the boot time, which /proc gives
    in whole seconds: an error of up to 1 s on every process, which summed over the stages made
    the overhead measurement look smaller than it was."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22: starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        import psutil

        return time.time() - psutil.Process().create_time()


def process_start() -> float:
    """When this process started (epoch seconds)."""
    return time.time() - process_seconds()


def _run_journaled(
    stage: str,
    body: StageBody,
    params: Params,
    root: Path,
    section: Mapping[str, Any],
    journal_file: Path,
) -> None:
    """Run the stage streaming its tracking calls; the pipeline flow applies them live (journal.py)."""
    # The section becomes the child run's params; the run starts when this process did.
    run = journal.JournalRun(
        stage, section, journal.stream_path(journal_file), start=process_start()
    )
    start = time.perf_counter()
    status, error = "FAILED", ""
    try:
        metrics = _finish(stage, body(params, root, run), start, params, root, run)
        status = "FINISHED"
        log.info("%s done in %.1f s", stage, metrics["seconds"])
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        run.write(
            journal_file,
            status=status,
            error=error,
            timing={"seconds": round(time.perf_counter() - start, 3), "process": process_seconds()},
        )
