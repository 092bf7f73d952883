"""Evaluation: what a model is worth, and what the evaluate stage writes.

    metrics.py      macro-F1, per-class scores, calibration error, confusion and reliability plots
    served.py       the models as served (the deployable, the champion), the newest data
    reports.py      gate.json's content, metrics/evaluate.json, the report folder and the plots
    stage_value.py  the table of what each stage bought
    drift.py        new data vs the training data, through the pipeline's encoder

`tasks/evaluate.py` wires these; the gate's file format itself is `tunery.registry.gate_report`.
"""
