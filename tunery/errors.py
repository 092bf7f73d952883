"""Errors that carry a message meant for the user.

The CLI and the stage entry points turn these into one clear line on stderr and a non-zero exit;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TuneryError(Exception):
    """An error whose message tells the user what is wrong and what to do."""

    exit_code = 2


class ConfigError(TuneryError):
    """`params.yaml` (or an override) does not match the schema."""


class DataValidationError(TuneryError):
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
