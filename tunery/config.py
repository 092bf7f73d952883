"""Typed view of `params.yaml`: parsed once into frozen pydantic models.

Every section is named like the stage that reads it (`ingest:` -> `IngestConfig` -> `tasks/ingest.py`).
Unknown keys and wrong types fail with the key path and what was expected, before any work starts.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunery.errors import ConfigError

PARAMS_FILE = "params.yaml"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- tracking
class TrackingConfig(Section):
    experiment: str = "tunery"


# --------------------------------------------------------------------------- ingest
class WordnetSource(Section):
    """The built-in demo source: WordNet noun glosses labelled by lexicographer category."""

    kind: Literal["wordnet"] = "wordnet"
    path: str = "/usr/share/wordnet"
    categories: list[str] = Field(min_length=2)
    max_per_class: int = Field(gt=0)
    include_examples: bool = False
    # Glosses not used as labelled examples (other categories, beyond the cap, other parts of
    # speech) feed the unlabelled pretraining corpus, up to this many.
    unlabelled_max: int = Field(default=20000, ge=0)


class FilesSource(Section):
    """User data: a CSV, JSONL or Parquet file, or a folder of them."""

    kind: Literal["files"] = "files"
    path: str
    text_column: str = "text"
    label_column: str = "label"
    # Optional plain-text files (one text per line), or a folder of .txt files, for pretraining.
    unlabelled_path: str | None = None


class IngestConfig(Section):
    source: Annotated[WordnetSource | FilesSource, Field(discriminator="kind")]
    # Labelled files dropped here (or added with `tunery data add`) are appended on the next run.
    incoming: str = "data/incoming"
    labels: list[str] | None = None  # the declared label set; None accepts any label
    min_per_class: int = Field(default=10, ge=1)
    max_text_chars: int = Field(default=2000, gt=0)
    duplicates: Literal["drop", "reject"] = "drop"
    out_dir: str = "data/raw"


# --------------------------------------------------------------------------- prepare
class SplitFractions(Section):
    val: float = Field(ge=0.0, lt=1.0)
    test: float = Field(gt=0.0, lt=1.0)
    holdout: float = Field(gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _leave_room_for_train(self) -> SplitFractions:
        if self.val + self.test + self.holdout >= 0.9:
            raise ValueError("val + test + holdout must leave at least 10 % for train")
        return self


class PrepareConfig(Section):
    # Salt of the split hash: changing it reshuffles every split (and so invalidates comparisons).
    split_salt: str = "tunery-v1"
    fractions: SplitFractions
    # Rows appended after the first data version never enter the holdout (they go to test), so
    # every model ever trained is scored on the very same holdout.
    freeze_holdout: bool = True
    out_dir: str = "data/prepared"


# --------------------------------------------------------------------------- root
class Params(Section):
    tracking: TrackingConfig = TrackingConfig()
    ingest: IngestConfig
    prepare: PrepareConfig

    def section(self, name: str) -> Section:
        return getattr(self, name)


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} invalid setting(s):"]
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"])
        got = err.get("input")
        shown = "" if err["type"] in ("missing", "extra_forbidden") else f" (got {got!r})"
        if err["type"] == "extra_forbidden":
            msg = "unknown key (typo? see the documented keys in params.yaml)"
        else:
            msg = err["msg"]
        lines.append(f"  {path}: {msg}{shown}")
    return "\n".join(lines)


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is not a section")
        node = child
    # YAML parsing gives `--set finetune.lr=3.0e-4` a float and `--set a.b=[x, y]` a list.
    node[parts[-1]] = yaml.safe_load(raw)


def load_raw(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: file not found (run from the project root or pass -p)"
        ) from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return tree


def load_params(path: str | Path = PARAMS_FILE, overrides: Iterable[str] = ()) -> Params:
    """Parse and validate `params.yaml` (plus `section.key=value` overrides) into `Params`."""
    tree = load_raw(Path(path))
    overrides = list(overrides)
    for assignment in overrides:
        _apply_override(tree, assignment)
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        source = str(path) + (" (with --set overrides)" if overrides else "")
        raise ConfigError(_format_errors(exc, source)) from None
