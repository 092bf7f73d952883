"""The labelled dataset as `ingest` builds it: the source, the incoming files, de-duplicated and
checked as a whole. Intake (`tunery data add`, the retrain's landing folder) checks a new file
against exactly this, before anything moves, so a file that passes intake never stops a later
ingest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tunery.config import FilesSource, IngestConfig
from tunery.data import files, validate, wordnet
from tunery.errors import DataValidationError


def columns(cfg: IngestConfig) -> tuple[str, str]:
    if isinstance(cfg.source, FilesSource):
        return cfg.source.text_column, cfg.source.label_column
    return "text", "label"


@dataclass
class Dataset:
    data: pd.DataFrame  # text, label, origin, row: de-duplicated
    unlabelled: list[str]
    incoming: list[pd.DataFrame]
    stats: dict[str, int] = field(default_factory=dict)


def load_source(cfg: IngestConfig, root: Path) -> tuple[list[pd.DataFrame], list[str]]:
    """Labelled frames (one per file, each already row-checked) and unlabelled texts."""
    src = cfg.source
    if isinstance(src, FilesSource):
        path = root / src.path
        paths = files.list_files(path, files.LABELLED_SUFFIXES)
        if not paths:
            raise DataValidationError(
                path, "missing_file", "folder holds no .csv, .jsonl or .parquet file"
            )
        frames = [
            validate.check_rows(
                files.read_labelled(
                    file, src.text_column, src.label_column, origin=f"source:{file.name}"
                ),
                cfg,
                str(file),
            )
            for file in paths
        ]
        unlabelled = (
            files.read_unlabelled(root / src.unlabelled_path) if src.unlabelled_path else []
        )
        return frames, unlabelled
    labelled, unlabelled = wordnet.load(src)
    return [validate.check_rows(labelled, cfg, str(Path(src.path) / "data.noun"))], unlabelled


def read_drop(file: Path, cfg: IngestConfig) -> pd.DataFrame:
    """One incoming (or candidate) file, row-checked, with its `incoming:<name>` origin."""
    text_col, label_col = columns(cfg)
    raw = files.read_labelled(file, text_col, label_col, origin=f"incoming:{file.name}")
    return validate.check_rows(raw, cfg, str(file))


def load_incoming(cfg: IngestConfig, root: Path) -> list[pd.DataFrame]:
    folder = root / cfg.incoming
    if not folder.is_dir():
        return []
    return [read_drop(f, cfg) for f in files.list_files(folder, files.LABELLED_SUFFIXES)]


def build(cfg: IngestConfig, root: Path, candidates: dict[Path, pd.DataFrame] | None = None):
    """The dataset ingest writes; with `candidates` (not yet taken in), as it will be after them.

    A candidate is refused, naming it, when it brings a label the data does not have yet (unless
    `ingest.allow_new_labels`), when none of its rows survive de-duplication, or when the combined
    data breaks a dataset rule because of it (a class below `min_per_class`).
    """
    frames, unlabelled = load_source(cfg, root)
    incoming = load_incoming(cfg, root)
    candidates = candidates or {}
    known = set(pd.concat(frames + incoming)["label"])
    for file, df in candidates.items():
        new = sorted(set(df["label"]) - known)
        if new and not cfg.allow_new_labels:
            rows = df.loc[df["label"].isin(new), "row"].astype(int).tolist()
            raise DataValidationError(
                file,
                "new_label",
                f"label(s) {new[:5]} are not in the data yet (known: {sorted(known)[:12]}); "
                "set ingest.allow_new_labels: true (or `tunery data add --allow-new-labels`) "
                "to add a class",
                rows,
            )
    data = pd.concat(frames + incoming + list(candidates.values()), ignore_index=True)
    data, stats = validate.deduplicate(data, cfg)
    for file, df in candidates.items():
        origin = df["origin"].iloc[0]
        if not (data["origin"] == origin).any():
            raise DataValidationError(
                file,
                "nothing_new",
                f"none of its {len(df)} rows is new: all are duplicates of existing texts or "
                "conflict with their labels",
            )
    check_classes(data, cfg, candidates)
    return Dataset(data=data, unlabelled=unlabelled, incoming=incoming, stats=stats)


def check_classes(data: pd.DataFrame, cfg: IngestConfig, candidates: dict) -> None:
    """Dataset rules, blaming the candidate that brought a too-small class when there is one."""
    try:
        validate.check_classes(data, cfg, str(cfg.source.path))
    except DataValidationError:
        counts = data["label"].value_counts()
        small = set(counts[counts < cfg.min_per_class].index)
        for file, df in candidates.items():
            mine = sorted(small & set(df["label"]))
            if mine:
                detail = ", ".join(f"{label!r}: {int(counts[label])}" for label in mine)
                raise DataValidationError(
                    file,
                    "too_few_examples",
                    f"after adding it, class(es) below ingest.min_per_class={cfg.min_per_class}: "
                    f"{detail}",
                ) from None
        raise
