"""The model registry's contracts: `models:/` references, the gate report, the `Registry` value.

MLflow itself is reached only through `tunery.tracking` and `tunery.mlflow_model`; these modules
import neither, so a stage can name a registry version or write the gate's input without them.
"""
