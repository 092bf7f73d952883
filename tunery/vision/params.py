"""Typed view of the image pipeline's `vision/params.yaml`: the vision counterpart of `tunery.config`.

The image pipeline is a second pipeline folder (`vision/`, its own `params.yaml` and `dvc.yaml`)
with the text pipeline's DAG shape. Sections are named like their stages (`tasks/vision/<stage>.py`,
the `vision/dvc.yaml` stage, the MLflow run); the shared concerns (tracking, registry, pipeline)
reuse the text sections as they are, so the registry and the promotion gate
(`tunery.registry.*`) read either. The knobs of the modeling layer keep their one definition in
`tunery.vision` (`ProcessorConfig`, `VitSpec`, `SimCLRSettings`, `AugmentConfig`); this module
only arranges them into stages. Unknown keys and wrong types fail with the key path.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field, ValidationError, model_validator

from tunery.config import (
    BenchConfig,
    CorpusConfig,
    DriftConfig,
    PipelineConfig,
    PrepareConfig,
    PruneConfig,
    RegistryConfig,
    Section,
    TrackingConfig,
    _apply_override,
    _format_errors,
    load_raw,
    stage_model_outputs,
)
from tunery.data.images import ImageChecks
from tunery.errors import ConfigError
from tunery.vision.augment import AugmentConfig
from tunery.vision.processor import ProcessorConfig
from tunery.vision.settings import MAESettings, SimCLRSettings
from tunery.vision.vit import VitSpec

MODALITY = "image"  # the top-level `modality:` key that marks a vision params file


# --------------------------------------------------------------------------- ingest
class FashionMnistSource(Section):
    """The demo: Debian's dataset-fashion-mnist, a class-balanced labelled subset of its training
    split and the other training images as the unlabelled pool (both written as PNGs)."""

    kind: Literal["fashion_mnist"] = "fashion_mnist"
    path: str = "/usr/share/datasets/fashion-mnist"
    per_class: int = Field(gt=0)  # labelled images per class (all splits together)
    unlabelled_max: int = Field(ge=0)  # training images outside the labelled ones, for SimCLR


class FolderSource(Section):
    """Your images, a folder per class (`<path>/<label>/*.png`)."""

    kind: Literal["folder"] = "folder"
    path: str
    unlabelled_path: str | None = None  # a folder of unlabelled images (any depth)


class ManifestSource(Section):
    """Your images, listed in a CSV/JSONL/Parquet manifest (paths relative to the manifest)."""

    kind: Literal["manifest"] = "manifest"
    path: str
    image_column: str = "image"
    label_column: str = "label"
    unlabelled_path: str | None = None


ImageSource = Annotated[
    FashionMnistSource | FolderSource | ManifestSource, Field(discriminator="kind")
]


class VisionIngestConfig(Section):
    source: ImageSource
    # Drops taken in by `tunery retrain` (a folder each: tunery/data/image_dataset.py) are
    # appended to the source's images on the next run.
    incoming: str = "data/incoming"
    checks: ImageChecks = ImageChecks()
    out_dir: str = "data/raw"  # labelled.parquet, unlabelled.parquet, images/ (the demo's PNGs)


# --------------------------------------------------------------------------- pretrain
class VisionPretrainConfig(Section):
    """Self-supervised pretraining on the unlabelled pool (plus the train split's images, labels
    unused): SimCLR (`simclr`) or MAE (`mae`), each with its own schedule."""

    init: Literal["scratch", "base"] = "scratch"  # scratch: a ViT of `vit`'s size; base: `base`
    base: str | None = None  # a ViT model folder (its encoder is the starting point)
    objective: Literal["simclr", "mae"] = "simclr"
    vit: VitSpec = VitSpec()
    simclr: SimCLRSettings = SimCLRSettings()
    mae: MAESettings = MAESettings()
    augment: AugmentConfig = AugmentConfig()
    probe_max_train: int = Field(default=2000, gt=0)  # train images for the linear probe
    checkpoint_dir: str = "checkpoints/pretrain"  # resume point, outside the DVC output
    out_dir: str = "models/encoder"  # init/ (the weights SimCLR started from), model/ (after it)
    OUTPUTS: ClassVar[dict[str, str]] = {"encoder": "out_dir"}

    @property
    def schedule(self) -> SimCLRSettings | MAESettings:
        """The chosen objective's settings (its schedule and its knobs)."""
        return self.simclr if self.objective == "simclr" else self.mae


# --------------------------------------------------------------------------- finetune
class VisionLora(Section):
    r: int = Field(default=8, gt=0)
    alpha: int = Field(default=16, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    learning_rate: float = Field(default=2.0e-3, gt=0.0)


class VisionFull(Section):
    learning_rate: float = Field(default=5.0e-4, gt=0.0)


class VisionFinetuneConfig(Section):
    """Supervised fine-tuning on the (low-label) train split, and its comparison arms."""

    method: Literal["lora", "full"] = "lora"
    lora: VisionLora = VisionLora()
    full: VisionFull = VisionFull()
    batch_size: int = Field(default=64, gt=0)
    max_steps: int = Field(default=150, gt=0)  # every arm: equal work
    weight_decay: float = Field(default=0.05, ge=0.0)
    warmup_share: float = Field(default=0.1, ge=0.0, lt=1.0)
    augment: AugmentConfig | None = None  # views of the labelled images (augment.py), or none
    head_init: Literal["random", "probe"] = "random"  # probe: LP-FT (tunery/vision/finetune.py)
    seed: int = 0
    # Arms (arms.json): probe (frozen SimCLR encoder + logreg), base (the method on the weights
    # SimCLR started from: no pretraining), pipeline (on SimCLR's output), full (all weights, on
    # the chosen encoder). The better of pipeline/base by val macro-F1 is saved (pretrain gate).
    # false: the pipeline arm only, no gate.
    ablations: bool = True
    out_dir: str = "models/finetune"


# --------------------------------------------------------------------------- export / compress
class VisionExportConfig(Section):
    opset: int = Field(default=17, ge=17, le=20)
    max_logit_diff: float = Field(default=1.0e-3, gt=0.0)  # fp32 ONNX vs PyTorch on test
    min_agreement: float = Field(default=0.99, ge=0.0, le=1.0)
    out_dir: str = "models/onnx"


VisionVariant = Literal["fp32", "fp16", "int8_dynamic", "int8_static"]


class VisionPruneConfig(PruneConfig):
    """The text compress's pruning settings (`tunery.config.PruneConfig`: layers, heads, FFN
    share, `recovery`) for the ViT (`tunery.vision.prune`), plus the images the recovery
    distils on: up to `images` of the unlabelled pool, and the train split's (labels unused)."""

    images: int = Field(default=4096, ge=0)


class VisionCompressConfig(Section):
    """The text compress's rule: the fastest variant on `target_provider` whose macro-F1 on val +
    test is at most `max_f1_drop` below PyTorch's; fp16 targets CUDA only."""

    variants: list[VisionVariant] = Field(
        default=["fp32", "int8_dynamic", "int8_static", "fp16"], min_length=1
    )
    calibration_samples: int = Field(default=256, gt=0)  # train images: static int8 ranges
    target_provider: Literal["cpu", "cuda"] = "cpu"
    max_f1_drop: float = Field(default=0.005, ge=0.0, le=1.0)
    rank_by: Literal["throughput", "latency_p50"] = "throughput"
    bench: BenchConfig = BenchConfig()
    # What throughput is timed by (tunery/vision/deploy.py `clock`): cpu, the calling thread's CPU
    # time (needs bench.threads 1: both runtimes then compute on that thread), or wall.
    clock: Literal["cpu", "wall"] = "wall"
    # enabled: pruned_fp32 and pruned_int8_dynamic join the variants, judged by the same rule.
    prune: VisionPruneConfig = VisionPruneConfig()
    variants_dir: str = "models/variants"
    out_dir: str = "models/deploy"  # the deployable model (modality image, calibrated)
    report_dir: str = "reports/compress"

    @model_validator(mode="after")
    def _cpu_clock_on_one_thread(self) -> VisionCompressConfig:
        if self.clock == "cpu" and self.bench.threads != 1:
            raise ValueError(
                "compress.clock cpu needs compress.bench.threads 1 (with more threads the work "
                "runs outside the calling thread, which is all its clock sees)"
            )
        return self


# --------------------------------------------------------------------------- evaluate
class VisionEvaluateConfig(Section):
    # "registry": the MLflow champion of registry.model_name (scored on the same holdout), or a
    # deployable folder, or null.
    champion: str | None = "registry"
    calibration_bins: int = Field(default=10, gt=0)
    confident_wrong: int = Field(default=16, ge=0)  # images in the confidently-wrong grid
    baseline: bool = True  # logistic regression on raw pixels, same train split
    report_dir: str = "reports/evaluate"


# --------------------------------------------------------------------------- retrain
class VisionRetrainConfig(Section):
    """The scheduled retrain: labelled image drops (a folder each) land here, are checked with the
    ingest's rules and taken in as a new data version (tunery/runner/landing.py). Drift is the
    text pipeline's domain-classifier AUC, on the SimCLR encoder's image embeddings;
    `drift.reference_rows` training images are the reference."""

    landing: str = "data/landing"
    push: bool = True  # `dvc push` each new data version to the default remote
    drift: DriftConfig = DriftConfig(reference_rows=500)


# --------------------------------------------------------------------------- root
class VisionParams(Section):
    modality: Literal["image"] = MODALITY
    tracking: TrackingConfig = TrackingConfig(experiment="tunery-vision", log_models=["encoder"])
    registry: RegistryConfig = RegistryConfig(model_name="tunery-image-classifier")
    pipeline: PipelineConfig = PipelineConfig()
    processor: ProcessorConfig = ProcessorConfig()
    ingest: VisionIngestConfig
    prepare: PrepareConfig
    corpus: CorpusConfig = CorpusConfig()  # the text section: SimCLR's pool snapshot and policy
    pretrain: VisionPretrainConfig = VisionPretrainConfig()
    finetune: VisionFinetuneConfig = VisionFinetuneConfig()
    export: VisionExportConfig = VisionExportConfig()
    compress: VisionCompressConfig = VisionCompressConfig()
    evaluate: VisionEvaluateConfig = VisionEvaluateConfig()
    retrain: VisionRetrainConfig = VisionRetrainConfig()

    def section(self, name: str) -> Section:
        """A stage's params: its own section; the register stage reads `registry`."""
        return getattr(self, {"register": "registry"}.get(name, name))

    def model_outputs(self, stage: str) -> dict[str, str]:
        """The model folders `stage` writes (tunery/stage.py logs those `tracking.log_models` names)."""
        return stage_model_outputs(self, stage)


def is_vision(tree: dict) -> bool:
    """Whether a parsed params file is the image pipeline's (its `modality: image`)."""
    return tree.get("modality") == MODALITY


def load_vision_params(path: str | Path, overrides: Iterable[str] = ()) -> VisionParams:
    """Parse and validate `vision/params.yaml` (plus `section.key=value` overrides)."""
    tree = load_raw(Path(path))
    overrides = list(overrides)
    for assignment in overrides:
        _apply_override(tree, assignment)
    if not is_vision(tree):
        raise ConfigError(f"{path}: not the image pipeline's params (no `modality: image`)")
    try:
        return VisionParams.model_validate(tree)
    except ValidationError as exc:
        source = str(path) + (" (with --set overrides)" if overrides else "")
        raise ConfigError(_format_errors(exc, source)) from None
