"""The modality seam: where text (today) and images (next) differ, and nothing else does.

    data source          a labelled split as (items, label ids)        `read_split`
    processor            the tokenizer (text) / image transforms        `processor`
    model factory        encoder + classification head                 `load_base`
    ONNX inputs          the graph's input names                        `onnx_inputs`
    predictor inputs     items -> the arrays the ONNX session is fed    `predictor_inputs`

The stages, tracking, registry, gate and flows only pass these values along. `TEXT` is the text
implementation, each step one existing function; a second modality is a second implementation of
`Modality` beside it, without touching the text path's internals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tunery.data.labelled import Split


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
