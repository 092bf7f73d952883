"""The compress stage itself with pruned candidates, one run per pruning/recovery setting.

On a finished text project (after `tunery run`), each setting is `compress.prune` (+ overrides)
on top of the project's params.yaml `compress:` section, run through `tasks.compress.run` into a
scratch folder: the same export, int8, judgement and throughput ranking as the stage. Per
setting: every variant's ΔmacroF1 vs PyTorch on the judged rows (val + test), its throughput
over PyTorch eager's (the compress report's × PyTorch column, measured in the same run), what
was selected, and the pruning/recovery record (seconds, PyTorch drop before/after recovery).

    PYTHONPATH=. python bench/prune_recovery.py PROJECT OUT.json \\
        '[{"heads": 2, "ffn_fraction": 0.5, "recovery": {"steps": 300, "hidden_weight": 1.0}}]'
"""

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from tasks import compress
from tunery.config import load_params
from tunery.onnx import compress_report


def one(root: Path, params, prune: dict, work: Path) -> dict:
    cfg = params.compress.model_copy(
        update={"prune": params.compress.prune.model_validate({"enabled": True, **prune})}
    )
    t0 = time.monotonic()
    compress.run(
        cfg,
        finetune_dir=root / params.finetune.out_dir,
        export_dir=root / params.export.out_dir,
        data_dir=root / params.prepare.out_dir,
        variants_dir=work / "variants",
        out_dir=work / "deploy",
        report_dir=work / "report",
        plot_path=work / "tradeoff.png",
    )
    report = compress_report.read(work / "report")
    ref = report["reference_bench"]["cpu"]["throughput"]
    rows = {}
    for group in ("variants", "rejected_variants"):
        for name, v in report[group].items():
            rows[name] = {
                "macro_f1_delta": v["parity"]["macro_f1_delta"],
                "ci95": v["parity"].get("macro_f1_delta_ci95"),
                "x_pytorch": round(v["bench"]["cpu"]["throughput"] / ref, 3),
                "kept": group == "variants",
                "float_nodes": len((v.get("int8_fallback") or {}).get("float_nodes", [])),
            }
    pruning = next((v["pruning"] for v in report["rejected_variants"].values()), None) or next(
        (v["pruning"] for v in report["variants"].values() if v.get("pruning")), None
    )
    return {
        "prune": prune,
        "selected": report["selected"],
        "pytorch_texts_per_s": ref,
        "variants": rows,
        "pruning": pruning,
        "stage_s": round(time.monotonic() - t0, 1),
    }


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("tunery").setLevel(logging.INFO)
    root, out, settings = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    params = load_params(root / "params.yaml")
    results = json.loads(out.read_text()) if out.exists() else []
    for prune in settings:
        with tempfile.TemporaryDirectory() as tmp:
            row = one(root, params, prune, Path(tmp))
        print(json.dumps(row), flush=True)
        results.append(row)
        out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
