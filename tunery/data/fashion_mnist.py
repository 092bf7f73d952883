"""The image demo source: Fashion-MNIST from Debian's `dataset-fashion-mnist` package.

60,000 training and 10,000 test images, 28x28 grey, 10 classes, read at run time from the
installed package's idx-ubyte gzip files (`/usr/share/datasets/fashion-mnist/`) with numpy, never
copied into the repository. Licence: MIT (Expat), Copyright 2017 Zalando SE
(https://github.com/zalandoresearch/fashion-mnist; the package's /usr/share/doc/.../copyright).

Why PNG files and not arrays: `materialise` writes a chosen subset as PNGs plus a manifest into a
data folder, and the pipeline reads that folder with `tunery.data.images` like any user's data.
One path through the code (validation, the bytes-hash split key, the processor, `predict` on a
folder, retrain drops) is then the path the demo runs and tests; reading arrays straight into the
model would leave the user's path untried by the demo. The PNGs are written uncompressed
(compress_level=0, no metadata), so their bytes, and with them the splits, do not depend on the
zlib version that wrote them.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from tunery.data.text import unit_hash
from tunery.errors import DataValidationError
from tunery.io import atomic_dir

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# The labels' meaning, in label order (the dataset's README).
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
INSTALL_HINT = (
    "install it with `sudo apt-get install dataset-fashion-mnist` (or `make fashion-mnist`)"
)
_IDX_DTYPES = {0x08: np.uint8}  # the type codes Fashion-MNIST uses (the format has more)


def read_idx(path: Path) -> np.ndarray:
    """An idx-ubyte file (gzip) as a numpy array: magic 0 0 <type> <ndim>, big-endian int32
    dimensions, then the data. Sizes are checked, so a cut-off file fails here, not in training."""
    try:
        raw = gzip.decompress(Path(path).read_bytes())
    except FileNotFoundError:
        raise DataValidationError(
            path, "missing_file", f"Fashion-MNIST is not installed here; {INSTALL_HINT}"
        ) from None
    except (OSError, EOFError) as exc:
        raise DataValidationError(
            path, "idx_format", f"not a readable gzip file ({exc}); reinstall the package"
        ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataValidationError(path, "idx_format", "no idx-ubyte header (magic 0 0 8 n)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">i4"))
    if len(shape) != ndim or len(raw) - header != int(np.prod(shape)):
        raise DataValidationError(
            path, "idx_format", f"header says {shape} but {len(raw) - header} data bytes follow"
        )
    return np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=header).reshape(shape)


def load(split: str = "train", folder: Path = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of `split`, "train" or "test"."""
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, not {split!r}")
    image_file, label_file = (Path(folder) / name for name in FILES[split])
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataValidationError(
            image_file,
            "idx_format",
            f"images {images.shape} and labels {labels.shape} do not pair up",
        )
    if labels.size and labels.max() >= len(CLASSES):
        raise DataValidationError(label_file, "idx_format", f"label {labels.max()} out of range")
    return images, labels


def labelled_subset(
    labels: np.ndarray, per_class: int, offset: int = 0, salt: str = "fashion-mnist"
) -> np.ndarray:
    """Indices of `per_class` images of each class, from position `offset` of a fixed ranking.

    The ranking is a salted hash of the index, so it is the same everywhere; disjoint windows
    (offset 0, per_class; then offset per_class, ...) give non-overlapping shards, e.g. the
    low-label training set first and later "new labelled drops" after it.
    """
    chosen = []
    for label in range(len(CLASSES)):
        members = np.flatnonzero(labels == label)
        ranked = sorted(members, key=lambda i: unit_hash(str(i), salt))
        chosen += ranked[offset : offset + per_class]
    return np.array(sorted(chosen), dtype=np.int64)


def unlabelled_pool(n_images: int, exclude: np.ndarray, limit: int | None = None) -> np.ndarray:
    """Indices not in `exclude` (the labelled ones), in order: the pretraining pool."""
    keep = np.setdiff1d(np.arange(n_images), exclude)
    return keep if limit is None else keep[:limit]


def _write_png(pixels: np.ndarray, dest: Path) -> None:
    Image.fromarray(np.ascontiguousarray(pixels)).save(dest, format="PNG", compress_level=0)


def materialise(
    out_dir: Path,
    images: np.ndarray,
    indices: np.ndarray,
    labels: np.ndarray | None = None,
    split: str = "train",
) -> Path:
    """Write `images[indices]` as PNGs into `out_dir` (replaced whole, atomically).

    Labelled (`labels` given): `out_dir/images/<split>-<index>.png` and `out_dir/manifest.csv`
    (image, label with the class names): read it with `images.read_manifest`. A manifest, not a
    folder per class, because a class name ("T-shirt/top") cannot be a folder name.
    Unlabelled: `out_dir/<split>-<index>.png`: read it with `images.read_unlabelled`.
    Returns the manifest (labelled) or the folder.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        folder = tmp / "images" if labels is not None else tmp
        folder.mkdir(exist_ok=True)
        names = [f"{split}-{int(i):05d}.png" for i in indices]
        for i, name in zip(indices, names, strict=True):
            _write_png(images[i], folder / name)
        if labels is not None:
            manifest = pd.DataFrame(
                {
                    "image": [f"images/{n}" for n in names],
                    "label": [CLASSES[int(labels[i])] for i in indices],
                }
            )
            manifest.to_csv(tmp / "manifest.csv", index=False)
    return out_dir / "manifest.csv" if labels is not None else out_dir
