"""`transformers.Trainer` glue shared by the training stages.

- Device, precision and attention selection: bf16 + SDPA on a GPU that has bf16, fp32 on CPU;
  `torch.compile` on CUDA by default; DDP under `torchrun` (NCCL on GPUs, gloo on CPU).
- `training_args`: `TrainingArguments` from keyword settings, dropping those this transformers
  version does not know (the GPU machine runs an older one than the pinned set).
- Resumable checkpoints: the Trainer writes `checkpoint-<step>/` (safetensors weights) in a folder
  outside the DVC outputs; `CompletionMarker` adds `tunery-complete.json` (sizes and hashes of
  every file) once a checkpoint is fully written. `resume_point` then resumes from the newest
  complete checkpoint, deletes half-written ones, refuses a corrupted one (the file and the rule),
  and starts fresh, saying so, when the checkpoints were made with other params or data
  (a fingerprint stored beside them).
- `WallClockBudget`: stops training (and saves a checkpoint) when a time budget is spent, agreed
  across processes so DDP ranks stop on the same step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from tunery.errors import TuneryError
from tunery.io import file_md5, write_json

log = logging.getLogger("tunery.training")

MARKER = "tunery-complete.json"
FINGERPRINT = "fingerprint.json"
_RESUME_KEY_RE = re.compile(r"[0-9a-f]{16}")
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(TuneryError):
    def __init__(self, path: str | Path, rule: str, detail: str) -> None:
        self.path, self.rule = str(path), rule
        super().__init__(f"{path}: [{rule}] {detail}")


# --------------------------------------------------------------------------- processes and devices
def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def select_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TuneryError("device: cuda was asked for, but no CUDA GPU is available")
    return device


def use_bf16(precision: str, device: str) -> bool:
    import torch

    if precision == "fp32":
        return False
    has_bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not has_bf16:
        # bf16 autocast on these CPUs is slower than fp32; only a GPU with bf16 gets it.
        raise TuneryError(f"precision: bf16 needs a GPU with bf16; this run is on {device}")
    return has_bf16


def device_args(
    *, device: str, precision: str, compile: bool | None, compile_mode: str | None = None
) -> dict[str, Any]:
    """The device-dependent part of `TrainingArguments` (`compile_mode` None/"default": torch's)."""
    dev = select_device(device)
    args: dict[str, Any] = {
        "use_cpu": dev == "cpu",
        "bf16": use_bf16(precision, dev),
        "torch_compile": dev == "cuda" if compile is None else compile,
    }
    if args["torch_compile"] and compile_mode not in (None, "default"):
        args["torch_compile_mode"] = compile_mode
    if world_size() > 1:
        args["ddp_backend"] = "nccl" if dev == "cuda" else "gloo"
    if dev == "cuda":
        args["tf32"] = True
        # No host synchronisation per step: batches are copied without blocking, and the NaN/Inf
        # loss filter (which reads the loss every step) is off, so the host queues the next step
        # while the GPU works (a NaN loss then shows in the logged average instead of being skipped).
        args["logging_nan_inf_filter"] = False
        args["accelerator_config"] = {"non_blocking": True}
    return args


def training_args(**settings: Any):
    """`TrainingArguments(**settings)`, dropping settings this transformers version lacks."""
    from transformers import TrainingArguments

    known = {f.name for f in fields(TrainingArguments)}
    settings = dict(settings)
    # transformers < 5.2x: a boolean `group_by_length` instead of `train_sampling_strategy`.
    if "train_sampling_strategy" in settings and "train_sampling_strategy" not in known:
        settings["group_by_length"] = settings.pop("train_sampling_strategy") == "group_by_length"
    dropped = sorted(k for k in settings if k not in known)
    if dropped:
        log.debug("TrainingArguments of this transformers version lack %s; ignored", dropped)
    args = TrainingArguments(**{k: v for k, v in settings.items() if k in known})
    agree_tf32_settings()
    return args


def agree_tf32_settings() -> None:
    """Make torch's legacy matmul-precision setting agree with the per-backend one.

    `TrainingArguments` turns TF32 on through torch's new API (`torch.backends.fp32_precision`),
    which leaves the legacy global (`torch.get_float32_matmul_precision()`) at "highest". Code that
    still reads the legacy one then fails with "mix of the legacy and new APIs" -- Inductor's GEMM
    autotuning does (`torch_compile_mode="max-autotune"`; pytorch/pytorch#166387, #196728).
    `set_float32_matmul_precision("high")` sets both to TF32, so the two agree.
    """
    import torch

    if torch.backends.cuda.matmul.fp32_precision == "tf32":
        torch.set_float32_matmul_precision("high")


def length_sorted_batches(
    tokenizer: Any, texts: Sequence[str], *, max_length: int, batch_size: int, device: Any
) -> Iterator[tuple[list[int], Any]]:
    """(row indices, tokenized batch on `device`) over `texts`, shortest first.

    For inference loops: batching texts of similar length keeps padding (wasted compute) small;
    callers scatter results back with `out[idx] = ...`.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in idx],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        yield idx, batch.to(device)


# --------------------------------------------------------------------------- fingerprints
def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-able parts (params sections, data hashes)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def fingerprint_files(payload: Mapping[str, Any], files: list[Path] | tuple[Path, ...]) -> str:
    """A hash of settings and the contents of files (name + MD5 each; a missing file counts too)."""
    h = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
    for f in files:
        f = Path(f)
        h.update(f.name.encode())
        h.update(file_md5(f).encode() if f.is_file() else b"-")
    return h.hexdigest()[:16]


def model_files(folder: Path) -> list[Path]:
    """The files that define a model dir's weights and config (for fingerprints)."""
    folder = Path(folder)
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and (p.suffix in (".safetensors", ".json") or p.name == "vocab.txt")
    )


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- checkpoints
def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """`checkpoint-<step>` folders, newest first."""
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))
    ]
    return sorted(found, reverse=True)


def arm_resume_dir(checkpoint_dir: Path, arm: str, *key: Any) -> Path:
    """The resume point of a comparison arm of the run whose resume point is `checkpoint_dir`.

    A sibling named by a fingerprint of that folder's name, the arm and what else decides the
    arm's training (its encoder), so a stage killed in any arm resumes that arm from its last
    complete checkpoint, and `drop_resume_points` removes it with the rest."""
    return Path(checkpoint_dir).parent / fingerprint(Path(checkpoint_dir).name, arm, *key)


def drop_resume_points(root: Path) -> list[str]:
    """Remove every resume point under `root` (`<16-hex fingerprint>/checkpoint-<step>` folders).

    Called when a stage has finished and written its outputs: what is left could only resume a
    run of params or data since abandoned, and would otherwise stay on disk for good. Anything
    else in `root` is left alone. Returns the removed folder names.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = sorted(p for p in root.iterdir() if p.is_dir() and _RESUME_KEY_RE.fullmatch(p.name))
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in found]


def write_marker(checkpoint: Path) -> None:
    """Record every file of a fully written checkpoint: its presence means complete."""
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(checkpoint.iterdir())
        if p.is_file() and p.name != MARKER and not p.name.startswith("rng_state")
    }
    write_json(checkpoint / MARKER, {"files": files})


def verify_checkpoint(checkpoint: Path) -> None:
    """Raise `CheckpointError` unless every file recorded by the marker is intact."""
    try:
        recorded = json.loads((checkpoint / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            checkpoint / MARKER, "checkpoint_corrupted", f"unreadable completion marker ({exc})"
        ) from None
    for name, meta in recorded.items():
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(path, "checkpoint_corrupted", "file missing")
        if path.stat().st_size != meta["bytes"] or file_sha256(path) != meta["sha256"]:
            raise CheckpointError(
                path,
                "checkpoint_corrupted",
                "contents differ from what was saved (size or hash); delete this checkpoint "
                f"folder to resume from an earlier one, or {checkpoint.parent} to start fresh",
            )


def last_complete_checkpoint(folder: Path, *, main: bool = True) -> Path | None:
    """The newest complete checkpoint in `folder` (its marker present and intact), or None.

    A checkpoint without the marker was not fully written: skipped, and removed by the main
    process. A marked checkpoint whose files changed raises `CheckpointError` (file and rule).
    """
    for _step, ckpt in checkpoints(Path(folder)):
        if not (ckpt / MARKER).is_file():
            if main:
                log.warning(
                    "%s is incomplete (the save was interrupted): skipped and removed", ckpt
                )
                shutil.rmtree(ckpt, ignore_errors=True)
            continue
        verify_checkpoint(ckpt)
        return ckpt
    return None


def resume_point(folder: Path, fp: str, *, main: bool = True) -> Path | None:
    """The newest complete checkpoint in `folder` made with fingerprint `fp`, or None.

    Only the main process deletes anything (stale checkpoints, half-written ones) and writes the
    fingerprint; call it there first, then on the other processes (`main_process_first`).
    """
    stored = folder / FINGERPRINT
    if folder.is_dir() and any(folder.iterdir()):
        try:
            old = json.loads(stored.read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            old = None
        if old != fp:
            if main:
                log.warning(
                    "%s holds checkpoints made with other params or data (fingerprint %s, now %s):"
                    " starting fresh",
                    folder,
                    old,
                    fp,
                )
                shutil.rmtree(folder)
            else:
                return None
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(stored, {"fingerprint": fp})
    ckpt = last_complete_checkpoint(folder, main=main)
    if ckpt is not None:
        log.info("resuming from %s", ckpt)
    return ckpt


def dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if dist_ready():
        import torch.distributed as dist

        dist.barrier()


def worker_main(prog: str, fn: Any, argv: list[str] | None, *, loader: Any = None) -> None:
    """A stage's entry point on a torchrun rank other than 0: the stage's command line, then
    `fn(params, root)`; no tracking run and no metrics file (rank 0 writes those). `loader`
    reads the params file (`stage_main`'s; default the text pipeline's `load_params`)."""
    import argparse
    import sys

    from tunery import env
    from tunery.config import load_params
    from tunery.stage import setup_logging

    parser = argparse.ArgumentParser(prog=f"python -m {prog}")
    parser.add_argument("-p", "--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    root = env.configure()
    try:
        fn((loader or load_params)(root / args.params, args.set), root)
    except TuneryError as exc:
        stage = prog.rsplit(".", 1)[-1]  # tasks.pretrain -> pretrain, as stage_main says it
        print(f"tunery {stage} (rank {rank()}): error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


def shutdown_distributed() -> None:
    """Leave the process group cleanly (torchrun warns about a group left open)."""
    if dist_ready():
        import torch.distributed as dist

        dist.destroy_process_group()


def any_rank(flag: bool, device: Any) -> bool:
    if not dist_ready():
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def loss_history(log_history: list[Mapping[str, Any]]) -> list[dict[str, float]]:
    """Training-loss points (step, loss, learning_rate) from `trainer.state.log_history`."""
    return [
        {
            "step": int(e["step"]),
            "loss": float(e["loss"]),
            "learning_rate": float(e.get("learning_rate", 0.0)),
        }
        for e in log_history
        if "loss" in e and "step" in e
    ]
