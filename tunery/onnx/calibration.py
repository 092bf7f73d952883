"""Temperature scaling: one scalar T fitted on held-out logits, baked into the deployed graph.

`fit_temperature` minimises the negative log-likelihood of softmax(logits / T) over log T (a
bounded 1-D search); `calibrate` adds the checks that keep it honest (a split too small to fit,
or a fit that does not lower the NLL, keeps T = 1.0 and says why) and the ECE/NLL before and
after. `add_probabilities` appends `probabilities = Softmax(logits / T)` to an ONNX graph as a
second output, leaving `logits` as it was (so argmax and parity checks do not change).

Heavy imports (onnx, scipy) happen inside functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tunery.evaluation.metrics import calibration as ece_bins

PROBABILITIES = "probabilities"
# log T searched in [log 0.05, log 20]: far outside what a fine-tuned classifier needs.
LOG_T_BOUNDS = (float(np.log(0.05)), float(np.log(20.0)))
MIN_ROWS_PER_CLASS = 2.0


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class under softmax(logits / temperature)."""
    logp = _log_softmax(np.asarray(logits, dtype=np.float64) / temperature)
    return float(-logp[np.arange(len(labels)), np.asarray(labels)].mean())


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return np.exp(_log_softmax(np.asarray(logits, dtype=np.float64) / temperature))


def ece(
    logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, n_bins: int = 10
) -> float:
    """Expected calibration error (`tunery.evaluation.metrics.calibration`) of softmax(logits / T)."""
    return ece_bins(np.asarray(labels), probabilities(logits, temperature), n_bins)[0]


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T); bounded search on log T."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    res = minimize_scalar(
        lambda log_t: nll(z, y, float(np.exp(log_t))),
        bounds=LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-5},
    )
    return float(np.exp(res.x))


def calibrate(
    logits: np.ndarray, labels: np.ndarray, n_classes: int, *, fitted_on: str = "val"
) -> dict[str, Any]:
    """Fit T on (logits, labels) and describe it; T = 1.0 with a `fallback` reason when unfit.

    Falls back when there are fewer than MIN_ROWS_PER_CLASS rows per class on average or a single
    class, and when the fitted T does not lower the NLL of T = 1 (never a worse model).
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    rows = len(labels)
    out: dict[str, Any] = {
        "method": "temperature",
        "temperature": 1.0,
        "fitted_on": fitted_on,
        "rows": rows,
        "fallback": None,
    }
    present = len(np.unique(labels)) if rows else 0
    if rows < MIN_ROWS_PER_CLASS * n_classes or present < 2:
        out["fallback"] = (
            f"{fitted_on} split too small to fit a temperature: {rows} rows, {present} of "
            f"{n_classes} classes (needs >= {MIN_ROWS_PER_CLASS:g} rows per class on average and "
            "2 classes); T = 1.0 (plain softmax)"
        )
        if rows:
            out |= _scores(logits, labels, 1.0, 1.0)
        return out
    t = fit_temperature(logits, labels)
    scores = _scores(logits, labels, 1.0, t)
    if scores["val_nll_after"] >= scores["val_nll_before"]:
        out["fallback"] = (
            f"fitted T = {t:.4f} does not lower the {fitted_on} NLL "
            f"({scores['val_nll_after']:.4f} vs {scores['val_nll_before']:.4f} at T = 1); kept 1.0"
        )
        out["rejected_temperature"] = t
        return out | _scores(logits, labels, 1.0, 1.0)
    out["temperature"] = t
    return out | scores


def _scores(
    logits: np.ndarray, labels: np.ndarray, before: float, after: float
) -> dict[str, float]:
    return {
        "val_ece_before": ece(logits, labels, before),
        "val_ece_after": ece(logits, labels, after),
        "val_nll_before": nll(logits, labels, before),
        "val_nll_after": nll(logits, labels, after),
    }


def add_probabilities(src: Path, dest: Path, temperature: float) -> None:
    """Write `src` to `dest` with a second output `probabilities` = Softmax(logits / T, axis=-1).

    The first output (the logits) is kept, unchanged and first; onnx.checker runs on the result.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    if any(o.name == PROBABILITIES for o in graph.output):
        raise ValueError(f"{src}: already has a {PROBABILITIES!r} output")
    logits = graph.output[0].name
    t_name = "tunery_temperature"
    graph.initializer.append(numpy_helper.from_array(np.array(temperature, np.float32), t_name))
    graph.node.extend(
        [
            helper.make_node("Div", [logits, t_name], ["tunery_scaled_logits"], "tunery_Div_T"),
            helper.make_node(
                "Softmax", ["tunery_scaled_logits"], [PROBABILITIES], "tunery_Softmax", axis=-1
            ),
        ]
    )
    dims = [d.dim_param or d.dim_value or None for d in graph.output[0].type.tensor_type.shape.dim]
    graph.output.append(
        helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, dims or None)
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(dest))
