"""Evaluation: metrics, the stage-value table, drift."""
