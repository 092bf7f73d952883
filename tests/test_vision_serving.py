"""Serving an image model folder (tiny ViTs, CPU, seconds): the Predictor on PIL images, paths and
bytes against onnxruntime on `process()`; other sizes and modes converted as the contract says;
a file that is not an image refused with its name; `tunery predict` on a folder, a manifest and
one image; the HTTP server (multipart, base64 JSON, 4xx); the registered pyfunc."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tunery.errors import EXIT_INPUT, BadInput, DataValidationError, TuneryError
from tunery.vision.processor import ProcessorConfig, contract, process
from tunery.vision.vit import VitSpec, build_classifier

REPO = Path(__file__).resolve().parents[1]
GREY = ProcessorConfig()  # 28x28, L
RGB = ProcessorConfig(size=14, channels=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
TINY = VitSpec(patch_size=7, hidden_size=32, num_layers=2, num_heads=2)
LABELS = ["bag", "coat", "shoe"]


def make_model_dir(dest: Path, cfg: ProcessorConfig, *, seed: int = 0, temperature=None) -> Path:
    """An image model folder as the export stage writes it (optionally calibrated)."""
    import torch

    from tunery.onnx import export as ox
    from tunery.onnx.calibration import add_probabilities
    from tunery.vision.export import export_onnx

    torch.manual_seed(seed)
    model = build_classifier(cfg, LABELS, spec=TINY).eval()
    dest.mkdir(parents=True)
    graph = export_onnx(model, dest.parent / f"{dest.name}-raw.onnx")
    extra = None
    if temperature is not None:
        add_probabilities(graph, dest.parent / f"{dest.name}-cal.onnx", temperature)
        graph = dest.parent / f"{dest.name}-cal.onnx"
        extra = {"calibration": {"method": "temperature", "temperature": temperature}}
    ox.write_model_dir(
        dest,
        onnx_file=graph,
        labels=LABELS,
        variant="fp32",
        provider="cpu",
        opset=17,
        source={},
        processor=contract(cfg),
        extra=extra,
    )
    return dest


def pictures(n: int, mode: str = "L", size=(28, 28), seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode) for _ in range(n)]


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def ort_logits(model_dir: Path, images: list, cfg: ProcessorConfig) -> np.ndarray:
    """The reference: onnxruntime on the processor's own `pixel_values`."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return session.run(["logits"], {"pixel_values": process(images, cfg).numpy()})[0]


@pytest.fixture(scope="module")
def grey_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("grey") / "deploy", GREY)


@pytest.fixture(scope="module")
def grey(grey_dir):
    from tunery.onnx.runtime import Predictor

    return Predictor(grey_dir, device="cpu", batch_size=2)


# --------------------------------------------------------------------------- the predictor
def test_pil_paths_and_bytes_score_like_onnxruntime_on_process(grey, grey_dir, tmp_path):
    import tunery

    imgs = pictures(5)
    reference = ort_logits(grey_dir, imgs, GREY)
    paths = []
    for i, img in enumerate(imgs):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(png(img))
    for inputs in (imgs, paths, [str(p) for p in paths], [png(i) for i in imgs]):
        np.testing.assert_allclose(grey.logits(inputs), reference, atol=1e-5)
    preds = tunery.Predictor(grey_dir, device="cpu").predict(paths)  # the same entry point
    assert preds.labels == [LABELS[i] for i in reference.argmax(-1)]
    np.testing.assert_allclose(preds.probabilities.sum(-1), 1.0, rtol=1e-5)
    assert grey.predict(imgs[0]).labels == preds.labels[:1]  # one image alone is a batch of one
    assert grey.predict([]).labels == []
    meta = grey.metadata
    assert meta["modality"] == "image" and meta["processor"] == contract(GREY)
    assert "max_length" not in meta and grey.tokenizer is None


@pytest.mark.parametrize(
    ("mode", "size"),
    [("RGB", (40, 30)), ("RGBA", (28, 28)), ("P", (56, 56)), ("LA", (10, 12)), ("1", (28, 28))],
)
def test_other_sizes_and_modes_are_converted_as_the_contract_says(grey, grey_dir, mode, size):
    """Converted to L (luma) and resized bilinear to 28x28, squashed: exactly what `process`
    computes from the same images, whatever they came in as."""
    base = pictures(3, "RGB" if mode != "L" else "L", size=size, seed=1)
    imgs = [b.convert(mode) for b in base]
    from tunery.data.images import converted

    reference = ort_logits(grey_dir, [converted(i) for i in imgs], GREY)
    np.testing.assert_allclose(grey.logits(imgs), reference, atol=1e-5)
    np.testing.assert_allclose(grey.logits([png(i) for i in imgs]), reference, atol=1e-5)


def test_a_grey_image_feeds_an_rgb_model_and_a_calibrated_graph_serves_its_probabilities(
    tmp_path,
):
    from tunery.onnx.calibration import probabilities
    from tunery.onnx.runtime import Predictor

    model_dir = make_model_dir(tmp_path / "rgb", RGB, temperature=2.5)
    p = Predictor(model_dir, device="cpu")
    imgs = pictures(4, "L", size=(28, 28), seed=2)  # grey, and twice the model's size
    reference = ort_logits(model_dir, imgs, RGB)  # process() copies the grey into R, G and B
    assert p.calibrated and p.metadata["calibration"]["temperature"] == 2.5
    np.testing.assert_allclose(p.logits(imgs), reference, atol=1e-5)
    np.testing.assert_allclose(
        p.predict(imgs).probabilities, probabilities(reference, 2.5), atol=1e-5
    )


def test_what_is_not_an_image_is_refused_with_its_name(grey, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    cut = tmp_path / "cut.png"
    cut.write_bytes(png(pictures(1)[0])[:60])
    cases = [
        ([notes], "not_image", str(notes)),
        ([cut], "truncated_image", str(cut)),
        ([tmp_path / "gone.png"], "missing_file", "gone.png"),
        ([png(pictures(1)[0]), b"hello"], "not_image", "image 2"),
        ([b""], "zero_size", "image 1"),
        ([Image.new("F", (28, 28))], "unsupported_mode", "mode F is not accepted"),
        ([Image.new("I;16", (28, 28))], "unsupported_mode", "image 1"),
    ]
    for items, rule, named in cases:
        with pytest.raises(DataValidationError) as err:
            grey.predict(items)
        assert err.value.rule == rule and named in str(err.value), (items, str(err.value))
    with pytest.raises(BadInput, match="image 1: expected a PIL image, encoded image bytes"):
        grey.predict([3])


def test_a_graph_that_does_not_take_the_contract_is_refused(grey_dir, tmp_path):
    from tunery.onnx import export as ox
    from tunery.onnx.runtime import Predictor

    dest = tmp_path / "mismatch"
    shutil.copytree(grey_dir, dest)
    manifest = json.loads((dest / ox.MANIFEST_FILE).read_text())
    manifest["processor"] = contract(ProcessorConfig(size=32))
    (dest / ox.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(TuneryError, match=r"processor contract says pixel_values \[batch, 1, 32"):
        Predictor(dest, device="cpu")


# --------------------------------------------------------------------------- tunery predict
def _predict(args: list[str]) -> int:
    from tunery.cli import main

    with pytest.raises(SystemExit) as done:
        main(["predict", *args, "--device", "cpu", "--no-progress"])
    return done.value.code


def test_cli_predict_scores_a_folder_a_manifest_and_one_image(grey, grey_dir, tmp_path):
    from tunery.onnx.runtime import read_table

    folder = tmp_path / "photos"
    (folder / "b").mkdir(parents=True)
    imgs = pictures(4, seed=3)
    names = ["a.png", "b/c.png", "b/d.png", "e.png"]
    for name, img in zip(names, imgs, strict=True):
        (folder / name).write_bytes(png(img))
    (folder / "README.txt").write_text("other files are skipped")
    expected = grey.predict(imgs)

    assert _predict([str(folder), "-o", str(tmp_path / "f.csv"), "--model", str(grey_dir)]) == 0
    out = read_table(tmp_path / "f.csv")
    walk = [0, 3, 1, 2]  # the data layer's order: a folder's files, then its sub-folders
    assert out["image"].tolist() == [names[i] for i in walk]
    assert out["prediction"].tolist() == [expected.labels[i] for i in walk]
    probs = out[[f"prob_{c}" for c in LABELS]].to_numpy()
    np.testing.assert_allclose(probs, expected.probabilities[walk], atol=1e-6)

    manifest = folder / "list.jsonl"
    rows = [{"id": 7, "path": "b/d.png"}, {"id": 9, "path": "a.png"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [str(manifest), "-o", str(tmp_path / "m.jsonl"), "--model", str(grey_dir)]
    assert _predict([*args, "--image-column", "path"]) == 0
    out = read_table(tmp_path / "m.jsonl")
    assert out["id"].tolist() == [7, 9]
    assert out["prediction"].tolist() == [expected.labels[2], expected.labels[0]]

    one = ["-o", str(tmp_path / "one.parquet"), "--model", str(grey_dir)]
    assert _predict([str(folder / "e.png"), *one]) == 0
    assert read_table(tmp_path / "one.parquet")["prediction"].tolist() == expected.labels[3:]


def test_cli_predict_refuses_a_bad_image_and_writes_nothing(grey_dir, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "ok.png").write_bytes(png(pictures(1)[0]))
    (folder / "fake.png").write_text("a text file with an image's name")
    dest = tmp_path / "out.csv"
    assert _predict([str(folder), "-o", str(dest), "--model", str(grey_dir)]) == EXIT_INPUT
    assert "fake.png: [not_image]" in capsys.readouterr().err
    manifest = folder / "m.csv"
    manifest.write_text("image\nok.png\n../outside.png\n")
    assert _predict([str(manifest), "-o", str(dest), "--model", str(grey_dir)]) == EXIT_INPUT
    assert "m.csv: row 2: [outside_root]" in capsys.readouterr().err
    manifest.write_text("file\nok.png\n")
    assert _predict([str(manifest), "-o", str(dest), "--model", str(grey_dir)]) == EXIT_INPUT
    assert "no column 'text'" in capsys.readouterr().err  # checked before the model loads
    manifest.write_text("file,text\nok.png,x\n")
    assert _predict([str(manifest), "-o", str(dest), "--model", str(grey_dir)]) == EXIT_INPUT
    assert "no column 'image' of image paths" in capsys.readouterr().err
    assert not dest.exists()


def test_predict_help_says_what_it_reads_and_writes(capsys):
    from tunery.cli import main

    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("folder of images", "one image file", "--image-column", "prob_<label>"):
        assert words in text


# --------------------------------------------------------------------------- HTTP
@pytest.fixture(scope="module")
def client(grey):
    from fastapi.testclient import TestClient

    from tunery.onnx.http import create_app

    app = create_app(grey, max_batch=3, max_bytes=2_000)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_http_multipart_and_base64_score_like_the_predictor(client, grey):
    imgs = pictures(2, seed=4)
    expected = grey.predict(imgs).records()
    files = [("images", (f"{i}.png", png(img), "image/png")) for i, img in enumerate(imgs)]
    r = client.post("/predict", files=files)
    assert r.status_code == 200, r.text
    got = r.json()["predictions"]
    assert [p["label"] for p in got] == [e["label"] for e in expected]
    np.testing.assert_allclose([p["score"] for p in got], [e["score"] for e in expected], atol=1e-6)
    encoded = [base64.b64encode(png(img)).decode() for img in imgs]
    encoded[1] = "data:image/png;base64," + encoded[1]
    r = client.post("/predict", json={"images": encoded})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == got
    meta = client.get("/metadata").json()
    assert meta["processor"] == contract(GREY) and meta["modality"] == "image"
    assert meta["max_bytes"] == 2_000 and meta["max_batch"] == 3 and "max_chars" not in meta


def test_http_bad_uploads_get_4xx_with_the_reason(client):
    ok = png(pictures(1)[0])
    big = png(pictures(1, size=(60, 60))[0])  # noise: well over 2,000 bytes as a PNG
    assert len(ok) < 2_000 < len(big)
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    cases = [
        (
            {"files": [("images", ("notes.png", b"just text", "image/png"))]},
            422,
            "notes.png: [not_image]",
        ),
        ({"files": [("images", ("big.png", big, "image/png"))]}, 413, "big.png"),
        ({"files": [("images", ("a.png", ok, "image/png"))] * 4}, 422, "at most 3"),
        ({"files": [("images", ("a.png", ok, "image/png"))] * 9}, 422, "at most 3"),
        (
            {"data": {"note": "hi"}, "files": [("images", ("a.png", ok, "image/png"))]},
            422,
            "'note' is not a file",
        ),
        ({"json": {"images": [b64(ok), b64(b"GIF89a?")]}}, 422, "images[1]: [not_image]"),
        ({"json": {"images": ["%%%"]}}, 422, "images[0] is not valid base64"),
        ({"json": {"images": [b64(big)]}}, 413, "images[0]"),
        ({"json": {"images": []}}, 422, "at least 1"),
        ({"json": {"texts": ["a"]}}, 422, "images"),
        (
            {"content": b"{no", "headers": {"content-type": "application/json"}},
            422,
            "not valid JSON",
        ),
        ({"content": b"x", "headers": {"content-type": "text/plain"}}, 415, "multipart/form-data"),
    ]
    for kwargs, status, reason in cases:
        r = client.post("/predict", **kwargs)
        assert r.status_code == status and reason in str(r.json()["detail"]), (kwargs, r.text)
    assert client.get("/health").json()["status"] == "ok"  # still serving


def test_text_requests_keep_their_module_level_model():
    """The request models are module-level now; the app's limits live in its state."""
    from tunery.onnx import http

    assert http.TextsRequest.model_fields["texts"].is_required()
    assert http.Limits(max_batch=4).public("text") == {"max_batch": 4, "max_chars": 10_000}


# --------------------------------------------------------------------------- the pyfunc
@pytest.fixture(scope="module")
def image_champion(tmp_path_factory, grey_dir):
    import mlflow

    from tunery import mlflow_model, tracking
    from tunery.registry import promotion

    root = tmp_path_factory.mktemp("pyfunc-image")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    (root / "dvc.yaml").write_text("stages: {}\n")
    with tracking.stage_run(root, "pyfunc", "compress", {}) as run:
        version = mlflow_model.register_deployable(run, grey_dir, "img")
    tracking.set_alias(root, "img", promotion.CHAMPION, version)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        tracking.setup(root, "pyfunc")
        yield mlflow.pyfunc.load_model("models:/img@champion"), root


def test_the_registered_image_model_takes_bytes_and_paths(image_champion, grey, tmp_path):
    from mlflow.exceptions import MlflowException

    champion, _root = image_champion
    imgs = pictures(3, seed=5)
    expected = grey.predict(imgs)
    got = champion.predict(pd.DataFrame({"image": [png(i) for i in imgs]}))
    assert list(got.columns) == ["label", "score", "probabilities"]
    assert got["label"].tolist() == expected.labels
    np.testing.assert_allclose(got["score"], expected.probabilities.max(-1), atol=1e-6)
    paths = []
    for i, img in enumerate(imgs):
        paths.append(str(tmp_path / f"{i}.png"))
        Path(paths[-1]).write_bytes(png(img))
    assert champion.predict([{"image": p} for p in paths])["label"].tolist() == expected.labels
    sig = champion.metadata.signature
    assert sig.inputs.input_names() == ["image"]
    assert sig.inputs.input_types()[0].name == "binary"
    for table, message in [
        (pd.DataFrame({"image": [png(imgs[0]), b"nope"]}), "input row 2: [not_image]"),
        (pd.DataFrame({"text": ["a"]}), "missing inputs ['image']"),
    ]:
        with pytest.raises(MlflowException) as exc:
            champion.predict(table)
        assert message in str(exc.value) and exc.value.error_code == "INVALID_PARAMETER_VALUE"


@pytest.mark.slow
def test_mlflow_models_serve_takes_base64_images(image_champion, tmp_path):
    """`mlflow models serve` of the image champion: the binary column is base64 in JSON."""
    import os
    import sys
    import urllib.error
    import urllib.request

    from tests.services import QUIET_ENV, Proc, free_port, http_ok, wait_until
    from tunery import tracking

    _champion, root = image_champion
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(QUIET_ENV, MLFLOW_TRACKING_URI=tracking.tracking_uri(root))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    port, mlflow_bin = free_port(), str(Path(sys.executable).parent / "mlflow")
    proc = Proc(
        [
            *(mlflow_bin, "models", "serve", "-m", "models:/img@champion"),
            *("--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"),
        ],
        tmp_path / "serve.log",
        env,
        cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}"

    def post(rows: list[dict]) -> tuple[int, dict]:
        body = json.dumps({"dataframe_records": rows}).encode()
        req = urllib.request.Request(
            f"{url}/invocations", body, {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    try:
        wait_until(lambda: http_ok(f"{url}/ping"), proc, "mlflow models serve", timeout=120)
        imgs = pictures(2, seed=6)
        status, body = post([{"image": base64.b64encode(png(i)).decode()} for i in imgs])
        assert status == 200, body
        assert [set(p) for p in body["predictions"]] == [{"label", "score", "probabilities"}] * 2
        status, body = post([{"image": base64.b64encode(b"not an image").decode()}])
        assert status == 400 and "[not_image]" in body.get("message", ""), body
        assert http_ok(f"{url}/ping") and proc.alive()
    finally:
        proc.stop()
