"""Tunery's models in MLflow: the pyfunc (text or images in) and the LoggedModels the stages leave.

The second of the two modules that import `mlflow` (with `tunery.tracking`, which owns runs, the
store and the registry's aliases). This one owns the MLflow model folder of a Tunery model:

    MLmodel, python_model.py         a pyfunc written from code (`mlflow_model_code.py`): no pickle
    artifacts/deploy/                the deployable ONNX folder, exactly as `tunery.onnx.runtime` reads it
    artifacts/finetune/              the fine-tune's adapter, labels and info (for warm starts)
    input_example.json, requirements.txt, ...

`Classifier` is a thin adapter for both modalities: `inference.table_inputs` checks the table (a
`text` column, or an `image` column of encoded image bytes or paths for an image model),
`Predictor` scores it; no pre- or post-processing lives here. Stage outputs (encoder, adapter, deployable) become
MLflow 3 LoggedModels linked to their stage run; each carries the sha256 of its content
(`tunery.sha256`), so an output already logged is found, not logged again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from tunery import tracking
from tunery.errors import InputError, TuneryError
from tunery.modeling import finetune_dir as finetune_folder
from tunery.onnx import runtime as inference
from tunery.onnx.export import deployable_files, modality, read_manifest
from tunery.registry import refs
from tunery.vision.predict import IMAGE_COLUMN

log = logging.getLogger("tunery.mlflow_model")

DEPLOY = "deploy"  # the LoggedModel name and pyfunc artifact of the deployable ONNX folder
ADAPTER = "adapter"  # the fine-tune's LoggedModel: what a warm start needs
ADAPTER_FILES = finetune_folder.WARM_START_FILES  # from the finetune folder
SHA_TAG = "tunery.sha256"
KIND_TAG = "tunery.kind"
ADAPTER_TAG = "tunery.adapter_model_id"
MODEL_TYPES = {"text": "tunery-text-classifier", "image": "tunery-image-classifier"}
LEGACY_FINETUNE = "finetune"  # versions registered before LoggedModels carried the adapter here
CODE_FILE = Path(__file__).with_name("mlflow_model_code.py")
EXAMPLE_TEXTS = ["a small animal that lives in the wild", "a tool used for cutting wood"]


class Classifier(mlflow.pyfunc.PythonModel):
    """A table in (a `text` column, or an `image` column of image bytes or paths: the model's
    modality decides); label, its calibrated probability, per-class out."""

    # No type hints on `predict` (the signature is explicit, the input checked by
    # `inference.table_inputs`): MLflow would wrap it for hint-based validation and warn at class
    # definition that there are none. This class attribute is MLflow's own switch for that.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        # Predictor verifies the folder (manifest, sha256, external data) and refuses anything
        # that is not a Tunery deployable model.
        self.predictor = inference.Predictor(context.artifacts[DEPLOY], device="auto")

    # No type hints: MLflow would derive a (weaker) signature from them; ours is explicit.
    def predict(self, context, model_input, params=None):
        import pandas as pd

        try:
            items = inference.table_inputs(self.predictor, model_input)
        except (inference.BadInput, InputError) as exc:
            # INVALID_PARAMETER_VALUE: `mlflow models serve` answers 400 with this message.
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        return pd.DataFrame(self.predictor.predict(items).records())


# The name the code files of versions logged before images (`python_model.py`) import.
TextClassifier = Classifier


def signature(kind: str = "text") -> Any:
    """Input: one column, `text` (string) or `image` (binary: the encoded file's bytes, base64 in
    `mlflow models serve`'s JSON; a path string passes too); output: label (string), score
    (double), probabilities (map)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Map, Schema

    column = (
        ColSpec("binary", IMAGE_COLUMN)
        if kind == "image"
        else ColSpec("string", inference.TEXT_COLUMN)
    )
    return ModelSignature(
        inputs=Schema([column]),
        outputs=Schema(
            [
                ColSpec("string", "label"),
                ColSpec("double", "score"),
                ColSpec(Map("double"), "probabilities"),
            ]
        ),
    )


def input_example(manifest: Mapping[str, Any], example_texts: Sequence[str] | None = None) -> Any:
    """A small table of what the model takes: texts, or one mid-grey PNG at the model's size
    and mode (made here from the processor contract: no data needed)."""
    import pandas as pd

    if modality(dict(manifest)) != "image":
        return pd.DataFrame({inference.TEXT_COLUMN: list(example_texts or EXAMPLE_TEXTS)[:3]})
    import io

    from PIL import Image

    from tunery.vision.processor import from_contract

    cfg = from_contract(manifest["processor"])
    buf = io.BytesIO()
    Image.new(cfg.mode, (cfg.size, cfg.size), 128 if cfg.channels == 1 else (128,) * 3).save(
        buf, format="PNG"
    )
    return pd.DataFrame({IMAGE_COLUMN: [buf.getvalue()]})


REQUIREMENTS = {
    "text": ("onnxruntime", "tokenizers", "transformers", "numpy", "pandas", "tunery"),
    "image": ("onnxruntime", "pillow", "torch", "pydantic", "numpy", "pandas", "tunery"),
}


def _requirements(modality: str = "text") -> list[str]:
    from importlib import metadata

    reqs = []
    for dist in REQUIREMENTS[modality]:
        with contextlib.suppress(metadata.PackageNotFoundError):
            reqs.append(f"{dist}=={metadata.version(dist)}")
    return reqs


def content_sha(folder: Path) -> str:
    """sha256 over a folder's files (relative names and bytes), in a stable order."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def find_logged_model(experiment_id: str, sha: str, kind: str) -> Any | None:
    """A READY LoggedModel of `kind` with this content hash, or None."""
    found = tracking.retry_locked(
        mlflow.search_logged_models,
        experiment_ids=[experiment_id],
        filter_string=f"tags.`{SHA_TAG}` = '{sha}' AND tags.`{KIND_TAG}` = '{kind}'",
        max_results=10,
        output_format="list",
    )
    ready = [m for m in found if str(m.status) in ("READY", "LoggedModelStatus.READY")]
    return ready[0] if ready else None


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # same filesystem: no second copy of the weights on disk
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def _staged(folders: Mapping[str, Path], only: Sequence[str] = ()) -> Iterator[Path]:
    """A temporary folder with `name/` for each folder (MLflow keeps basenames and refuses
    symlinks), hard-linked beside the source when the filesystem allows; `only`: top-level names
    kept from each folder (all when empty)."""
    first = Path(next(iter(folders.values())))
    with tempfile.TemporaryDirectory(dir=first.parent, prefix=".tunery-stage-") as tmp:
        for key, folder in folders.items():
            dest = Path(tmp) / key
            if not only:
                shutil.copytree(folder, dest, copy_function=_link_or_copy)
                continue
            dest.mkdir()
            for name in only:
                src = Path(folder) / name
                if src.is_dir():
                    shutil.copytree(src, dest / name, copy_function=_link_or_copy)
                elif src.is_file():
                    _link_or_copy(str(src), str(dest / name))
        yield Path(tmp)


def log_deployable(
    deploy_dir: Path,
    *,
    run_id: str,
    experiment_id: str,
    finetune_dir: Path | None = None,
    example_texts: Sequence[str] | None = None,
) -> str:
    """Log `deploy_dir` as the pyfunc LoggedModel (text or image in, as its manifest says) of the
    active run `run_id`; its id.

    The fine-tune's adapter is its own LoggedModel (logged here if no stage did), referenced by
    the tag `tunery.adapter_model_id`, not copied in. An identical deployable already logged in
    the experiment is reused: one copy of the weights however often it is registered.
    """
    sha = content_sha(deploy_dir)  # what is served changes with any file of the folder
    existing = find_logged_model(experiment_id, sha, DEPLOY)
    if existing is not None:
        log.info("deployable %s already logged as model %s", sha[:12], existing.model_id)
        return existing.model_id
    tags = {SHA_TAG: sha, KIND_TAG: DEPLOY}
    if finetune_folder.is_finetune_dir(finetune_dir):
        tags[ADAPTER_TAG] = log_output(
            ADAPTER, finetune_dir, run_id=run_id, experiment_id=experiment_id
        )
    manifest = read_manifest(deploy_dir)  # the pyfunc's Predictor verifies it when it loads
    kind = modality(manifest)
    with _staged({DEPLOY: deploy_dir}, deployable_files(deploy_dir)) as staged:
        info = tracking.retry_locked(
            mlflow.pyfunc.log_model,
            name=DEPLOY,
            python_model=str(CODE_FILE),
            artifacts={DEPLOY: str(staged / DEPLOY)},
            signature=signature(kind),
            input_example=input_example(manifest, example_texts),
            pip_requirements=_requirements(kind),
            model_type=MODEL_TYPES[kind],
            tags=tags,
        )
    if info.run_id != run_id:
        raise RuntimeError(f"logged model {info.model_id} went to run {info.run_id}, not {run_id}")
    return info.model_id


def log_output(kind: str, folder: Path, *, run_id: str, experiment_id: str) -> str:
    """Log a stage's model folder (an encoder, an adapter, ONNX graphs) as a LoggedModel of
    `run_id`; its id.

    Not a flavor: these folders are inputs of later stages, not models MLflow serves. A content
    already logged (an encoder pretrain left unchanged) is reused, never uploaded twice. The
    adapter is the warm-start subset of the fine-tune folder, not its merged copy.
    """
    with _staged({kind: folder}, ADAPTER_FILES if kind == ADAPTER else ()) as staged:
        src = staged / kind
        sha = content_sha(src)
        existing = find_logged_model(experiment_id, sha, kind)
        if existing is not None:
            log.info("%s unchanged (%s): logged as model %s", kind, sha[:12], existing.model_id)
            return existing.model_id
        model = tracking.retry_locked(
            mlflow.initialize_logged_model,
            name=kind,
            source_run_id=run_id,
            experiment_id=experiment_id,
            tags={SHA_TAG: sha, KIND_TAG: kind},
        )
        try:
            tracking.retry_locked(
                mlflow.MlflowClient().log_model_artifacts, model.model_id, str(src)
            )
        except BaseException:
            tracking.retry_locked(mlflow.finalize_logged_model, model.model_id, "FAILED")
            raise
    tracking.retry_locked(mlflow.finalize_logged_model, model.model_id, "READY")
    return model.model_id


def register_deployable(
    run: tracking.Run,
    deploy_dir: Path,
    name: str,
    *,
    tags: Mapping[str, Any] | None = None,
    finetune_dir: Path | None = None,
) -> str:
    """The deployable as a LoggedModel of `run` (or the one a stage logged), registered as a new
    version of `name`; the version number."""
    model_id = run.log_deployable(deploy_dir, finetune_dir=finetune_dir)
    return register(model_id, name, tags or {})


def link_metrics(run_id: str, model_id: str, metrics: Mapping[str, float]) -> None:
    """Record `metrics` on the run *for* the model: the Models tab shows them beside it."""
    if metrics:
        tracking.retry_locked(mlflow.log_metrics, dict(metrics), run_id=run_id, model_id=model_id)


def model_info(model_id: str) -> dict[str, Any]:
    m = tracking.retry_locked(mlflow.get_logged_model, model_id)
    return {
        "model_id": m.model_id,
        "name": m.name,
        "run_id": m.source_run_id,
        "tags": dict(m.tags),
        "metrics": {x.key: x.value for x in (m.metrics or [])},
    }


def register(model_id: str, name: str, tags: Mapping[str, Any]) -> str:
    """Register the LoggedModel as a new version of `name`; the version number."""
    version = tracking.retry_locked(
        mlflow.register_model,
        refs.logged_model_uri(model_id),
        name,
        tags={k: str(v) for k, v in tags.items()},
    )
    return str(version.version)


def version_model_id(mv: Any) -> str | None:
    """The LoggedModel behind a registry version: its `model_id`, else its `models:/<id>` source
    (the sqlite registry of MLflow 3.17 leaves `model_id` empty)."""
    if getattr(mv, "model_id", None):
        return mv.model_id
    return refs.logged_model_id(str(mv.source or ""))


def deploy_folder(downloaded: Path, uri: str) -> Path:
    """The deployable folder inside a downloaded registry version (`artifacts/deploy/`; versions
    registered before the pyfunc kept it at the top); a TuneryError for anything else."""
    from tunery.onnx.export import MANIFEST_FILE

    for folder in (Path(downloaded) / "artifacts" / DEPLOY, Path(downloaded)):
        if (folder / MANIFEST_FILE).is_file():
            return folder
    raise TuneryError(
        f"{uri}: not a Tunery model (no artifacts/{DEPLOY}/{MANIFEST_FILE}); it was registered "
        "by something other than Tunery's pipeline, so Tunery will not load it"
    )


def version_adapter(root: Path, name: str, version: str, dst: Path) -> Path | None:
    """Download the fine-tune (adapter, labels, info) behind a registered version; None if none.

    The version's LoggedModel names its adapter LoggedModel (`tunery.adapter_model_id`); older
    versions carried it in a `finetune/` subfolder."""
    client = tracking._client(root)
    model_id = version_model_id(client.get_model_version(name, str(version)))
    adapter_id = None
    if model_id:
        adapter_id = tracking.retry_locked(mlflow.get_logged_model, model_id).tags.get(ADAPTER_TAG)
    uri = (
        refs.logged_model_uri(adapter_id)
        if adapter_id
        else f"{refs.version_uri(name, version)}/{LEGACY_FINETUNE}"
    )
    try:
        got = tracking.retry_locked(
            mlflow.artifacts.download_artifacts, artifact_uri=uri, dst_path=str(dst)
        )
    except MlflowException as exc:
        log.warning("%s: no fine-tune to download (%s)", uri, str(exc).splitlines()[0][:200])
        return None
    got = Path(got)
    return got if finetune_folder.is_finetune_dir(got) else None
