"""Typed view of `params.yaml`: parsed once into frozen pydantic models.

Every section is named like the stage that reads it (`ingest:` -> `IngestConfig` -> `tasks/ingest.py`).
Unknown keys and wrong types fail with the key path and what was expected, before any work starts.
The defaults are the general-purpose values; where the committed params.yaml (the CPU demo) sets
other ones is listed once, with the reason, in `DEMO_OVERRIDES` at the end.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunery.errors import ConfigError

PARAMS_FILE = "params.yaml"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # The model folders the stage of this section writes: output name -> the field holding the
    # folder. Declared once here, on the section that names the folder; `model_outputs` and
    # `STAGE_OUTPUTS` below read it (tunery/stage.py logs them, `tracking.log_models` picks).
    OUTPUTS: ClassVar[dict[str, str]] = {}

    def outputs(self) -> dict[str, str]:
        """The model folders this section's stage writes, by output name (project-relative)."""
        return {name: getattr(self, field) for name, field in self.OUTPUTS.items()}


def stage_model_outputs(params: Section, stage: str) -> dict[str, str]:
    """The model folders `stage` of a pipeline's params writes (none for a stage that writes none):
    text (`Params`) and image (`tunery.vision.params.VisionParams`) pipelines alike."""
    section = getattr(params, stage, None)
    return section.outputs() if isinstance(section, Section) else {}


# --------------------------------------------------------------------------- tracking
# The names of the stage outputs (the sections' OUTPUTS keys; tests/test_params.py keeps the two
# equal): a Literal so that a typo in `tracking.log_models` fails validation with the choices.
StageOutput = Literal["encoder", "adapter", "onnx", "variants", "deploy"]
DEFAULT_LOGGED: tuple[StageOutput, ...] = ("encoder", "adapter", "deploy")


class TrackingConfig(Section):
    experiment: str = "tunery"
    # Stage outputs logged as MLflow LoggedModels of their stage runs (each content logged once:
    # an unchanged encoder or adapter links to its earlier copy). encoder (pretrain), adapter
    # (finetune: adapter + labels, not the merged copy), onnx (export's fp32 graphs), variants
    # (every compression candidate), deploy (the deployable model, a text-in pyfunc). The
    # registered version is always the deployable LoggedModel. true: the default; false: none.
    log_models: list[StageOutput] = Field(default_factory=lambda: list(DEFAULT_LOGGED))

    @model_validator(mode="before")
    @classmethod
    def _bool_log_models(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("log_models"), bool):
            data = {**data, "log_models": list(DEFAULT_LOGGED) if data["log_models"] else []}
        return data


# --------------------------------------------------------------------------- ingest
class WordnetSource(Section):
    """The built-in demo source: WordNet noun glosses labelled by lexicographer category."""

    kind: Literal["wordnet"] = "wordnet"
    path: str = "/usr/share/wordnet"
    categories: list[str] = Field(min_length=2)
    max_per_class: int = Field(gt=0)
    include_examples: bool = False
    # Glosses not used as labelled examples (other categories, beyond the cap, other parts of
    # speech) feed the unlabelled pretraining corpus, up to this many.
    unlabelled_max: int = Field(default=20000, ge=0)


class FilesSource(Section):
    """User data: a CSV, JSONL or Parquet file, or a folder of them."""

    kind: Literal["files"] = "files"
    path: str
    text_column: str = "text"
    label_column: str = "label"
    # Optional plain-text files (one text per line), or a folder of .txt files, for pretraining.
    unlabelled_path: str | None = None


class IngestConfig(Section):
    source: Annotated[WordnetSource | FilesSource, Field(discriminator="kind")]
    # Labelled files dropped here (or added with `tunery data add`) are appended on the next run.
    incoming: str = "data/incoming"
    labels: list[str] | None = None  # the declared label set; None accepts any label
    min_per_class: int = Field(default=10, ge=1)
    max_text_chars: int = Field(default=2000, gt=0)
    duplicates: Literal["drop", "reject"] = "drop"
    # A new file whose labels the data does not have yet is refused (a typo, another task's file)
    # unless new classes are allowed: then it adds a class.
    allow_new_labels: bool = False
    out_dir: str = "data/raw"


# --------------------------------------------------------------------------- prepare
class SplitFractions(Section):
    val: float = Field(ge=0.0, lt=1.0)
    test: float = Field(gt=0.0, lt=1.0)
    holdout: float = Field(gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _leave_room_for_train(self) -> SplitFractions:
        if self.val + self.test + self.holdout >= 0.9:
            raise ValueError("val + test + holdout must leave at least 10 % for train")
        return self


class PrepareConfig(Section):
    # Salt of the split hash: changing it reshuffles every split (and so invalidates comparisons).
    split_salt: str = "tunery-v1"
    fractions: SplitFractions
    # Rows appended after the first data version never enter the holdout (they go to test), so
    # every model ever trained is scored on the very same holdout.
    freeze_holdout: bool = True
    out_dir: str = "data/prepared"


# --------------------------------------------------------------------------- registry
class RegistryConfig(Section):
    """The MLflow model registry and the promotion gate (challenger -> champion)."""

    model_name: str = "tunery-classifier"
    # Promote only if holdout macro-F1 >= champion's + min_delta ...
    min_delta: float = Field(default=0.0, ge=0.0)
    # ... and no class F1 drops by more than this (absolute) ...
    max_class_drop: float = Field(default=0.05, ge=0.0, le=1.0)
    # ... and, for the first model (no champion yet), holdout macro-F1 >= floor.
    floor_macro_f1: float = Field(default=0.5, ge=0.0, le=1.0)


# --------------------------------------------------------------------------- finetune
class LoraMethod(Section):
    r: int = Field(default=7, gt=0)  # 7: adapters + pooler + head stay under 2 % of MiniLM-L6
    alpha: int = Field(default=16, gt=0)
    # 0: peft then skips the dropout of each adapter's input (a copy of every adapted layer's
    # input per step). At 0.1 the demo's LoRA arm trained slower than full fine-tuning (71 vs
    # 61 s, 2 cores); a step of 32 short texts: 342 ms at 0.1, 226 ms at 0, full 392 ms. The
    # encoder's own dropout still regularises.
    # Same run, holdout macro-F1 at 0 vs 0.1: demo 0.9030 vs 0.8971, fortunes 0.8134 vs 0.8107.
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    # "all-linear": every linear layer of the encoder (attention and feed-forward, BERT's pooler),
    # never the classification head or a newly initialised module (those train fully). None:
    # peft's default for the architecture (BERT: query, value). Or module names (suffixes).
    target_modules: list[str] | Literal["all-linear"] | None = "all-linear"
    use_rslora: bool = False  # scale by alpha / sqrt(r) instead of alpha / r
    # Modules (name suffixes) trained fully beside the adapters, like the classifier: BERT's
    # pooler is the classification path's first layer (demo: LoRA without it 2.4 pt below full
    # fine-tuning on the holdout, with it 0.2 pt).
    train_fully: list[str] = ["pooler"]
    learning_rate: float = Field(default=2.0e-3, gt=0.0)


class IA3Method(Section):
    # None: peft's defaults for the architecture (BERT: key, value, output.dense).
    target_modules: list[str] | None = None
    feedforward_modules: list[str] | None = None
    learning_rate: float = Field(default=5.0e-3, gt=0.0)


class AdaLoraMethod(Section):
    init_r: int = Field(default=12, gt=0)
    target_r: int = Field(default=4, gt=0)
    alpha: int = Field(default=16, gt=0)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None
    # Rank budgeting runs between these shares of the total steps (peft's tinit / total - tfinal).
    warmup_share: float = Field(default=0.1, ge=0.0, lt=1.0)
    final_share: float = Field(default=0.3, ge=0.0, lt=1.0)
    delta_t: int = Field(default=5, gt=0)
    learning_rate: float = Field(default=1.0e-3, gt=0.0)

    @model_validator(mode="after")
    def _leave_room_for_budgeting(self) -> AdaLoraMethod:
        if self.warmup_share + self.final_share >= 0.9:
            raise ValueError("warmup_share + final_share must leave room for rank budgeting")
        if self.target_r > self.init_r:
            raise ValueError("target_r must not exceed init_r")
        return self


class PrefixMethod(Section):
    num_virtual_tokens: int = Field(default=16, gt=0)
    projection: bool = False  # reparameterise the prefix through an MLP
    learning_rate: float = Field(default=1.0e-2, gt=0.0)


class FullMethod(Section):
    # Higher than BERT-base's usual 2-5e-5: the demo encoder is small and briefly pretrained.
    learning_rate: float = Field(default=1.0e-4, gt=0.0)


class AblationConfig(Section):
    """The finetune stage's arms (base, full, probe) and the pretrain gate; off: the main arm only.

    Every arm trains with the main method's schedule (`finetune.epochs`, seed), so there is no
    separate epoch cap.
    """

    enabled: bool = False


class FinetuneConfig(Section):
    method: Literal["lora", "ia3", "adalora", "prefix", "full"] = "lora"
    # None: the pretrain stage's output (pretrain.out_dir). Or any from_pretrained-loadable dir.
    encoder: str | None = None
    # None: start fresh from the encoder. "champion": the registry champion's adapter (fresh when
    # there is none yet). Or a previous finetune output dir.
    warm_start: str | None = None
    lora: LoraMethod = LoraMethod()
    ia3: IA3Method = IA3Method()
    adalora: AdaLoraMethod = AdaLoraMethod()
    prefix: PrefixMethod = PrefixMethod()
    full: FullMethod = FullMethod()
    max_length: int = Field(default=128, gt=0)
    epochs: float = Field(default=8.0, gt=0.0)  # the demo's params.yaml: 2 (DEMO_OVERRIDES)
    batch_size: int = Field(default=32, gt=0)
    eval_batch_size: int = Field(default=128, gt=0)
    weight_decay: float = Field(default=0.01, ge=0.0)
    warmup: float = Field(default=0.06, ge=0.0, lt=1.0)  # share of the steps
    early_stopping_patience: int = Field(default=2, ge=1)
    class_weights: Literal["none", "balanced"] = "none"
    seed: int = 42
    # Bit-identical re-runs (Trainer's full_determinism: deterministic kernels). None: on CPU only,
    # where it is cheap; on CUDA it costs speed, so it is opt-in there.
    deterministic: bool | None = None
    # The merged model must reproduce the adapter model's logits within this (max abs difference).
    merge_tolerance: float = Field(default=1.0e-3, gt=0.0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on a GPU that has it
    compile: bool | None = None  # None: on CUDA only
    # torch.compile mode. auto: "reduce-overhead" (CUDA graphs: short texts make the step
    # launch-bound) on CUDA for lora/ia3/full, torch's default otherwise.
    compile_mode: Literal[
        "auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = "auto"
    # Pad batches to a multiple of this (few shapes for compile / CUDA graphs). None: 32 on CUDA,
    # no rounding on CPU.
    pad_to_multiple_of: int | None = Field(default=None, gt=0)
    dataloader_workers: int | None = Field(default=None, ge=0)  # None: 2 on CUDA, 0 on CPU
    group_by_length: bool = True
    threads: int = Field(default=0, ge=0)  # torch CPU threads; 0: torch's default
    checkpoint_dir: str = "checkpoints/finetune"
    ablations: AblationConfig = AblationConfig()  # the demo's params.yaml: on (DEMO_OVERRIDES)
    out_dir: str = "models/finetune"

    OUTPUTS: ClassVar[dict[str, str]] = {"adapter": "out_dir"}


# --------------------------------------------------------------------------- evaluate
class EvaluateConfig(Section):
    # What to compare against on the same holdout: "registry" (the MLflow `champion` of
    # registry.model_name, if any), a finetune output dir or deployable ONNX folder, or None.
    champion: str | None = None
    calibration_bins: int = Field(default=10, gt=0)
    confident_wrong: int = Field(default=10, ge=0)
    batch_size: int = Field(default=128, gt=0)
    # Where the served model is scored: auto (CUDA when the deployed variant targets it and a GPU
    # is there) | cpu | cuda (refuses to fall back to the CPU).
    device: Literal["auto", "cpu", "cuda"] = "auto"
    baseline: bool = True  # TF-IDF + logistic regression trained on the same train split
    report_dir: str = "reports/evaluate"


# --------------------------------------------------------------------------- export
class ExportConfig(Section):
    """Merged fine-tuned model -> one checked, optimized fp32 ONNX model."""

    opset: int = Field(default=17, ge=17, le=20)  # the TorchScript exporter stops at 20
    # onnxruntime's transformer optimizer (fused attention, layer norm, GELU) for BERT-family encoders.
    optimize: bool = True
    # The ONNX model must reproduce PyTorch on the test split: max |logit difference| and agreement.
    max_logit_diff: float = Field(default=1.0e-3, gt=0.0)
    min_agreement: float = Field(default=0.99, ge=0.0, le=1.0)
    batch_size: int = Field(default=64, gt=0)
    out_dir: str = "models/onnx"

    OUTPUTS: ClassVar[dict[str, str]] = {"onnx": "out_dir"}


# --------------------------------------------------------------------------- compress
VariantName = Literal["fp32", "fp16", "int8_dynamic", "int8_static"]


class RecoveryConfig(Section):
    """Distillation of the pruned model towards the unpruned fine-tune on the train split
    (`tunery.onnx.distill`); steps 0 = the pruned weights as they are."""

    steps: int = Field(default=0, ge=0)
    batch_size: int = Field(default=32, gt=0)
    lr: float = Field(default=1.0e-4, gt=0.0)
    weight_decay: float = Field(default=0.01, ge=0.0)
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0)
    temperature: float = Field(default=2.0, gt=0.0)  # of the KL term
    kd_weight: float = Field(default=0.5, ge=0.0, le=1.0)  # KL share; the rest cross-entropy
    # Layer-wise distillation: MSE of each layer's hidden states to the teacher's (normalized).
    hidden_weight: float = Field(default=0.0, ge=0.0)
    # Quantization-aware recovery: the student's Linear layers (and its frozen embeddings) are
    # fake-quantized the way onnxruntime's dynamic int8 quantizes them (`distill.fake_quantized`),
    # so it learns weights that survive the int8 graph; the export stays a float graph.
    quant_aware: bool = False
    seed: int = 0


class PruneConfig(Section):
    """Structured pruning before export (whole layers; heads and FFN neurons by importance on the
    calibration texts), then (with `recovery.steps`) distillation towards the unpruned model.

    Variants pruned_fp32 / pruned_int8_dynamic, kept only when within `max_f1_drop`.
    """

    enabled: bool = False
    # Attention heads removed per layer (importance: mean norm of the head's contribution to the
    # attention output; the output projection is refitted by least squares).
    heads: int = Field(default=0, ge=0)
    # Share of FFN neurons removed per layer (importance: mean |activation| x output weight norm).
    ffn_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    # Whole encoder layers removed (first, before heads/FFN are scored), which ones by
    # `layer_choice`: spread = evenly spaced kept layers, the first and the last among them
    # (DistilBERT-style); top = the last ones go (Sajjad et al., "Poor Man's BERT", where the
    # task fine-tune comes after the drop). Dropped from a finished fine-tune, the last layer is
    # the one its classifier reads: on the demo (2 of 6 dropped, FFN 50 %) spread cost -14.9 pt
    # as pruned and -1.3 pt after 300 recovery steps, top -87 pt and -1.7 pt. At least one
    # layer must stay (checked against the model when built).
    layers: int = Field(default=0, ge=0)
    layer_choice: Literal["top", "spread"] = "spread"
    recovery: RecoveryConfig = RecoveryConfig()

    @model_validator(mode="after")
    def _something_to_prune(self) -> PruneConfig:
        if self.enabled and not self.heads and not self.ffn_fraction and not self.layers:
            raise ValueError("prune.enabled needs layers, heads and/or ffn_fraction > 0")
        return self


class Int8Config(Section):
    """Dynamic int8 (CPU) options."""

    per_channel: bool = True  # one weight scale per output column (accuracy)
    reduce_range: bool = True  # 7-bit weights: no int16 saturation on AVX2 CPUs without VNNI
    # SkipLayerNormalization -> Sum + LayerNormalization: onnxruntime's CPU kernel for the fused
    # op is the slow one (~13 % of the int8 graph's time on the demo model).
    plain_layer_norm: bool = True
    # Token-wise ops (projections, FFN, layer norms) on the real tokens only, not the padding.
    pack_tokens: bool = True
    exclude: list[str] = []  # node names (or substrings) kept in float
    # Accuracy-aware fallback: when the variant misses `max_f1_drop`, keep up to this many of its
    # most sensitive quantized nodes in float (tries 1, 2, 4, ... nodes); 0 = off.
    max_fallback_nodes: int = Field(default=8, ge=0)

    def quantize_options(self) -> dict[str, Any]:
        """The keyword arguments of `compression.quantize_int8_dynamic`."""
        return self.model_dump(exclude={"max_fallback_nodes"})


class BenchConfig(Section):
    warmup: int = Field(default=5, ge=0)
    latency_runs: int = Field(default=50, gt=0)  # batch-1 calls timed (p50/p95)
    throughput_batch: int = Field(default=64, gt=0)
    # Batches of real test texts timed, sorted by length as the Predictor batches them.
    throughput_batches: int = Field(default=4, gt=0)
    throughput_repeats: int = Field(default=3, gt=0)  # timed passes; the median is reported
    threads: int = Field(default=0, ge=0)  # onnxruntime/torch intra-op threads; 0 = their default


class CompressConfig(Section):
    """ONNX variants, each checked against PyTorch on the test split; the selected one is deployed."""

    # fp16 (CUDA only) and int8_static (slower and less accurate than int8_dynamic on CPU) stay
    # available; list them here, or target cuda, to build them.
    variants: list[VariantName] = Field(default=["fp32", "int8_dynamic"], min_length=1)
    prune: PruneConfig = PruneConfig()
    int8: Int8Config = Int8Config()
    # Training texts that calibrate static int8 and score heads/neurons for pruning.
    calibration_samples: int = Field(default=128, gt=0)
    # Selection: the fastest variant on `target_provider` whose macro-F1 drop vs PyTorch, on the
    # val + test splits together, is at most `max_f1_drop` (absolute, 0.005 = half a point).
    target_provider: Literal["cpu", "cuda"] = "cpu"
    max_f1_drop: float = Field(default=0.005, ge=0.0, le=1.0)
    rank_by: Literal["throughput", "latency_p50"] = "throughput"
    batch_size: int = Field(default=64, gt=0)  # evaluation batches
    # Paired bootstrap of the macro-F1 drop (reported next to the point estimate; seeded).
    bootstrap_resamples: int = Field(default=1000, ge=0)
    seed: int = 0
    bench: BenchConfig = BenchConfig()
    variants_dir: str = "models/variants"
    out_dir: str = "models/deploy"
    report_dir: str = "reports/compress"

    OUTPUTS: ClassVar[dict[str, str]] = {"variants": "variants_dir", "deploy": "out_dir"}

    @model_validator(mode="after")
    def _quant_aware_matches_int8(self) -> CompressConfig:
        # The recovery's fake quantization mirrors per-channel 7-bit weights only.
        int8 = self.int8
        if self.prune.recovery.quant_aware and not (int8.per_channel and int8.reduce_range):
            raise ValueError(
                "compress.prune.recovery.quant_aware mirrors int8 per_channel + reduce_range "
                "(7-bit per-channel weights); set both true or quant_aware false"
            )
        return self


# --------------------------------------------------------------------------- pretrain
class ScratchEncoderConfig(Section):
    """A BERT-style encoder built from these sizes, with a WordPiece tokenizer trained on the corpus."""

    layers: int = Field(default=4, ge=1)
    hidden: int = Field(default=256, ge=8)
    heads: int = Field(default=4, ge=1)
    intermediate: int = Field(default=1024, ge=8)
    max_length: int = Field(default=64, ge=8)  # position embeddings = the tokenizer's max length
    vocab_size: int = Field(default=8000, ge=100)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    lowercase: bool = True

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ScratchEncoderConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        return self


class MlmConfig(Section):
    probability: float = Field(default=0.15, gt=0.0, lt=1.0)
    mask_replace: float = Field(default=0.8, ge=0.0, le=1.0)  # share of picked tokens -> [MASK]
    random_replace: float = Field(default=0.1, ge=0.0, le=1.0)  # -> a random token; rest unchanged
    whole_word: bool = False  # mask all pieces of a word together (then always [MASK])
    # Compute the vocabulary projection only at masked positions (same loss, far fewer FLOPs).
    sparse_head: bool = True
    # Steps that train only the MLM head, the encoder frozen: a base without an MLM head gets a
    # random one, whose first gradients would otherwise wreck the encoder. 0 with such a base is
    # refused before training.
    head_warmup_steps: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _shares(self) -> MlmConfig:
        if self.mask_replace + self.random_replace > 1.0:
            raise ValueError("mask_replace + random_replace must not exceed 1")
        return self


class SimcseConfig(Section):
    temperature: float = Field(default=0.05, gt=0.0)
    pooling: Literal["mean", "cls"] = "mean"
    # Share of tokens deleted from the second view (0: two dropout views of the same text, which a
    # contrastively trained base already tells apart: a loss near 0 and no gradient).
    deletion: float = Field(default=0.0, ge=0.0, lt=1.0)


class PretrainTrainConfig(Section):
    batch_size: int = Field(default=64, gt=0)  # per process
    max_steps: int | None = Field(default=None, gt=0)  # None: `epochs` over the corpus
    epochs: float = Field(default=1.0, gt=0.0)
    # Wall-clock budget of one run; None: none (the output then depends only on the inputs).
    max_minutes: float | None = Field(default=None, gt=0.0)
    learning_rate: float = Field(default=5.0e-4, gt=0.0)
    weight_decay: float = Field(default=0.01, ge=0.0)
    warmup: float = Field(default=0.06, ge=0.0, lt=1.0)  # share of the steps
    grad_accum: int = Field(default=1, gt=0)
    group_by_length: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on a GPU that has it
    compile: bool | None = None  # None: on CUDA only
    # torch.compile mode. max-autotune(-no-cudagraphs): Inductor benchmarks Triton GEMM templates
    # (bias/GELU fused into the matmul) against cuBLAS; minutes more compile time.
    compile_mode: Literal[
        "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = "default"
    threads: int = Field(default=0, ge=0)  # torch CPU threads; 0: torch's default
    save_steps: int = Field(default=200, gt=0)
    save_total_limit: int = Field(default=2, gt=0)
    logging_steps: int = Field(default=20, gt=0)
    heldout_fraction: float = Field(default=0.02, gt=0.0, lt=0.5)  # corpus share kept for eval
    heldout_max: int = Field(default=1000, gt=0)
    seed: int = 0


class ProbeConfig(Section):
    """Frozen mean-pooled embeddings of the labelled train split, scored on the val split."""

    methods: list[Literal["logreg", "knn"]] = Field(default=["logreg", "knn"], min_length=1)
    knn_k: int = Field(default=10, gt=0)
    max_train: int = Field(default=5000, gt=0)
    batch_size: int = Field(default=128, gt=0)


class PretrainConfig(Section):
    # scratch: build `scratch` below and train its tokenizer; base: continue from `base`.
    init: Literal["scratch", "base"] = "scratch"
    # A model folder, `package:<module>` (its get_model_path()), or a hub id where a hub is reachable.
    base: str | None = None
    scratch: ScratchEncoderConfig = ScratchEncoderConfig()
    objective: Literal["mlm", "simcse"] = "mlm"
    mlm: MlmConfig = MlmConfig()
    simcse: SimcseConfig = SimcseConfig()
    max_length: int = Field(default=64, ge=8)  # truncation of corpus texts (tokens)
    train: PretrainTrainConfig = PretrainTrainConfig()
    probe: ProbeConfig = ProbeConfig()
    # Outside the DVC output, so `dvc repro` removing outputs never destroys them.
    checkpoint_dir: str = "checkpoints/pretrain"
    out_dir: str = "models/encoder"

    OUTPUTS: ClassVar[dict[str, str]] = {"encoder": "out_dir"}

    @model_validator(mode="after")
    def _base_given(self) -> PretrainConfig:
        if self.init == "base" and not self.base:
            raise ValueError("init: base needs `base` (a model folder, package:<module> or hub id)")
        return self


# --------------------------------------------------------------------------- pipeline (Prefect)
class PipelineConfig(Section):
    """How the Prefect pipeline flow runs the dvc.yaml stages."""

    retries: int = Field(default=1, ge=0)  # per stage, for transient failures
    retry_delay_seconds: float = Field(default=10.0, ge=0.0)
    stage_timeout_seconds: float = Field(default=3600.0, gt=0.0)
    register_model: bool = True  # register the deployable model and run the promotion gate


# --------------------------------------------------------------------------- corpus (snapshot)
class CorpusConfig(Section):
    """The pretraining inputs' own versioned snapshot, moved only when the policy says so.

    `pretrain` depends on this snapshot, not on `prepare`'s outputs: new labelled data re-runs
    `prepare` (and the fine-tune) without re-pretraining unless the policy moves the snapshot.
    """

    # always: follow every corpus change; never: keep the first snapshot; on_corpus_change: move
    # when the share of texts added or removed since the snapshot exceeds change_threshold.
    pretrain_policy: Literal["always", "never", "on_corpus_change"] = "on_corpus_change"
    change_threshold: float = Field(default=0.05, ge=0.0, le=1.0)
    out_dir: str = "data/corpus"


# --------------------------------------------------------------------------- retrain
class DriftConfig(Section):
    """Drift of landed data vs the training split, with the pipeline's encoder (tunery/evaluation/drift.py)."""

    enabled: bool = True  # measure and log it whenever new data lands (needs a trained encoder)
    # A trigger condition: retrain only when the domain-classifier AUC reaches this; below it the
    # files stay in the landing folder (and accumulate) until it does. null: always retrain.
    min_auc: float | None = Field(default=None, ge=0.5, le=1.0)
    reference_rows: int = Field(default=1000, ge=10)  # training texts sampled as the reference


class RetrainConfig(Section):
    """The scheduled re-fine-tune: new labelled files land here and are taken in as a new data version."""

    landing: str = "data/landing"
    push: bool = True  # `dvc push` each new data version to the default remote
    drift: DriftConfig = DriftConfig()


# --------------------------------------------------------------------------- root
class Params(Section):
    tracking: TrackingConfig = TrackingConfig()
    registry: RegistryConfig = RegistryConfig()
    pipeline: PipelineConfig = PipelineConfig()
    retrain: RetrainConfig = RetrainConfig()
    corpus: CorpusConfig = CorpusConfig()
    ingest: IngestConfig
    prepare: PrepareConfig
    pretrain: PretrainConfig
    export: ExportConfig
    compress: CompressConfig
    finetune: FinetuneConfig
    evaluate: EvaluateConfig

    def section(self, name: str) -> Section:
        return getattr(self, name)

    def model_outputs(self, stage: str) -> dict[str, str]:
        """The model folders `stage` writes, by output name (none for a stage that writes none)."""
        return stage_model_outputs(self, stage)


# Which stage writes which output, read from the sections' declarations.
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    name: tuple(field.annotation.OUTPUTS)
    for name, field in Params.model_fields.items()
    if isinstance(field.annotation, type) and field.annotation.OUTPUTS
}


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} invalid setting(s):"]
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"])
        got = err.get("input")
        shown = "" if err["type"] in ("missing", "extra_forbidden") else f" (got {got!r})"
        if err["type"] == "extra_forbidden":
            msg = "unknown key (typo? see the documented keys in params.yaml)"
        else:
            msg = err["msg"]
        lines.append(f"  {path}: {msg}{shown}")
    return "\n".join(lines)


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is not a section")
        node = child
    # YAML parsing gives `--set finetune.lr=3.0e-4` a float and `--set a.b=[x, y]` a list.
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML ({first})") from None


def load_raw(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: file not found (run from the project root or pass -p)"
        ) from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return tree


def load_params(path: str | Path = PARAMS_FILE, overrides: Iterable[str] = ()) -> Params:
    """Parse and validate `params.yaml` (plus `section.key=value` overrides) into `Params`."""
    tree = load_raw(Path(path))
    overrides = list(overrides)
    for assignment in overrides:
        _apply_override(tree, assignment)
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        source = str(path) + (" (with --set overrides)" if overrides else "")
        raise ConfigError(_format_errors(exc, source)) from None


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def _round_trip_yaml():
    """ruamel.yaml set up to write params.yaml back as it is written: comments, key order, two-space
    mappings, indented lists, `null` spelled out, long lines kept."""
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.indent(mapping=2, sequence=4, offset=2)
    rt.width = 4096
    rt.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return rt


def write_params(
    dest: str | Path,
    overrides: Iterable[str] = (),
    *,
    source: str | Path | None = None,
    schema: type[BaseModel] | None = None,
) -> list[str]:
    """Make `dest` (the project's params.yaml) hold `source` (default: `dest` itself) plus the
    `section.key=value` overrides; return "key: old -> new" for each setting that changed.

    Why in the file and not in memory: the stages read params.yaml and `dvc.lock` records its
    values; an override held only by the CLI process would run stages on params DVC never saw,
    and the lineage would lie. `dvc exp run --set-param` edits params.yaml in the workspace the
    same way. Comments and key order survive (ruamel.yaml round trip; a flow mapping written
    over several lines comes back on one). The result is validated (as the stages will read it,
    with PyYAML) before it atomically replaces `dest`, keeping its file mode; nothing changed:
    `dest` is not touched. `schema`: the model it is validated with (default `Params`; the image
    pipeline's `tunery.vision.params.VisionParams`).
    """
    import io
    import os

    from tunery.io import atomic_path

    dest = Path(dest)
    source = Path(source) if source is not None else dest
    overrides = list(overrides)
    load_raw(source)  # a missing or malformed file: the one-line errors of load_raw
    rt = _round_trip_yaml()
    tree = rt.load(source.read_text(encoding="utf-8"))
    for assignment in overrides:
        _apply_override(tree, assignment)
    buf = io.StringIO()
    rt.dump(tree, buf)
    text = buf.getvalue()
    new = yaml.safe_load(text) or {}
    try:
        (schema or Params).model_validate(new)
    except ValidationError as exc:
        label = str(source) + (" (with --set overrides)" if overrides else "")
        raise ConfigError(_format_errors(exc, label)) from None
    old = yaml.safe_load(dest.read_text(encoding="utf-8")) if dest.is_file() else {}
    before, after = _flatten(old or {}), _flatten(new)
    changes = [
        f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    ]
    if changes:
        mode = dest.stat().st_mode & 0o777 if dest.is_file() else 0o644
        with atomic_path(dest) as tmp:
            tmp.write_text(text, encoding="utf-8")
            os.chmod(tmp, mode)
    return changes


# --------------------------------------------------------------------------- the demo's values
# The defaults above are the general-purpose values: what a section gets when params.yaml leaves a
# key out. The committed params.yaml is the CPU demo (about 6 min on 2 cores) and sets these keys
# to other values, for the reasons given; every other value params.yaml writes equals its default.
# tests/test_params.py keeps this table true both ways (no unlisted difference, no stale entry).
DEMO_OVERRIDES: dict[str, str] = {
    "ingest.min_per_class": "the demo's classes have up to 400 rows each "
    "(ingest.source.max_per_class): a stricter floor than the default costs nothing there",
    "finetune.epochs": "every arm at most 2 epochs (early stopping may end sooner) keeps the "
    "demo within minutes on a CPU",
    "finetune.ablations.enabled": "the demo shows what each stage bought: the probe, base and full "
    "arms beside the main one, and the pretrain gate; off by default: the main arm only",
    "evaluate.champion": "the demo compares against the registry champion; by default nothing is "
    "compared (no registry assumed)",
    "compress.prune.enabled": "the demo weighs pruned candidates beside the plain int8 (the "
    "3x target); off by default: pruning plus recovery costs minutes a run",
    "compress.prune.ffn_fraction": "the demo's measured setting: FFN 50 % + distillation recovered "
    "fp32 macro-F1 on the glosses (bench/prune_distill.py)",
    "compress.prune.recovery.steps": "300 distillation steps (~3.5 passes over the demo's train "
    "split); off by default with pruning itself",
    "pretrain.init": "the demo continues from an installed base (all-MiniLM-L6-v2) instead of "
    "training a scratch encoder and its tokenizer",
    "pretrain.base": "the installed package the demo's base comes from",
    "pretrain.mlm.head_warmup_steps": "that base has no MLM head: a fresh one is trained alone "
    "first (0 with such a base is refused)",
    "pretrain.max_length": "WordNet glosses are short (median ~15 tokens)",
    "pretrain.train.batch_size": "the demo's CPU budget",
    "pretrain.train.max_steps": "bounds the demo's pretraining (30 steps) without a wall clock",
    "pretrain.train.learning_rate": "continuing a trained base takes a smaller rate than scratch",
    "pretrain.train.save_steps": "30 demo steps: a checkpoint every 10 so a kill resumes",
    "pretrain.train.logging_steps": "30 demo steps: a loss line every 5",
    "pretrain.train.heldout_max": "fewer held-out corpus texts to score: the demo's CPU budget",
    "pretrain.probe.max_train": "a cap for the demo's CPU budget (its train split is ~2,800 rows)",
}
