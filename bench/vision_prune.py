"""Which pruning of the image ViT keeps val + test macro-F1 within budget after recovery: one run.

    PYTHONPATH=. nice python bench/vision_prune.py --project vision \
        --spec heads1+ffn50:400 --spec heads2+ffn50:400 --spec layers1+ffn50:300 --spec ffn50:300 \
        --out bench/results/vision_prune-cpu.json

A spec is `<cut>[+<cut>...]:<steps>` with cuts `layersN` (N of the layers removed, spread as the
stage chooses), `headsN` (N heads removed per layer), `ffnP` (P % of each FFN removed). Each is
built with the stage's own functions from the project's trained fine-tune (`tunery.vision.prune.
build_pruned` with `compress.prune`'s recovery settings but the steps, on the stage's recovery
pool: `tasks.vision.compress.recovery_pool`), quantized as the stage's pruned_int8_dynamic, and
judged on val + test against the unpruned PyTorch model (`tunery.onnx.compress.parity`, the
stage's columns: macro-F1 delta, agreement). The holdout is never read. Speed is
bench/vision_int8.py's (the same pruned shapes). Numbers for reading, never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the image stages run (threads.py)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse(spec: str) -> tuple[dict[str, Any], int]:
    cuts, _, steps = spec.partition(":")
    out: dict[str, Any] = {"layers": 0, "heads": 0, "ffn_fraction": 0.0}
    for cut in cuts.split("+"):
        if cut.startswith("layers"):
            out["layers"] = int(cut[6:])
        elif cut.startswith("heads"):
            out["heads"] = int(cut[5:])
        elif cut.startswith("ffn"):
            out["ffn_fraction"] = int(cut[3:]) / 100
        else:
            raise SystemExit(f"unknown cut {cut!r} in {spec!r}")
    return out, int(steps or 0)


def judge(ctx: dict[str, Any], cfg: Any, work: Path) -> dict[str, Any]:
    from tunery.onnx import compress as comp
    from tunery.vision import deploy
    from tunery.vision.variants import build, pruned_source

    started = time.monotonic()
    raw = work / "pruned.onnx"
    info = pruned_source(cfg, ctx, raw)
    build("pruned_int8_dynamic", raw, work / "int8.onnx", None, work)
    x, y = ctx["judged"]
    out = {"prune": info, "seconds": round(time.monotonic() - started, 1)}
    for name, path in (("pruned_fp32", raw), ("pruned_int8_dynamic", work / "int8.onnx")):
        p = comp.parity(ctx["ref"], deploy.run_batches(deploy.runner(path), x), y)
        out[name] = {k: round(float(v), 4) for k, v in p.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--project", type=Path, default=REPO / "vision", help="a run image project")
    ap.add_argument("--spec", action="append", required=True)
    ap.add_argument("--out", type=Path, default=Path("bench/results/vision_prune-cpu.json"))
    args = ap.parse_args()
    from tasks.vision.compress import _context
    from tunery.vision.params import load_vision_params

    t0, root = time.time(), args.project.resolve()
    p = load_vision_params(root / "params.yaml")
    c = p.compress
    cfg = c.model_copy(update={"prune": c.prune.model_copy(update={"enabled": True})})
    ctx = _context(
        cfg,
        p.processor,
        root,
        root / p.finetune.out_dir,
        root / p.prepare.out_dir,
        root / p.ingest.out_dir,
    )
    rows = {}
    for spec in args.spec:
        cuts, steps = parse(spec)
        recovery = c.prune.recovery.model_copy(update={"steps": steps})
        pcfg = cfg.prune.model_copy(update={**cuts, "recovery": recovery})
        with tempfile.TemporaryDirectory(prefix="vision-prune-") as d:
            rows[spec] = judge(ctx, cfg.model_copy(update={"prune": pcfg}), Path(d))
        r = rows[spec]["pruned_int8_dynamic"]
        print(f"{spec:24s} int8 macro-F1 {r['macro_f1_delta']:+.4f} agreement {r['agreement']:.4f}")
    out = {
        "bench": "vision_prune",
        "command": " ".join(sys.argv),
        "load_avg_after": os.getloadavg(),
        "judged_rows": len(ctx["judged"][1]),
        "pool_images": len(ctx["pool"]),
        "recovery_settings": c.prune.recovery.model_dump(exclude={"steps"}),
        "specs": rows,
        "wall_seconds": round(time.time() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
