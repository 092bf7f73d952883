"""Errors that carry a message meant for the user, and the exit codes they map to.

The CLI and the stage entry points turn these into one clear line on stderr and the error's
`exit_code`; anything else is a bug and keeps its traceback (exit 1).

Exit codes (the same for `tunery` and for `python -m tasks.<stage>`):

  0  ok (a gate that keeps the champion is an ok run: the JSON and the summary say so)
  1  failed: a stage, a tool or a service failed at run time (re-running may help)
  2  usage: a bad command line (argparse's own code)
  3  bad config or data: params.yaml, an override or an input file breaks a rule (fix it first)
  4  refused: the registry refused the action (e.g. promoting a gate-rejected version without --force)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_REFUSED = 4

EXIT_CODES = {
    EXIT_OK: "ok",
    EXIT_FAILED: "failed at run time (a stage, a tool or a service)",
    EXIT_USAGE: "usage: bad command line",
    EXIT_INPUT: "bad config or data (params.yaml, an override, an input file)",
    EXIT_REFUSED: "refused by the registry or the gate",
}


class TuneryError(Exception):
    """An error whose message tells the user what is wrong and what to do."""

    exit_code = EXIT_FAILED


class InputError(TuneryError):
    """What the user gave (params, a file, a value) breaks a rule: re-running cannot help."""

    exit_code = EXIT_INPUT


class BadInput(TuneryError):
    """A request or table the predictor cannot score; the message says which rows and why."""


class ConfigError(InputError):
    """`params.yaml` (or an override) does not match the schema."""


class Refused(TuneryError):
    """The registry or the gate refused the action; nothing was changed."""

    exit_code = EXIT_REFUSED


class DataValidationError(InputError):
    """Input data breaks a validation rule.

    `file` and `rule` are always set; `rows` names offending rows (1-based, header excluded) where
    the rule is about rows.
    """

    def __init__(self, file: str, rule: str, detail: str, rows: list[int] | None = None) -> None:
        self.file, self.rule, self.detail, self.rows = str(file), rule, detail, rows or []
        where = self.file
        if self.rows:
            shown = ", ".join(str(r) for r in self.rows[:5])
            more = f" and {len(self.rows) - 5} more" if len(self.rows) > 5 else ""
            where += f": row{'s' if len(self.rows) > 1 else ''} {shown}{more}"
        super().__init__(f"{where}: [{rule}] {detail}")


class FinetuneError(TuneryError):
    """The model, adapter or method cannot be used as configured."""
