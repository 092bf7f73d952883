"""register (images): the deployed model becomes the registry's challenger; the gate decides.

Inputs:  `<compress.out_dir>/` (the deployable folder), `<compress.report_dir>/report.json`
         (parity), `<evaluate.report_dir>/gate.json` (challenger and champion on the holdout).
Outputs: a new version of `registry.model_name` (alias `challenger`, and `champion` when the
         gate promotes it; every decision recorded), `metrics/register.json`.

The text pipeline runs this step from its Prefect flow after the stages; the image pipeline runs
it as its last DVC stage (always run: the registry is outside DVC). It is the same code
(`tunery.registry.registration.register_and_gate`): an unchanged model registers nothing new.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunery.vision.params import VisionParams


def _stage(params: VisionParams, root: Path, tracking_run: Any) -> dict[str, Any]:
    from tunery.registry.registration import register_and_gate

    result = register_and_gate(root, params, tracking_run)
    return {
        "registered": bool(result.get("registered")),
        "version": result.get("version"),
        "promoted": bool(result.get("promoted")),
        "reason": result.get("reason") or result.get("summary"),
        "summary": result["summary"],
    }


def main(argv: list[str] | None = None) -> None:
    from tunery.stage import stage_main
    from tunery.vision.params import load_vision_params

    stage_main("register", _stage, argv, loader=load_vision_params)


if __name__ == "__main__":
    main()
