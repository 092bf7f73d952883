"""Image data: a folder per class, a manifest (CSV/JSONL/Parquet), or unlabelled images.

The image half of the modality seam's first link (data source → processor → model factory → ONNX
inputs → predictor inputs). Every source returns a DataFrame that points at images left on disk:

  image   path relative to `root`, POSIX form (what the manifest or folder names)
  root    the data folder `image` is relative to (as given: a relative root stays relative)
  label   the class (labelled sources only)
  origin  `source:<name>` for the first data version, `incoming:<name>` for later drops
  sha256  hash of the file's bytes: the split key and the de-duplication key
  row     1-based position in the manifest (header excluded) or in the sorted folder listing
  width, height, mode   as decoded (mode before conversion; `open_image` converts)

Pixels are never held in the frame: 60,000 small images are 60,000 rows of metadata, and a
processor opens each one when it needs it. Every image is fully decoded once while reading, so a
file that passes here opens later too; the bytes are read once, hashed and decoded from memory, so
the hash is of exactly the bytes that were checked.

Rules (the `rule` of the DataValidationError): missing_file, unreadable_file, file_type,
zero_size, not_image, truncated_image, image_too_large, unsupported_mode, outside_root,
no_label, missing_column, null_path, null_label, unknown_label, conflicting_labels,
too_few_examples, too_few_classes. A manifest's errors name the manifest and its rows; a folder's errors name the
first offending image and count the others.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import Literal

import pandas as pd
from PIL import Image, UnidentifiedImageError
from pydantic import Field

from tunery.config import PrepareConfig, Section
from tunery.data import files, split
from tunery.errors import DataValidationError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MANIFEST_SUFFIXES = files.LABELLED_SUFFIXES
# Accepted modes and what `open_image` turns them into: grey stays grey, colour becomes RGB (alpha
# is dropped, a palette expanded). 16-bit, 32-bit, float, CMYK, YCbCr, LAB and HSV images are
# refused rather than guessed at: their conversion to 8-bit loses or invents information.
MODES = {"1": "L", "L": "L", "LA": "L", "P": "RGB", "RGB": "RGB", "RGBA": "RGB"}
ACCEPTED = ", ".join(f"{m}→{t}" if m != t else m for m, t in MODES.items())


class ImageChecks(Section):
    """The rules' knobs (the image counterpart of the text `ingest` settings)."""

    labels: list[str] | None = None  # the declared classes; None: whatever the data has
    min_per_class: int = Field(default=2, ge=1)
    # Decompression-bomb guard: a 100-byte PNG can declare 60,000 x 60,000 pixels.
    max_pixels: int = Field(default=40_000_000, gt=0)
    # Byte-identical images under two labels: stop (default) or drop every copy and count them.
    conflicts: Literal["reject", "drop"] = "reject"


def inside(root: Path, rel: str | Path) -> Path:
    """`root / rel`, refused unless it resolves (symlinks and `..` followed) inside `root`."""
    base = Path(root).resolve()
    target = (Path(root) / rel).resolve()
    if not target.is_relative_to(base):
        raise DataValidationError(
            Path(root) / rel,
            "outside_root",
            f"resolves to {target}, outside the data folder {base}; move the image into the "
            "folder (a symlink or `..` may not leave it)",
        )
    return target


def _png_declares_no_pixels(raw: bytes) -> bool:
    """A PNG whose header (IHDR: width, height at bytes 16-24) declares a zero side."""
    if raw[:8] != b"\x89PNG\r\n\x1a\n" or raw[12:16] != b"IHDR" or len(raw) < 24:
        return False
    return int.from_bytes(raw[16:20], "big") == 0 or int.from_bytes(raw[20:24], "big") == 0


def _decode(path: Path, raw: bytes, max_pixels: int) -> tuple[int, int, str]:
    """(width, height, mode) after a full decode; the PIL error becomes a named rule."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as img:
                width, height, mode = img.width, img.height, img.mode
                if width * height > max_pixels:
                    raise DataValidationError(
                        path,
                        "image_too_large",
                        f"{width}x{height} pixels is over max_pixels={max_pixels}; resize it",
                    )
                img.verify()  # structure and checksums; the object is unusable afterwards
            with Image.open(io.BytesIO(raw)) as img:
                img.load()  # every pixel: catches data cut short that verify() lets through
    except UnidentifiedImageError:
        if _png_declares_no_pixels(raw):  # PIL will not open a 0 x 0 PNG at all
            raise DataValidationError(path, "zero_size", "the image is 0x0 pixels") from None
        raise DataValidationError(
            path, "not_image", "not an image PIL can read (check the file's real type)"
        ) from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise DataValidationError(path, "image_too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataValidationError(
            path, "truncated_image", f"damaged or truncated image data ({exc}); re-export it"
        ) from None
    return width, height, mode


def inspect_image(path: Path, max_pixels: int = 40_000_000) -> dict:
    """Check one image file fully; return its sha256, width, height and mode."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataValidationError(
            path, "file_type", f"unsupported file type; expected one of {', '.join(IMAGE_SUFFIXES)}"
        )
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataValidationError(path, "missing_file", "no such image") from None
    except OSError as exc:
        raise DataValidationError(path, "unreadable_file", f"cannot read: {exc.strerror}") from None
    width, height, mode = _check_bytes(path, raw, max_pixels)
    return {
        "sha256": hashlib.sha256(raw).hexdigest(),
        "width": width,
        "height": height,
        "mode": mode,
    }


def _check_bytes(name: str | Path, raw: bytes, max_pixels: int) -> tuple[int, int, str]:
    """The rules of one image's bytes (zero_size, not_image, truncated_image, image_too_large,
    unsupported_mode); (width, height, mode)."""
    if not raw:
        raise DataValidationError(name, "zero_size", "the file is empty (0 bytes)")
    width, height, mode = _decode(Path(name), raw, max_pixels)
    if width == 0 or height == 0:
        raise DataValidationError(name, "zero_size", f"the image is {width}x{height} pixels")
    if mode not in MODES:
        raise DataValidationError(
            name,
            "unsupported_mode",
            f"mode {mode} is not accepted ({ACCEPTED}); convert it to 8-bit RGB or L",
        )
    return width, height, mode


def converted(img: Image.Image, name: str | Path = "image") -> Image.Image:
    """`img` (loaded) converted as MODES says (L or RGB); another mode is refused, named `name`."""
    if img.mode not in MODES:
        raise DataValidationError(
            name, "unsupported_mode", f"mode {img.mode} is not accepted ({ACCEPTED})"
        )
    # Through RGBA: converting a palette with transparency straight to RGB warns.
    base = img.convert("RGBA") if img.mode == "P" else img
    return base.convert(MODES[img.mode])


def open_image(path: Path) -> Image.Image:
    """The image decoded and converted as MODES says (L or RGB): what a processor starts from."""
    with Image.open(path) as img:
        img.load()
        return converted(img, path)


def decode_image(raw: bytes, name: str | Path, max_pixels: int = 40_000_000) -> Image.Image:
    """Image bytes (an upload, a table cell) checked by the rules of a data file, then decoded and
    converted as `open_image` does; errors name `name`."""
    _check_bytes(name, raw, max_pixels)
    with Image.open(io.BytesIO(raw)) as img:
        img.load()
        return converted(img, name)


def _raise_grouped(failures: list[tuple[int, DataValidationError]], manifest: Path | None) -> None:
    """Raise the first rule that failed, with every row (manifest) or image (folder) it hit."""
    rule = failures[0][1].rule
    same = [(row, err) for row, err in failures if err.rule == rule]
    first = same[0][1]
    if manifest is not None:
        raise DataValidationError(
            manifest, rule, f"{first.detail} (first: {first.file})", [r for r, _ in same]
        )
    more = ""
    if len(same) > 1:
        names = ", ".join(Path(e.file).name for _, e in same[1:4])
        more = f" ({len(same) - 1} more image(s) break this rule: {names}...)"
    raise DataValidationError(first.file, rule, first.detail + more)


def check_images(
    df: pd.DataFrame, checks: ImageChecks, manifest: Path | None = None
) -> pd.DataFrame:
    """Inspect every image of `df` (columns image, root, row); add sha256, width, height, mode.

    All images are checked before anything is raised, so one error reports every row that
    breaks its rule, not just the first.
    """
    infos, failures = [], []
    for rel, root, row in zip(df["image"], df["root"], df["row"], strict=True):
        try:
            inside(Path(root), rel)
            # Named (and read) as given, not resolved: errors show the path the user wrote.
            infos.append(inspect_image(Path(root) / rel, checks.max_pixels))
        except DataValidationError as err:
            failures.append((int(row), err))
    if failures:
        _raise_grouped(failures, manifest)
    meta = pd.DataFrame(infos, index=df.index, columns=["sha256", "width", "height", "mode"])
    return pd.concat([df, meta], axis=1)


def _walk(folder: Path) -> tuple[list[Path], list[str]]:
    """Image files under `folder` (sorted) and the entries skipped (other suffixes, symlinked
    folders: not followed, so a link cannot loop or reach outside)."""
    found, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        for d in sorted(dirnames):
            if (here / d).is_symlink():
                skipped.append(str(here / d))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = here / name
            (found if path.suffix.lower() in IMAGE_SUFFIXES else skipped).append(path)
    return found, [str(s) for s in skipped]


def _frame(root: Path, paths: list[Path], origin: str, labels: list[str] | None) -> pd.DataFrame:
    df = pd.DataFrame({"image": [p.relative_to(root).as_posix() for p in paths]})
    df["root"] = str(root)
    if labels is not None:
        df["label"] = labels
    df["origin"] = origin
    df["row"] = range(1, len(df) + 1)
    return df


def read_folder(
    root: Path, checks: ImageChecks | None = None, origin: str | None = None
) -> pd.DataFrame:
    """A folder per class: `root/<label>/**/*.png|jpg|jpeg|webp|bmp`; the label is the folder name.

    Files of other types and hidden files are skipped (listed in `attrs["skipped"]`); images
    directly in `root` have no class and are refused.
    """
    checks, root = checks or ImageChecks(), Path(root)
    if not root.is_dir():
        raise DataValidationError(root, "missing_file", "no such folder")
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        raise DataValidationError(
            loose[0],
            "no_label",
            "an image directly in the data folder has no class; "
            "move it into a folder named after its label",
        )
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name[0] != ".")
    unknown = [d for d in class_dirs if checks.labels is not None and d.name not in checks.labels]
    if unknown:
        raise DataValidationError(
            unknown[0],
            "unknown_label",
            f"class folder(s) {[d.name for d in unknown][:5]} not in the declared set "
            f"{checks.labels[:12]}; rename the folder or declare the class",
        )
    paths, labels, skipped = [], [], []
    for class_dir in class_dirs:
        found, skip = _walk(class_dir)
        paths += found
        labels += [class_dir.name] * len(found)
        skipped += skip
    if not paths:
        raise DataValidationError(
            root, "missing_file", f"no class folders with images ({', '.join(IMAGE_SUFFIXES)})"
        )
    df = _frame(root, paths, origin or f"source:{root.name}", labels)
    df = check_images(df, checks)
    df.attrs["skipped"] = skipped
    return df


def read_manifest(
    path: Path,
    checks: ImageChecks | None = None,
    image_column: str = "image",
    label_column: str = "label",
    origin: str | None = None,
) -> pd.DataFrame:
    """A CSV/JSONL/Parquet manifest: one row per image, paths relative to the manifest's folder."""
    checks, path = checks or ImageChecks(), Path(path)
    if path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise DataValidationError(
            path, "file_type", f"a manifest is one of {', '.join(MANIFEST_SUFFIXES)}"
        )
    if not path.is_file():
        raise DataValidationError(path, "missing_file", "no such manifest")
    table = files.read_table(path)
    missing = [c for c in (image_column, label_column) if c not in table.columns]
    if missing:
        raise DataValidationError(
            path,
            "missing_column",
            f"missing column(s) {missing}; found {list(table.columns)} (name the image-path "
            "and label columns)",
        )
    df = pd.DataFrame({"image": table[image_column], "label": table[label_column]})
    df["root"] = str(path.parent)
    df["origin"] = origin or f"source:{path.name}"
    df["row"] = range(1, len(df) + 1)
    for column, named, rule in (
        ("image", image_column, "null_path"),
        ("label", label_column, "null_label"),
    ):
        null = df[column].isna() | df[column].astype(str).str.strip().eq("")
        if null.any():
            rows = df.loc[null, "row"].tolist()
            raise DataValidationError(path, rule, f"column {named!r} is empty", rows)
    df["image"] = df["image"].astype(str).str.strip()
    df["label"] = df["label"].astype(str).str.strip()
    check_labels(df, checks, path)
    return check_images(df, checks, manifest=path)


def read_unlabelled(
    root: Path, checks: ImageChecks | None = None, origin: str | None = None
) -> pd.DataFrame:
    """Every image under `root` (any depth, no labels): the pretraining pool."""
    checks, root = checks or ImageChecks(), Path(root)
    if not root.is_dir():
        raise DataValidationError(root, "missing_file", "no such folder")
    paths, skipped = _walk(root)
    if not paths:
        raise DataValidationError(root, "missing_file", "the folder holds no images")
    df = check_images(_frame(root, paths, origin or f"source:{root.name}", None), checks)
    df.attrs["skipped"] = skipped
    return df


def check_labels(df: pd.DataFrame, checks: ImageChecks, file: Path) -> None:
    """Every label is one of `checks.labels` (when declared)."""
    if checks.labels is None:
        return
    unknown = ~df["label"].isin(checks.labels)
    if unknown.any():
        seen = sorted(set(df.loc[unknown, "label"]))[:5]
        raise DataValidationError(
            file,
            "unknown_label",
            f"label(s) {seen} not in the declared set {checks.labels[:12]}; fix the label or "
            "declare the class",
            df.loc[unknown, "row"].astype(int).tolist(),
        )


def deduplicate(df: pd.DataFrame, checks: ImageChecks) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop byte-identical copies (the first is kept); the same bytes under two labels conflict.

    The first occurrence is kept, so an image appended later never replaces an existing one.
    """
    per_hash = df.groupby("sha256")["label"].nunique()
    conflict = df["sha256"].map(per_hash).gt(1)
    if conflict.any() and checks.conflicts == "reject":
        bad = df[conflict]
        first = bad.iloc[0]  # in frame order: the source's images come before later drops
        same = bad[bad["sha256"] == first["sha256"]]
        where = "; ".join(
            f"{r.image!r} labelled {r.label!r} ({r.origin}, row {r.row})" for r in same.itertuples()
        )
        raise DataValidationError(
            Path(first["root"]) / first["image"],
            "conflicting_labels",
            f"{int(conflict.sum())} copies of {bad['sha256'].nunique()} image(s) carry different "
            f"labels; the same bytes as: {where[:400]}; keep one label (or set conflicts: drop)",
        )
    duplicate = df["sha256"].duplicated(keep="first") & ~conflict
    kept = df[~(duplicate | conflict)].reset_index(drop=True)
    kept.attrs = dict(df.attrs)
    return kept, {
        "duplicates_dropped": int(duplicate.sum()),
        "conflicts_dropped": int(conflict.sum()),
    }


def check_classes(df: pd.DataFrame, checks: ImageChecks, source: str | Path) -> None:
    """At least two classes, each with at least `checks.min_per_class` images."""
    counts = df["label"].value_counts()
    small = counts[counts < checks.min_per_class]
    if small.any():
        detail = ", ".join(f"{label!r}: {n}" for label, n in small.items())
        raise DataValidationError(
            source,
            "too_few_examples",
            f"class(es) with fewer than min_per_class={checks.min_per_class} images: {detail}; "
            "add images or drop the class",
        )
    if counts.size < 2:
        raise DataValidationError(
            source, "too_few_classes", f"need at least 2 classes, found {counts.size}"
        )


def combine(
    frames: list[pd.DataFrame], checks: ImageChecks, source: str | Path
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The labelled dataset: the source's frames first, then later drops in arrival order,
    de-duplicated on the bytes (so a re-sent image keeps its first origin and split), then the
    class rules on the whole."""
    data, stats = deduplicate(pd.concat(frames, ignore_index=True), checks)
    check_classes(data, checks, source)
    return data, stats


def assign_splits(df: pd.DataFrame, cfg: PrepareConfig) -> pd.Series:
    """The split of every image (columns sha256, origin): the text rules, keyed on the bytes."""
    return split.assign_by_key(df["sha256"], df["origin"], cfg)
