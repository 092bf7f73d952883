"""`models:/` references: the one module that builds and parses them.

models:/NAME@ALIAS      a registered model's alias (`champion`)
models:/NAME/VERSION    a registered version
models:/m-<id>          an MLflow LoggedModel (what a version's `source` points at)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunery.errors import TuneryError

if TYPE_CHECKING:
    from tunery.config import Params

SCHEME = "models:/"
CHAMPION, CHALLENGER = "champion", "challenger"
REGISTRY_FILE = "registry.json"  # written beside a model downloaded from the MLflow registry


@dataclass(frozen=True)
class Registry:
    """Which registry a command acts on: the project (its store), the model name, the experiment
    that keeps the promotion log. Built once from params (`of`) and passed down."""

    root: Path
    name: str
    experiment: str

    @classmethod
    def of(cls, params: Params, root: Path) -> Registry:
        return cls(Path(root), params.registry.model_name, params.tracking.experiment)

    def version_uri(self, version: str | int) -> str:
        return version_uri(self.name, version)

    def alias_uri(self, alias: str = CHAMPION) -> str:
        return alias_uri(self.name, alias)


@dataclass(frozen=True)
class ModelRef:
    """A parsed registry reference: `name` with exactly one of `version` or `alias`."""

    name: str
    version: str | None = None
    alias: str | None = None

    @property
    def uri(self) -> str:
        return (
            alias_uri(self.name, self.alias) if self.alias else version_uri(self.name, self.version)
        )


def is_ref(text: str | None) -> bool:
    return bool(text) and str(text).startswith(SCHEME)


def version_uri(name: str, version: str | int) -> str:
    return f"{SCHEME}{name}/{version}"


def alias_uri(name: str, alias: str) -> str:
    return f"{SCHEME}{name}@{alias}"


def logged_model_uri(model_id: str) -> str:
    return f"{SCHEME}{model_id}"


def parse(uri: str) -> ModelRef:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION`; anything else is an error naming it."""
    ref = uri.removeprefix(SCHEME)
    if is_ref(uri) and "@" in ref:
        name, alias = ref.split("@", 1)
        return ModelRef(name=name, alias=alias)
    if is_ref(uri) and "/" in ref:
        name, version = ref.rsplit("/", 1)
        return ModelRef(name=name, version=version)
    raise TuneryError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")


def logged_model_id(source: str) -> str | None:
    """The LoggedModel id of a version's `source` (`models:/m-...`), or None for another source."""
    ref = source.removeprefix(SCHEME)
    return ref if source.startswith(f"{SCHEME}m-") and "/" not in ref else None


def version_of(uri: str, name: str) -> str | None:
    """The version of `name` that `uri` names (`models:/NAME/VERSION`), else None."""
    prefix = f"{SCHEME}{name}/"
    return uri.removeprefix(prefix) if uri.startswith(prefix) else None
