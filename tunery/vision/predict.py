"""What an image model is fed: PIL images, encoded bytes or paths -> `pixel_values`.

The image side of the predictor ("predictor inputs", the seam's last link); the session, devices,
calibrated output and post-processing are `tunery.onnx.runtime.Predictor`'s, shared with text.

Every input goes the same way, so an image of any size or mode scores like the training images:

1. decoded and checked by the data layer's rules (`tunery.data.images.decode_image`): a file or
   upload that is not an image, is truncated, empty, over `max_pixels` or of a mode that is not
   accepted (16-bit, float, CMYK, ...) is refused with its name and the rule;
2. converted as the data layer does (1, L, LA -> L; P, RGB, RGBA -> RGB; alpha dropped);
3. converted to the model's mode (RGB -> L by ITU-R 601-2 luma, L -> RGB by copying the grey) and
   resized to the contract's size x size, bilinear, aspect ratio not kept (squashed, not cropped);
4. scaled and normalised by `tunery.vision.processor.process` (the one implementation training
   and export use).

Steps 1-3 (`ImageInputs.load`) leave a model-sized image, so a batch of large uploads is never
held at full resolution. A `str` is a path: base64 is decoded by the HTTP server, not here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tunery.data import images
from tunery.errors import BadInput, DataValidationError, TuneryError
from tunery.vision.processor import INPUT_NAME, ProcessorConfig, from_contract, process

IMAGE_COLUMN = "image"  # the column a table of images (the MLflow pyfunc's input) must have
MAX_PIXELS = images.ImageChecks().max_pixels  # the data layer's decompression-bomb guard


def fit(img: Image.Image, cfg: ProcessorConfig) -> Image.Image:
    """`img` (L or RGB) in the contract's mode and size: step 3 of the module docstring, in the
    order `processor.process` applies them (so fitting first changes nothing it computes)."""
    if img.mode != cfg.mode:
        img = img.convert(cfg.mode)
    if img.size != (cfg.size, cfg.size):
        img = img.resize((cfg.size, cfg.size), Image.Resampling.BILINEAR)
    return img


def decode(item: Any, name: str, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """One input as an L or RGB PIL image (steps 1-2); errors name `name` (a path: itself)."""
    if isinstance(item, Image.Image):
        if item.width == 0 or item.height == 0:
            raise DataValidationError(name, "zero_size", f"the image is {item.width}x{item.height}")
        item.load()
        return images.converted(item, name)
    if isinstance(item, bytes | bytearray | memoryview):
        return images.decode_image(bytes(item), name, max_pixels)
    if isinstance(item, str | os.PathLike):
        path = Path(item)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise DataValidationError(path, "missing_file", "no such image") from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise DataValidationError(path, "unreadable_file", f"cannot read: {reason}") from None
        return images.decode_image(raw, path, max_pixels)
    raise BadInput(
        f"{name}: expected a PIL image, encoded image bytes or a path, got {type(item).__name__}"
    )


class ImageInputs:
    """The input side of an image model folder: its processor contract, checked against the graph."""

    unit = "image"
    column = IMAGE_COLUMN

    def __init__(self, contract: dict[str, Any], session: Any, *, where: str) -> None:
        try:
            self.cfg = from_contract(contract)
        except ValueError as exc:
            raise TuneryError(f"{where}: the manifest's processor: {exc}") from None
        self.contract = contract
        graph = session.get_inputs()
        want = [self.cfg.channels, self.cfg.size, self.cfg.size]
        if [i.name for i in graph] != [INPUT_NAME] or any(
            isinstance(got, int) and got != w
            for got, w in zip(graph[0].shape[1:], want, strict=False)
        ):
            seen = [(i.name, i.shape) for i in graph]
            raise TuneryError(
                f"{where}: the graph takes {seen}, but the processor contract says "
                f"{INPUT_NAME} [batch, {', '.join(map(str, want))}]; re-export the model"
            )

    @property
    def metadata(self) -> dict[str, Any]:
        return {"modality": "image", "processor": self.contract}

    def load(self, item: Any, name: str, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
        """One input decoded, checked and fitted to the model's mode and size (steps 1-3)."""
        return fit(decode(item, name, max_pixels=max_pixels), self.cfg)

    def as_list(self, items: Any) -> Sequence[Any]:
        single = isinstance(items, Image.Image | bytes | bytearray | memoryview | str | os.PathLike)
        return [items] if single else items

    def batches(
        self, items: Sequence[Any], batch_size: int, input_names: Sequence[str]
    ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """(row indices, feed) in input order; each batch decoded only when it is scored."""
        for start in range(0, len(items), batch_size):
            idx = np.arange(start, min(start + batch_size, len(items)))
            fitted = [self.load(items[i], _name(items[i], i)) for i in idx]
            yield idx, {INPUT_NAME: process(fitted, self.cfg).numpy()}

    def from_file(self, src: Path, column: str) -> tuple[Any, list[Path]]:
        """(the rows to write back, the image paths) of `tunery predict`'s input (`file_images`)."""
        return file_images(src, column)

    def rows(self, values: list[Any], column: str, where: str) -> list[Image.Image]:
        """A table column of image bytes or paths, each loaded; errors name the rows (1-based)."""
        bad = [i + 1 for i, v in enumerate(values) if not isinstance(v, bytes | bytearray | str)]
        if bad:
            raise BadInput(f"{where}: rows {bad[:5]}: [{column}] must be image bytes or a path")
        return [
            self.load(v, v if isinstance(v, str) else f"{where} row {i + 1}")
            for i, v in enumerate(values)
        ]


def _name(item: Any, i: int) -> str:
    return str(item) if isinstance(item, str | os.PathLike) else f"image {i + 1}"


def file_images(src: Path, column: str = IMAGE_COLUMN) -> tuple[Any, list[Path]]:
    """(rows to write back, image paths) of `tunery predict`'s input for an image model.

    A folder: every image under it (any depth, sorted; other files and hidden ones skipped), as
    `image` relative to the folder. An image file: that one image. A CSV/JSONL/Parquet manifest:
    its rows, `column` naming each image relative to the manifest's folder (the data layer's rule:
    it may not leave that folder). Every image is checked before any is scored.
    """
    import pandas as pd

    from tunery.data import files

    src = Path(src)
    if src.is_dir():
        found = images.read_unlabelled(src)
        return found[["image"]].copy(), [src / rel for rel in found["image"]]
    if src.suffix.lower() in images.IMAGE_SUFFIXES:
        images.inspect_image(src)
        return pd.DataFrame({"image": [str(src)]}), [src]
    if src.suffix.lower() not in files.LABELLED_SUFFIXES:
        raise DataValidationError(
            src,
            "file_type",
            f"an image model scores a folder of images, an image "
            f"({', '.join(images.IMAGE_SUFFIXES)}) or a manifest "
            f"({', '.join(files.LABELLED_SUFFIXES)}) with a path column",
        )
    table = files.read_table(src)
    if column not in table.columns:
        raise DataValidationError(
            src,
            "missing_column",
            f"no column {column!r} of image paths (columns: {', '.join(map(str, table.columns))}; "
            "see --image-column)",
        )
    rel = table[column]
    null = rel.isna() | rel.astype(str).str.strip().eq("")
    if null.any():
        rows = [i + 1 for i in np.flatnonzero(null.to_numpy())]
        raise DataValidationError(src, "null_path", f"column {column!r} is empty", rows)
    frame = pd.DataFrame({"image": rel.astype(str).str.strip().to_numpy(), "root": str(src.parent)})
    frame["row"] = range(1, len(frame) + 1)
    images.check_images(frame, images.ImageChecks(), manifest=src)
    return table, [src.parent / r for r in frame["image"]]
