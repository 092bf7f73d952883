"""Temperature scaling: the fit recovers a known temperature; unfit splits fall back with a reason."""

from __future__ import annotations

import numpy as np

from tunery.onnx import calibration as cal


def _synthetic(n: int = 4000, classes: int = 4, temperature: float = 2.5, seed: int = 0):
    """Labels drawn from softmax(z / T): the NLL-optimal temperature of logits z is T."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 3.0, (n, classes))
    p = cal.probabilities(z, temperature)
    y = np.array([rng.choice(classes, p=row) for row in p])
    return z, y


def test_fit_recovers_a_known_temperature():
    for t in (0.5, 2.5):
        z, y = _synthetic(temperature=t)
        assert abs(cal.fit_temperature(z, y) - t) / t < 0.1, t


def test_calibrate_lowers_nll_and_ece():
    z, y = _synthetic(temperature=3.0)
    out = cal.calibrate(z, y, 4)
    assert out["fallback"] is None and out["method"] == "temperature" and out["rows"] == len(y)
    assert out["val_nll_after"] < out["val_nll_before"]
    assert out["val_ece_after"] < out["val_ece_before"] / 2
    assert out["temperature"] > 2.0


def test_too_small_or_single_class_split_keeps_t_1_with_a_reason():
    z, y = _synthetic(n=8, classes=10)
    small = cal.calibrate(z, y, 10)
    assert small["temperature"] == 1.0 and "too small" in small["fallback"]
    one = cal.calibrate(z, np.zeros(8, dtype=int), 2)
    assert one["temperature"] == 1.0 and "1 of 2 classes" in one["fallback"]
    empty = cal.calibrate(np.zeros((0, 3)), np.zeros(0, dtype=int), 3)
    assert empty["temperature"] == 1.0 and empty["rows"] == 0


def test_a_fit_that_does_not_lower_nll_is_not_kept(monkeypatch):
    z, y = _synthetic(temperature=1.0)
    monkeypatch.setattr(cal, "fit_temperature", lambda *_: 5.0)  # a bad fit
    out = cal.calibrate(z, y, 4)
    assert out["temperature"] == 1.0 and out["rejected_temperature"] == 5.0
    assert "does not lower" in out["fallback"]
    assert out["val_nll_after"] == out["val_nll_before"]


def test_probabilities_output_is_softmax_of_logits_over_t(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["logits"])], "g", [x], [logits])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "a")
    cal.add_probabilities(tmp_path / "a", tmp_path / "b", 2.0)
    s = ort.InferenceSession(str(tmp_path / "b"), providers=["CPUExecutionProvider"])
    assert [o.name for o in s.get_outputs()] == ["logits", "probabilities"]
    z = np.array([[1.0, 2.0, 3.0], [0.0, -4.0, 4.0]], np.float32)
    got_logits, got = s.run(None, {"x": z})
    np.testing.assert_array_equal(got_logits, z)
    np.testing.assert_allclose(got, cal.probabilities(z, 2.0), rtol=1e-5)
