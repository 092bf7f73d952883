"""The modality seam: where text (today) and images (next) differ, and nothing else does.

    data source          a labelled split as (items, label ids)        `read_split`
    processor            the tokenizer (text) / image transforms        `processor`
    model factory        encoder + classification head                 `load_base`
    ONNX inputs          the graph's input names                        `onnx_inputs`
    predictor inputs     items -> the arrays the ONNX session is fed    `predictor_inputs`

The stages, tracking, registry, gate and flows only pass these values along. `TEXT` is the text
implementation, each step one existing function; a second modality is a second implementation of
`Modality` beside it, without touching the text path's internals.

Retraining has its own, smaller seam (`Intake`): what landed, its check against the dataset it
joins, its copy into the incoming folder, its drift and a demo drop. The rest of a retrain (the
lock, the order "check everything, then move", `dvc add`/`push`, the drift trigger, the flow, the
gate) is one piece of code for both (tunery/runner/landing.py, flows/retrain.py); `intake_of`
picks the implementation from the params (`modality: image` marks the image pipeline's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tunery.data.labelled import Split

IMAGE = "image"


@runtime_checkable
class Modality(Protocol):
    name: str

    def read_split(self, path: Path, labels: Sequence[str]) -> Split: ...

    def processor(self, model_dir: Path) -> Any: ...

    def load_base(
        self, encoder: Path, labels: Sequence[str], *, init: str = "pretrained", seed: int = 0
    ) -> tuple[Any, list[str]]: ...

    def onnx_inputs(self, processor: Any, model: Any) -> list[str]: ...

    def predictor_inputs(
        self, processor: Any, items: Sequence[Any], max_length: int
    ) -> list[dict[str, list[int]]]: ...


@dataclass(frozen=True)
class Text:
    """Texts: parquet splits with a `text` column, a Hugging Face tokenizer, a sequence classifier."""

    name: str = "text"

    def read_split(self, path: Path, labels: Sequence[str]) -> Split:
        from tunery.data.labelled import load_split

        return load_split(path, labels)

    def processor(self, model_dir: Path) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir))

    def load_base(
        self, encoder: Path, labels: Sequence[str], *, init: str = "pretrained", seed: int = 0
    ) -> tuple[Any, list[str]]:
        from tunery.modeling.methods import load_base

        return load_base(encoder, labels, init=init, seed=seed)

    def onnx_inputs(self, processor: Any, model: Any) -> list[str]:
        from tunery.onnx.export import input_names_for

        return input_names_for(processor, model)

    def predictor_inputs(
        self, processor: Any, items: Sequence[Any], max_length: int
    ) -> list[dict[str, list[int]]]:
        from tunery.data.tokens import unpadded

        return unpadded(processor, [str(x) for x in items], max_length=max_length)


TEXT = Text()


# --------------------------------------------------------------------------- retraining
@runtime_checkable
class Intake(Protocol):
    """New labelled data for a retrain, as one modality sees it (tunery/runner/landing.py runs it)."""

    name: str

    def landed(self, root: Path, params: Any) -> list[Path]:
        """What waits in `retrain.landing` (files for text, drop folders for images)."""
        ...

    def check(self, root: Path, params: Any, new: list[Path]) -> list[Any]:
        """Validate every landed item, alone and with the dataset it joins, before any moves;
        raise a DataValidationError naming the file and the rule; return the new items (texts,
        image files) for the drift measurement."""
        ...

    def add(self, root: Path, params: Any, item: Path) -> Path:
        """Copy one checked landed item into `ingest.incoming` (atomically); return the copy."""
        ...

    def drift(self, root: Path, params: Any, items: list[Any]) -> dict[str, Any] | None:
        """`tunery.evaluation.drift.score` of the items vs the training split with the pipeline's
        encoder; None when there is no encoder or training split yet."""
        ...

    def demo_drop(self, root: Path, params: Any, per_class: int) -> Path:
        """Write the next demo drop (data the pipeline has not used) into the landing folder."""
        ...


def is_image(params: Any) -> bool:
    """Whether `params` are the image pipeline's (`modality: image`)."""
    return getattr(params, "modality", "text") == IMAGE


def intake_of(params: Any) -> Intake:
    """The retrain intake of the pipeline `params` belong to."""
    if is_image(params):
        from tunery.vision.retrain import IMAGE_INTAKE

        return IMAGE_INTAKE
    from tunery.data.intake import TEXT_INTAKE

    return TEXT_INTAKE


def load_params(path: Path, overrides: Sequence[str] = ()) -> Any:
    """A pipeline folder's params: the image pipeline's (`modality: image`) or the text one's."""
    from tunery.config import load_raw

    if load_raw(Path(path)).get("modality") == IMAGE:
        from tunery.vision.params import load_vision_params

        return load_vision_params(path, overrides)
    from tunery.config import load_params as load_text_params

    return load_text_params(path, overrides)
