"""The pretraining snapshot and its policy: the one owner of both pipelines' `corpus` stage decision.

A pipeline's `pretrain` stage depends on a snapshot of its pretraining inputs (files copied from
the stages before it), not on those stages' outputs. `refresh` compares the current inputs with the
snapshot by their keys (the text pipeline: the corpus texts; the image pipeline: the pool's image
content hashes) and copies them over only when `corpus.pretrain_policy` says so:

  always            whenever a key was added or removed
  never             the first snapshot is kept
  on_corpus_change  when the share of keys added or removed exceeds `change_threshold`

DVC sees an unchanged snapshot and skips `pretrain`; `dvc.lock` records the snapshot's hashes, so it
says which inputs the encoder was trained on. The snapshot files are `persist: true` outputs in
`dvc.yaml` (DVC keeps them between runs for this comparison).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunery.errors import DataValidationError
from tunery.io import atomic_path

log = logging.getLogger("tunery.corpus")


def change_share(old: Iterable[Any], new: Iterable[Any]) -> float:
    """Share of keys added or removed, relative to the old snapshot (symmetric difference)."""
    a, b = set(old), set(new)
    return len(a ^ b) / max(len(a), 1)


@dataclass(frozen=True)
class Decision:
    move: bool
    change: float
    reason: str


def decide(cfg: Any, old: Iterable[Any] | None, new: Iterable[Any]) -> Decision:
    """Whether the snapshot with keys `old` (None: there is none yet) moves to `new` under `cfg`
    (a `CorpusConfig`)."""
    if old is None:
        return Decision(True, 1.0, "no snapshot yet")
    change = change_share(old, new)
    if cfg.pretrain_policy == "always":
        return Decision(change > 0, change, "policy always")
    if cfg.pretrain_policy == "never":
        return Decision(False, change, "policy never: the first snapshot is kept")
    move = change > cfg.change_threshold
    cmp = ">" if move else "<="
    return Decision(
        move, change, f"corpus changed by {change:.1%} {cmp} threshold {cfg.change_threshold:.1%}"
    )


def refresh(
    cfg: Any,
    *,
    sources: Mapping[str, Path],
    out_dir: Path,
    keys: Callable[[Mapping[str, Path]], set[Any]],
    unit: str,
    unusable: Callable[[Mapping[str, Path]], str | None] | None = None,
) -> dict[str, Any]:
    """Move the snapshot in `out_dir` (files named like `sources`' keys) to `sources` when the
    policy says so; `keys(files)` reads a set of files' keys. `unusable(snapshot)` may name why a
    kept snapshot could not be trained on again (its image files are gone): it then moves whatever
    the policy. Returns the metrics (`moved`, `change_share`, `reason`, `<unit>`: the new keys)."""
    for path in sources.values():
        if not Path(path).is_file():
            raise DataValidationError(
                path, "missing_file", "the corpus stage reads it: run the stages before it first"
            )
    new = keys(sources)
    current = {name: Path(out_dir) / name for name in sources}
    has_snapshot = all(p.is_file() for p in current.values())
    decision = decide(cfg, keys(current) if has_snapshot else None, new)
    why_not = unusable(current) if has_snapshot and unusable and not decision.move else None
    if why_not:
        decision = Decision(True, decision.change, f"{decision.reason}, but {why_not}")
    if decision.move:
        for name, path in sources.items():  # file by file: DVC keeps a .gitignore in out_dir
            with atomic_path(current[name]) as tmp:
                shutil.copyfile(path, tmp)
    log.info(
        "corpus snapshot %s (%s)",
        "moved: pretrain will re-run" if decision.move else "kept: pretrain stays as is",
        decision.reason,
    )
    return {
        "moved": decision.move,
        "change_share": round(decision.change, 6),
        "reason": decision.reason,
        unit: len(new),
    }
