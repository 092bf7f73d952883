"""What a person sees: Tunery's own lines by default, other tools' chatter only with `-v`.

One owner for the quiet default: the log levels, the other libraries' progress bars and notices,
and which lines of a stage's output (as DVC streams it) reach the screen and Prefect's logs.
Warnings that matter (a stage's WARNING lines, DVC errors, tracebacks) always pass.

`-v` is passed to the stage processes (children of DVC, started by the CLI) through
`TUNERY_VERBOSE`, like every other setting of a run: in the environment.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

VERBOSE_ENV = "TUNERY_VERBOSE"
FLOW_ENV = "TUNERY_UNDER_FLOW"

# DVC's per-stage hints to a git user (we commit nothing for the user: these are advice for a
# workflow that `tunery run` does not follow), and the command line of each stage.
_DVC_HINTS = re.compile(
    r"^\s*$"
    r"|^(Updating|Generating) lock file '.*'$"
    r"|^To track the changes with git, run:$"
    r"|^\tgit add .*$"
    r"|^To enable auto staging, run:$"
    r"|^\tdvc config core\.autostage true$"
    r"|^Use `dvc push` to send your updates to remote storage\.$"
    r"|^> .*$"
)
# Libraries that log progress and notices at INFO on the root logger or their own (onnxruntime's
# quantizer logs ~50 lines per variant on the root logger).
_OTHER_TOOLS_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",  # load reports: we log what was newly initialised
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # "Loading weights", "Writing model shards" bars
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # "Downloading artifacts" on registration
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # read when mlflow configures its logger on import
}
# Advice of a library about its own API that does not apply to how we call it: onnxruntime's
# quantizer suggests its shape pre-processing, which the dynamic variant does not need (static
# int8 runs it).
_LIBRARY_NOTICES = ("Please consider to run pre-processing before quantization",)
# Warnings of libraries about their own internals, not about anything a user did or can change.
_LIBRARY_WARNINGS = (
    (FutureWarning, r".*is_gradient_checkpointing.*"),
    (UserWarning, r".*aten::index operator of advanced indexing.*"),
    # torch's TracerWarnings while the ONNX export traces the model (the export's parity check
    # against PyTorch is what tells whether the trace is right)
    (Warning, r".*might cause the trace to be incorrect.*"),
    # MLflow's suggestion to type-hint `predict`: our pyfunc's signature is explicit
    (UserWarning, r".*Add type hints to the `predict` method.*"),
)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def configure(verbose_flag: bool = False) -> bool:
    """Set this process (and so its children) up for the quiet default or for `-v`; returns
    whether the run is verbose. Call before the libraries are imported where possible."""
    if verbose_flag:
        os.environ[VERBOSE_ENV] = "1"
    loud = verbose()
    if not loud:
        for key, value in _OTHER_TOOLS_ENV.items():
            os.environ.setdefault(key, value)
        for category, message in _LIBRARY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
    return loud


class _NoLibraryNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in _LIBRARY_NOTICES)


def log_levels(loud: bool) -> None:
    """Root at WARNING by default (other libraries' INFO lines), Tunery's loggers at INFO."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if loud else logging.WARNING)
    logging.getLogger("tunery").setLevel(logging.DEBUG if loud else logging.INFO)
    if not loud:
        for handler in root.handlers:
            if not any(isinstance(f, _NoLibraryNotices) for f in handler.filters):
                handler.addFilter(_NoLibraryNotices())


def mark_flow() -> None:
    """Called as the DVC worker starts: the stages it runs have their output forwarded to a logger."""
    os.environ[FLOW_ENV] = "1"


def under_flow() -> bool:
    """Whether this process is a stage run by `tunery run`/`retrain` (its output is forwarded
    line by line to a Prefect task's logger), not by a bare `dvc repro`."""
    return os.environ.get(FLOW_ENV) == "1"


class StageLineFormatter(logging.Formatter):
    """`name: message`, with the level only when it is not INFO: the forwarding logger already
    prints the time and a level, so a stage line would otherwise carry both twice."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.name}: {record.getMessage()}"
        if record.levelno != logging.INFO:
            line = f"{record.levelname} {line}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def shown(line: str) -> bool:
    """Whether a line of a stage's output (streamed by DVC) is shown on the quiet default."""
    return verbose() or not _DVC_HINTS.match(line.rstrip("\n"))
