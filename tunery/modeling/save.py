"""Save a trained classifier as a finetune output's weights, checked: `adapter/` (and `merged/`)
are written, reloaded and compared with the trained model's logits; over
`finetune.merge_tolerance` the stage fails (its atomic output folder is then never published).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunery.errors import FinetuneError
from tunery.io import atomic_dir
from tunery.modeling import finetune_dir
from tunery.modeling.finetune_dir import ADAPTER_DIR, ENCODER_DIR, MERGED_DIR
from tunery.modeling.methods import MERGEABLE, load_base
from tunery.modeling.predict import logits_on
from tunery.modeling.training import fingerprint_files as fingerprint
from tunery.modeling.training import model_files

if TYPE_CHECKING:
    from tunery.config import FinetuneConfig
    from tunery.modeling.arms import Inputs, Outcome

PARITY_BATCH = 64  # validation texts used for the merge / reload parity checks


def max_diff(a: Any, b: Any) -> float:
    return float((a - b).abs().max())


def save_checked(
    dest: Path,
    model: Any,
    tokenizer: Any,
    *,
    cfg: FinetuneConfig,
    method: str,
    encoder: Path,
    labels: list[str],
    parity_texts: list[str],
    max_length: int,
) -> dict[str, float | None]:
    """Write adapter/ (and merged/), then reload what was written and compare logits."""
    model = getattr(model, "_orig_mod", model).to("cpu").eval()
    probe = (tokenizer, parity_texts, max_length)
    reference = logits_on(model, tokenizer, parity_texts, max_length=max_length)
    adapter, merged = dest / ADAPTER_DIR, dest / MERGED_DIR
    checks: dict[str, float | None] = {"adapter_reload": None, "merge": None}
    if method == "full":
        _save_full(model, tokenizer, adapter=adapter, merged=merged)
    else:
        reloaded = _save_adapter(model, tokenizer, adapter, encoder, labels)
        checks["adapter_reload"] = _diff(reference, reloaded, *probe)
        if method in MERGEABLE:
            model = model.merge_and_unload()
            model.save_pretrained(merged)
            tokenizer.save_pretrained(merged)
    if merged.is_dir():
        from transformers import AutoModelForSequenceClassification

        reloaded = AutoModelForSequenceClassification.from_pretrained(merged)
        checks["merge"] = _diff(reference, reloaded, *probe)
    _check_tolerance(checks, cfg.merge_tolerance)
    return checks


def _diff(reference: Any, model: Any, tokenizer: Any, texts: list[str], max_length: int) -> float:
    return max_diff(reference, logits_on(model, tokenizer, texts, max_length=max_length))


def _save_full(model: Any, tokenizer: Any, *, adapter: Path, merged: Path) -> None:
    model.save_pretrained(merged)
    tokenizer.save_pretrained(merged)
    adapter.mkdir()
    for f in merged.iterdir():  # the same files: link rather than copy the weights twice
        try:
            os.link(f, adapter / f.name)
        except OSError:
            shutil.copy2(f, adapter / f.name)


def _save_adapter(
    model: Any, tokenizer: Any, adapter: Path, encoder: Path, labels: list[str]
) -> Any:
    """Save the peft adapter (+ tokenizer) and reload it on a fresh copy of the encoder."""
    from peft import PeftModel

    model.save_pretrained(adapter)
    sort_adapter_config(adapter / "adapter_config.json")
    tokenizer.save_pretrained(adapter)
    base, _ = load_base(encoder, labels)
    return PeftModel.from_pretrained(base, str(adapter))


def _check_tolerance(checks: dict[str, float | None], tolerance: float) -> None:
    for name, diff in checks.items():
        if diff is not None and diff > tolerance:
            what = "merged model" if name == "merge" else "reloaded adapter"
            raise FinetuneError(
                f"the {what} differs from the trained model by {diff:.3g} in logits "
                f"(> finetune.merge_tolerance {tolerance}); nothing written"
            )


def sort_adapter_config(path: Path) -> None:
    """peft writes `target_modules` (a set) in hash order: sorted, identical runs give identical
    files, so the DVC hash of the output depends on the weights only."""
    config = json.loads(path.read_text())
    for key in ("target_modules", "modules_to_save"):
        if isinstance(config.get(key), list):
            config[key] = sorted(dict.fromkeys(config[key]))
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_random_encoder(
    cfg: FinetuneConfig, encoder: Path, labels: list[str], tokenizer: Any, dest: Path
) -> None:
    """The random weights the base arm started from (same seed: the same weights), as a model dir."""
    model, _ = load_base(encoder, labels, init="random", seed=cfg.seed)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def write_finetune(
    out_dir: Path,
    cfg: FinetuneConfig,
    outcome: Outcome,
    inputs: Inputs,
    *,
    data_dir: Path,
    warm: Path | None,
) -> dict[str, float | None]:
    """The whole finetune output, atomically: weights (checked), labels, finetune.json, arms.json.

    Returns the parity checks (max |logit| differences of the reloaded adapter and merged model).
    """
    chosen, gate = outcome.chosen, outcome.report["pretrain_gate"]
    with atomic_dir(out_dir) as tmp:
        saved_encoder, final_encoder = chosen.encoder, chosen.encoder
        if chosen.init == "random":
            # The adapter sits on random weights that exist nowhere else: saved beside it.
            saved_encoder = tmp / ENCODER_DIR
            final_encoder = Path(out_dir).resolve() / ENCODER_DIR
            save_random_encoder(cfg, chosen.encoder, inputs.labels, chosen.tokenizer, saved_encoder)
        checks = save_checked(
            tmp,
            chosen.result.model,
            chosen.tokenizer,
            cfg=cfg,
            method=cfg.method,
            encoder=saved_encoder,
            labels=inputs.labels,
            parity_texts=inputs.val_split.texts[:PARITY_BATCH],
            max_length=chosen.stats["max_length"],
        )
        stats = chosen.stats
        info = {
            "method": cfg.method,
            "mergeable": (tmp / MERGED_DIR).is_dir(),
            # what `load_base` loads for the adapter: the pipeline's encoder or its base
            "encoder": str(final_encoder),
            "encoder_fingerprint": fingerprint({}, model_files(saved_encoder)),
            "arm": outcome.report["chosen"],
            "pretrain_gate": gate["decision"],
            "max_length": stats["max_length"],
            "merge_max_abs_logit_diff": checks["merge"],
            "adapter_reload_max_abs_logit_diff": checks["adapter_reload"],
            "merge_tolerance": cfg.merge_tolerance,
            "num_labels": len(inputs.labels),
            "warm_start": str(warm) if warm else None,
            "seed": cfg.seed,
            "trainable_params": stats["trainable_params"],
            "total_params": stats["total_params"],
            "best_val_macro_f1": stats["best_val_macro_f1"],
            "method_params": getattr(cfg, cfg.method).model_dump(mode="json"),
            # What the model has learnt from: evaluate scores later models on newer data only.
            "data_origins": trained_origins(data_dir, warm),
        }
        finetune_dir.write(tmp, labels=inputs.labels, info=info, arms=outcome.report)
    return checks


def trained_origins(data_dir: Path, warm_start: Path | None) -> list[str]:
    """The `origin`s (source file, incoming file) of the rows fine-tuned on, with those of the
    warm-start model it continues from."""
    import pandas as pd

    origins: set[str] = set()
    for split in ("train", "val"):
        df = pd.read_parquet(data_dir / f"{split}.parquet")
        if "origin" in df.columns:
            origins.update(df["origin"].astype(str))
    origins.update(finetune_dir.data_origins(warm_start))
    return sorted(origins)
