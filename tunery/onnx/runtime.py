"""Run a deployable ONNX model folder: turn inputs into the graph's feed, score with ONNX Runtime.

A deployable folder (written by the `export` and `compress` stages, see `tunery.onnx.export`)
holds `model.onnx`, `labels.json`, `tunery_model.json` and, for a text model, the tokenizer files.
`Predictor` loads only such folders: the manifest must be there and the model's sha256 must match
it, and ONNX external-data paths may not point outside the folder.

One `Predictor` for both modalities: the session, devices, calibrated output and post-processing
are shared; what the graph is fed comes from the manifest's modality, the seam's last link
("predictor inputs", `tunery.modality`): `TextInputs` (tokenize, batch by length) here, or
`tunery.vision.predict.ImageInputs` (PIL images, bytes or paths -> `pixel_values` by the
manifest's processor contract).

Devices: `cpu`, `cuda` or `auto`. `cuda` really means CUDA: CPU fallback is disabled in the session
and the active providers are checked, and the predictor refuses to start otherwise. `auto` takes
CUDA when it works (and the variant is meant for it) and says in the log which provider it chose.

No tunery.config import here: this module also runs on the GPU box, which has no pydantic.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunery.data.tokens import unpadded
from tunery.errors import BadInput, InputError, TuneryError
from tunery.onnx.export import LABELS_FILE, MODEL_FILE, modality, verify_model_dir
from tunery.registry.refs import REGISTRY_FILE

log = logging.getLogger("tunery.inference")

PROBABILITIES = (
    "probabilities"  # the calibrated output the compress stage adds (tunery.onnx.calibration)
)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

# --------------------------------------------------------------------------- model sources
# A model source is a folder, or a URI whose scheme has a resolver that turns it into a local
# folder. `models:/name@alias` is the registry's (tunery.registry.registration, named here rather than
# imported: the runtime sits below the registry, which imports it through the MLflow pyfunc);
# `register_resolver` adds others. The folder is then verified exactly like a local one.
Resolver = Callable[[str], Path]
PLUGINS = {
    "models": "tunery.registry.registration:resolve_registry_uri"
}  # mlflow only when one is used


def _plugin(scheme: str) -> Resolver | None:
    import importlib

    target = PLUGINS.get(scheme)
    if target is None:
        return None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


_RESOLVERS: dict[str, Resolver] = {}


def register_resolver(scheme: str, resolver: Resolver) -> None:
    """Teach `Predictor` a URI scheme (`models` for `models:/name@alias`): URI -> local folder."""
    _RESOLVERS[scheme] = resolver


def resolve_model_source(source: str | Path) -> Path:
    text = str(source)
    scheme, sep, _ = text.partition(":/")
    if sep and len(scheme) > 1 and not Path(text).exists():  # len > 1: not a Windows drive letter
        resolver = _RESOLVERS.get(scheme) or _plugin(scheme)
        if resolver is None:
            known = ", ".join(sorted({*_RESOLVERS, *PLUGINS})) or "none"
            raise TuneryError(
                f"{text}: no resolver for '{scheme}:/' URIs (registered: {known}); "
                "pass a deployable model folder such as models/deploy"
            )
        return Path(resolver(text))
    return Path(text)


# The input side of the other modalities, named rather than imported (as PLUGINS above): loaded
# only for such a model (images need PIL, torch and pydantic), and not a dependency of the text
# stages, which score text models only. A stage that scores image models through `Predictor`
# names tunery/vision/predict.py in its dvc.yaml deps itself (tests/test_dvc_deps.py follows
# imports, not this string).
INPUTS = {"image": "tunery.vision.predict:ImageInputs"}


# --------------------------------------------------------------------------- sessions
def import_onnxruntime(cuda: bool = False) -> Any:
    """Import onnxruntime; for CUDA, load torch first so the provider finds its CUDA libraries."""
    if cuda:
        # torch's CUDA libraries satisfy onnxruntime-gpu's provider; without torch, preload below.
        with contextlib.suppress(ImportError):
            import torch  # noqa: F401
    import onnxruntime as ort

    if cuda and "torch" not in sys.modules and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as exc:  # only a hint: session creation reports the real failure
            log.debug("onnxruntime.preload_dlls failed: %s", exc)
    return ort


def passive_wait() -> bool:
    """True when the process asked its OpenMP threads to sleep while waiting
    (`OMP_WAIT_POLICY=PASSIVE`: the image stages set it, `tunery.vision.threads`)."""
    import os

    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def session_options(ort: Any, *, threads: int = 0, strict_cuda: bool = False) -> Any:
    """Session options for every onnxruntime session tunery starts.

    onnxruntime's intra-op pool spins while it waits for work by default. Where the process has
    chosen passive waiting for torch (`passive_wait`), its pool does the same, so both runtimes
    are timed under one policy: on the 2-core machine shared with other jobs, the image int8
    ViT ran 2,663 images/s spinning vs 3,107 not (torch 2,613, passive; bench/vision_int8.py).
    The text stages leave the variable unset and keep onnxruntime's default (spinning was
    5-10 % faster on a quiet machine for the text model, bench/README.md).
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if passive_wait():
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if strict_cuda:
        # Fail at session creation if any node would run on the CPU EP instead of CUDA.
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return so


def create_session(
    model_path: str | Path,
    device: str = "auto",
    *,
    threads: int = 0,
    prefer_cuda: bool = True,
    cuda_options: dict[str, Any] | None = None,
) -> tuple[Any, str]:
    """An onnxruntime session on `device`, and the device it really runs on ("cpu" | "cuda").

    `cuda`: CPU fallback disabled and the active providers checked; any failure is a TuneryError.
    `auto`: CUDA if the CUDA provider exists, `prefer_cuda` holds and a strict session starts;
    otherwise CPU. The choice (and why) is logged.
    """
    if device not in DEVICES:
        raise TuneryError(f"device {device!r}: expected one of {', '.join(DEVICES)}")
    want_cuda = device in ("cuda", "auto")
    ort = import_onnxruntime(cuda=want_cuda)
    available = ort.get_available_providers()
    if device == "cuda" or (device == "auto" and prefer_cuda and CUDA in available):
        if CUDA not in available:
            raise TuneryError(
                f"device=cuda, but onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                f"(available: {', '.join(available)}). Install onnxruntime-gpu (the `gpu` extra) "
                "on a machine with an NVIDIA GPU, or use device cpu/auto."
            )
        try:
            session = ort.InferenceSession(
                str(model_path),
                session_options(ort, threads=threads, strict_cuda=True),
                providers=[(CUDA, dict(cuda_options or {}))],
            )
        except Exception as exc:
            msg = (
                f"{model_path}: cannot run on CUDA with CPU fallback disabled: "
                f"{str(exc).strip().splitlines()[0][:400]}"
            )
            if device == "cuda":
                raise TuneryError(msg) from None
            log.warning("auto: %s; using CPU instead", msg)
        else:
            active = session.get_providers()
            if active[0] != CUDA:
                if device == "cuda":
                    raise TuneryError(
                        f"{model_path}: asked for CUDA but the session runs on {active}; refusing"
                    )
                log.warning("auto: session came up on %s, not CUDA; using CPU", active)
            else:
                if device == "auto":
                    log.info("auto: using CUDAExecutionProvider")
                return session, "cuda"
    elif device == "auto":
        reason = (
            "the model variant targets CPU"
            if CUDA in available
            else f"no CUDA provider (available: {', '.join(available)})"
        )
        log.info("auto: using CPUExecutionProvider (%s)", reason)
    session = ort.InferenceSession(
        str(model_path), session_options(ort, threads=threads), providers=[CPU]
    )
    return session, "cpu"


# --------------------------------------------------------------------------- batching
def length_batches(
    encoded: Sequence[dict[str, list[int]]],
    batch_size: int,
    input_names: Sequence[str],
    *,
    pad_id: int = 0,
    sort: bool = True,
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(row indices, int64 feed) batches; sorted by length so each pads only to similar texts."""
    order = np.arange(len(encoded))
    if sort:
        order = np.argsort([len(e["input_ids"]) for e in encoded], kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]["input_ids"]) for i in idx)
        feed = {}
        for name in input_names:
            arr = np.zeros((len(idx), width), dtype=np.int64)
            if name == "input_ids":
                arr[:] = pad_id
            for row, i in enumerate(idx):
                ids = encoded[i].get(name)
                if ids is None:  # token_type_ids the tokenizer did not return: all segment 0
                    continue
                arr[row, : len(ids)] = ids
            feed[name] = arr
        yield idx, feed


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


TEXT_COLUMN = "text"  # the column a table of texts (the MLflow pyfunc's input) must have
TABLE_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".parquet")  # what `tunery predict` reads, writes


class TextInputs:
    """What a text model is fed: tokenized texts, batched by length (`length_batches`)."""

    unit = "text"
    column = TEXT_COLUMN

    def __init__(self, model_dir: Path, manifest: dict[str, Any], max_length: int | None) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.max_length = int(max_length or manifest.get("max_length") or 128)

    @property
    def metadata(self) -> dict[str, Any]:
        return {"modality": "text", "max_length": self.max_length}

    def as_list(self, items: Any) -> Sequence[str]:
        return [items] if isinstance(items, str) else items

    def batches(
        self, items: Sequence[str], batch_size: int, input_names: Sequence[str]
    ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        encoded = unpadded(self.tokenizer, items, max_length=self.max_length)
        pad = self.tokenizer.pad_token_id or 0
        yield from length_batches(encoded, batch_size, input_names, pad_id=pad)

    def from_file(self, src: Path, column: str) -> tuple[Any, list[str]]:
        """(the rows to write back, the texts) of `tunery predict`'s input: a CSV, JSONL or
        Parquet file with a text column."""
        if src.is_dir() or src.suffix.lower() not in TABLE_SUFFIXES:
            raise InputError(
                f"{src}: a text model scores a CSV, JSONL or Parquet file with a text column "
                "(this model takes text, not images)"
            )
        df = read_table(src)
        try:
            return df, texts_from(df, column, where=str(src))
        except BadInput as exc:  # a file the user gave: bad input (exit 3), not a failed run
            raise InputError(str(exc)) from None

    @staticmethod
    def rows(values: list[Any], column: str, where: str) -> list[str]:
        """A table column's texts: a non-string or an empty text is a `BadInput` naming the rows."""
        bad = [i + 1 for i, t in enumerate(values) if not isinstance(t, str)]
        if bad:
            raise BadInput(f"{where}: rows {bad[:5]}: [{column}] must be text (a string)")
        empty = [i + 1 for i, t in enumerate(values) if not t.strip()]
        if empty:
            raise BadInput(f"{where}: rows {empty[:5]}: [{column}] is empty")
        return values


class OnnxRunner:
    """One session plus the way to feed it: plain `run` on CPU, IO binding on CUDA.

    Returns one output: the first (the logits) unless `output` names another.
    """

    def __init__(self, session: Any, device: str, output: str | None = None) -> None:
        self.session = session
        self.device = device
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_name = output or session.get_outputs()[0].name

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        feed = {k: v for k, v in feed.items() if k in self.input_names}
        if self.device != "cuda":
            return np.asarray(self.session.run([self.output_name], feed)[0], dtype=np.float32)
        binding = self.session.io_binding()
        for name, arr in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        binding.bind_output(self.output_name, "cuda")
        self.session.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0], dtype=np.float32)


# --------------------------------------------------------------------------- predictor
@dataclass(frozen=True)
class Predictions:
    labels: list[str]
    probabilities: np.ndarray  # (n, classes), columns in `classes` order
    classes: list[str]

    def records(self) -> list[dict[str, Any]]:
        return [
            {
                "label": label,
                "score": float(probs.max()),
                "probabilities": {c: float(p) for c, p in zip(self.classes, probs, strict=True)},
            }
            for label, probs in zip(self.labels, self.probabilities, strict=True)
        ]


class Predictor:
    """Score texts or images with a deployable ONNX model folder (`models/deploy`, a variant, a
    `models:/` reference): the manifest's modality says which.

    >>> p = Predictor("models/deploy", device="auto")
    >>> p.predict(["a small dog"]).labels
    >>> Predictor("models/vision-deploy").predict(["shoe.png", Image.open("bag.jpg")]).labels

    Text models take strings. Image models take PIL images, encoded image bytes or paths; each is
    converted to the model's mode and resized to its size as the manifest's processor contract
    says (`tunery.vision.predict`); a file that is not an image is refused with its name.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        device: str = "auto",
        batch_size: int = 64,
        max_length: int | None = None,
        threads: int = 0,
    ) -> None:
        self.source = str(model)
        self.model_dir = resolve_model_source(model)
        self.manifest = verify_model_dir(self.model_dir)
        self.modality = modality(self.manifest)
        registry_file = self.model_dir / REGISTRY_FILE
        self._registry = json.loads(registry_file.read_text()) if registry_file.is_file() else {}
        self.classes: list[str] = json.loads((self.model_dir / LABELS_FILE).read_text())
        self.batch_size = batch_size
        session, self.device = create_session(
            self.model_dir / MODEL_FILE,
            device,
            threads=threads,
            prefer_cuda=self.manifest.get("provider", "cpu") == "cuda",
        )
        self.inputs = model_inputs(self.model_dir, self.manifest, session, max_length=max_length)
        self.provider = CUDA if self.device == "cuda" else CPU
        self._run = OnnxRunner(session, self.device)
        # Graphs from the compress stage carry the calibrated Softmax(logits / T) as a second
        # output; older folders (and export's) have logits only: plain softmax then.
        outputs = [o.name for o in session.get_outputs()]
        self.calibrated = PROBABILITIES in outputs
        self._probs = OnnxRunner(session, self.device, PROBABILITIES) if self.calibrated else None
        n_out = session.get_outputs()[0].shape[-1]
        if isinstance(n_out, int) and n_out != len(self.classes):
            raise TuneryError(
                f"{self.model_dir}: model has {n_out} outputs but labels.json {len(self.classes)}"
            )

    @property
    def tokenizer(self) -> Any:
        return getattr(self.inputs, "tokenizer", None)

    @property
    def max_length(self) -> int | None:
        return getattr(self.inputs, "max_length", None)

    @property
    def metadata(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "variant": self.manifest.get("variant"),
            "model_version": self._registry.get("version")
            or self.manifest.get("model_version")
            or self.manifest["sha256"][:12],
            "registered_model": self._registry.get("name"),
            "sha256": self.manifest["sha256"],
            "provider": self.provider,
            "device": self.device,
            **self.inputs.metadata,  # modality, and max_length (text) or processor (image)
            "labels": self.classes,
            "opset": self.manifest.get("opset"),
            "calibration": self.manifest.get("calibration"),
        }

    def logits(self, items: Sequence[Any], *, progress: Callable[[int], None] | None = None):
        """(n, classes) float32 logits, in input order (text batches are sorted by length)."""
        return self._scores(self._run, items, progress)

    def probabilities(
        self, items: Sequence[Any], *, progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """(n, classes) class probabilities: the graph's calibrated output, else softmax(logits)."""
        if self._probs is None:
            return softmax(self.logits(items, progress=progress))
        return self._scores(self._probs, items, progress)

    def _scores(
        self, run: OnnxRunner, items: Sequence[Any], progress: Callable[[int], None] | None
    ) -> np.ndarray:
        items = self.inputs.as_list(items)
        out = np.zeros((len(items), len(self.classes)), dtype=np.float32)
        for idx, feed in self.inputs.batches(items, self.batch_size, run.input_names):
            out[idx] = run(feed)
            if progress is not None:
                progress(len(idx))
        return out

    def predict(
        self, items: Sequence[Any], *, progress: Callable[[int], None] | None = None
    ) -> Predictions:
        items = self.inputs.as_list(items)
        probs = (
            self.probabilities(items, progress=progress)
            if len(items)
            else np.zeros((0, len(self.classes)), dtype=np.float32)
        )
        labels = [self.classes[i] for i in probs.argmax(axis=-1)] if len(items) else []
        return Predictions(labels=labels, probabilities=probs, classes=self.classes)


def model_inputs(
    model_dir: Path, manifest: dict[str, Any], session: Any, *, max_length: int | None = None
) -> Any:
    """The input side of a verified folder, by its modality: `TextInputs` or `ImageInputs`."""
    kind = modality(manifest)
    if kind == "text":
        return TextInputs(model_dir, manifest, max_length)
    import importlib

    module, _, name = INPUTS[kind].partition(":")
    factory = getattr(importlib.import_module(module), name)
    return factory(manifest["processor"], session, where=str(model_dir))


# --------------------------------------------------------------------------- table inputs
def column_values(table: Any, column: str, *, where: str = "input") -> list[Any]:
    """`table[column]` as a list: a DataFrame, a list of dicts or one dict; a `BadInput` when the
    table is of another kind or lacks the column."""
    import pandas as pd

    if isinstance(table, dict):
        table = [table]
    if isinstance(table, list) and all(isinstance(r, dict) for r in table):
        table = pd.DataFrame(table)
    if not isinstance(table, pd.DataFrame):
        raise BadInput(
            f"{where}: expected a table with a {column!r} column (a DataFrame or a list of "
            f"records), got {type(table).__name__}"
        )
    if column not in table.columns:
        have = ", ".join(map(str, table.columns)) or "none"
        raise BadInput(f"{where}: no column {column!r} (columns: {have})")
    return table[column].tolist()


def texts_from(table: Any, column: str = TEXT_COLUMN, *, where: str = "input") -> list[str]:
    """The non-empty texts of `table[column]`: a DataFrame, a list of dicts or one dict.

    The one check of table inputs (files for `tunery predict`, the MLflow pyfunc): a missing
    column, a non-string or an empty text is a `BadInput` naming the rows (1-based).
    """
    return TextInputs.rows(column_values(table, column, where=where), column, where)


def table_inputs(predictor: Predictor, table: Any, *, where: str = "input") -> list[Any]:
    """What `predictor` scores from a table (the MLflow pyfunc's input): its modality's column
    (`text`, or `image` of bytes or paths), each row checked; errors name the rows."""
    column = predictor.inputs.column
    return predictor.inputs.rows(column_values(table, column, where=where), column, where)


# --------------------------------------------------------------------------- files
def read_table(path: Path) -> Any:
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix in (".jsonl", ".ndjson"):
            return pd.read_json(path, lines=True)
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except FileNotFoundError:
        raise TuneryError(f"{path}: file not found") from None
    except Exception as exc:
        raise TuneryError(f"{path}: cannot read as {suffix[1:]}: {exc}") from None
    raise TuneryError(f"{path}: unsupported format {suffix!r} (use .csv, .jsonl or .parquet)")


def write_table(df: Any, path: Path) -> None:
    from tunery.io import atomic_path

    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson", ".parquet"):
        raise TuneryError(f"{path}: unsupported format {suffix!r} (use .csv, .jsonl or .parquet)")
    with atomic_path(path) as tmp:
        if suffix == ".csv":
            df.to_csv(tmp, index=False)
        elif suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_json(tmp, orient="records", lines=True, force_ascii=False)


def predict_file(
    predictor: Predictor,
    src: Path,
    dest: Path,
    *,
    text_column: str = "text",
    image_column: str = "image",
    show_progress: bool = True,
) -> int:
    """Score `src` into `dest` (CSV/JSONL/Parquet): its columns (an image folder or file: `image`,
    the paths) plus prediction, score, prob_<label>. Nothing is written unless all rows score."""
    column = image_column if predictor.modality == "image" else text_column
    df, items = predictor.inputs.from_file(Path(src), column)
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        unit = predictor.inputs.unit
        bar = tqdm(total=len(df), unit=unit, desc="predict", file=sys.stderr)
    try:
        preds = predictor.predict(items, progress=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    out = df.copy()
    out["prediction"] = preds.labels
    out["score"] = preds.probabilities.max(axis=-1) if len(df) else []
    for j, name in enumerate(preds.classes):
        out[f"prob_{name}"] = preds.probabilities[:, j]
    write_table(out, dest)
    return len(out)
