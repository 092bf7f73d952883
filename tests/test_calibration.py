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


def _judged(z, y, val_rows):
    from types import SimpleNamespace

    return SimpleNamespace(judge=SimpleNamespace(y_true=y, n=z.shape[1], val_rows=val_rows))


def test_the_compress_stage_fits_on_val_and_test_together():
    from tunery.onnx import variants as vs

    z, y = _synthetic(n=600, temperature=2.0)
    out = vs.calibrate(_judged(z, y, 250), z)
    assert out["fitted_on"] == "val+test" and out["rows"] == 600 and out["fallback"] is None
    assert out["temperature"] == cal.fit_temperature(z, y)  # every judged row, not val's 250
    assert out["temperature"] != cal.fit_temperature(z[:250], y[:250])
    no_val = vs.calibrate(_judged(z, y, 0), z)
    assert no_val["fitted_on"] == "test" and no_val["rows"] == 600


def test_the_compress_stage_falls_back_when_val_and_test_are_too_small():
    from tunery.onnx import variants as vs

    z, y = _synthetic(n=12, classes=10)
    out = vs.calibrate(_judged(z, y, 5), z)
    assert out["temperature"] == 1.0 and out["rows"] == 12
    assert "val+test split too small" in out["fallback"]


def test_ece_interval_and_floor():
    from tunery.evaluation import metrics as ev

    z, y = _synthetic(n=400, temperature=1.0)  # labels drawn from the probabilities: calibrated
    p = cal.probabilities(z)
    point = ev.calibration(y, p)[0]
    lo, hi = ev.ece_interval(y, p)
    assert lo < point < hi and ev.ece_interval(y, p) == [lo, hi]  # seeded
    floor = ev.ece_floor(p)
    assert 0.0 < floor < hi  # a calibrated model measures about its floor, not 0
    big_z, _ = _synthetic(n=6400, temperature=1.0, seed=1)
    assert ev.ece_floor(cal.probabilities(big_z)) < floor / 2  # ~1/sqrt(rows): 16x rows, ~1/4
    assert (
        ev.ece_interval([], np.zeros((0, 3))) == [0.0, 0.0]
        and ev.ece_floor(np.zeros((0, 3))) == 0.0
    )


def test_vectorised_ece_is_calibrations_ece():
    from tunery.evaluation import metrics as ev

    z, y = _synthetic(n=300, temperature=0.7, seed=3)
    p = cal.probabilities(z)
    correct = p.argmax(1) == y
    got = ev._binned_ece(p.max(1)[None], correct[None], 10)[0]
    assert abs(got - ev.calibration(y, p, 10)[0]) < 1e-12
