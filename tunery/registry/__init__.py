"""The model registry: references, the gate, promotions.

    refs.py          `models:/` references and the `Registry` value (root, model name, experiment)
    gate_report.py   gate.json, the gate's input (written by the evaluate stage)
    gate.py          the decision: challenger vs champion on the frozen holdout
    promotion.py     champion moves: gated, manual, rolled back (recorded)
    registration.py  after the stages: register the deployable and gate it; `models:/` downloads

MLflow itself is reached only through `tunery.tracking` and `tunery.mlflow_model` (the stored
pyfunc imports `tunery.mlflow_model` by that name, so it stays where registered models find it);
refs.py and gate_report.py import neither, so a stage can name a version or write the gate's input.
"""
