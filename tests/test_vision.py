"""The vision modeling layer on tiny ViTs (CPU, seconds): processor contract, augmentations,
NT-Xent, SimCLR steps and resume, probe, LoRA share and merge parity, ONNX parity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from tunery.modeling.training import MARKER
from tunery.vision import augment as aug
from tunery.vision.finetune import (
    AugmentedCollator,
    FinetuneSettings,
    apply_lora,
    finetune,
    init_head_from_probe,
    logits,
    merge,
    trainable_share,
)
from tunery.vision.processor import ProcessorConfig, contract, process, process_paths
from tunery.vision.simclr import (
    ImageTensorDataset,
    SimCLRCollator,
    SimCLRSettings,
    build_simclr,
    nt_xent,
    pretrain,
)
from tunery.vision.vit import VitSpec, build_classifier, encoder_of

GREY = ProcessorConfig()
TINY = VitSpec(patch_size=7, hidden_size=32, num_layers=2, num_heads=2)


def images(n: int, mode: str = "L", size: tuple[int, int] = (28, 28), seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode) for _ in range(n)]


def two_class_pixels(n: int, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Class 0 bright on top, class 1 bright below, plus noise: separable, not trivially."""
    gen = torch.Generator().manual_seed(seed)
    labels = [i % 2 for i in range(n)]
    x = torch.randn(n, 1, 28, 28, generator=gen) * 0.5
    for i, y in enumerate(labels):
        x[i, :, :14] += 1.5 if y == 0 else 0.0
        x[i, :, 14:] += 1.5 if y == 1 else 0.0
    return x, labels


# --------------------------------------------------------------------------- processor
def test_processor_shapes_dtype_and_values():
    pv = process(images(3, size=(40, 20)) + images(1, "RGB"), GREY)
    assert pv.shape == (4, 1, 28, 28) and pv.dtype == torch.float32
    white = process([Image.new("L", (28, 28), 255)], GREY)
    assert torch.allclose(white, torch.full_like(white, (1 - 0.2860) / 0.3530))
    rgb = ProcessorConfig(size=32, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert process(images(2, "RGB"), rgb).shape == (2, 3, 32, 32)
    assert process([], rgb).shape == (0, 3, 32, 32)
    spec = contract(rgb)
    assert spec["name"] == "pixel_values" and spec["shape"] == ["batch", 3, 32, 32]
    assert spec["dtype"] == "float32" and spec["preprocessing"]["mode"] == "RGB"


def test_processor_is_deterministic_and_reads_files(tmp_path):
    imgs = images(5, size=(30, 30), seed=3)
    paths = []
    for i, img in enumerate(imgs):
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    assert torch.equal(process(imgs, GREY), process(imgs, GREY))
    assert torch.equal(process_paths(paths, GREY, batch_size=2), process(imgs, GREY))


def test_processor_config_refuses_mismatched_statistics():
    with pytest.raises(ValueError, match="one value per channel"):
        ProcessorConfig(channels=3)


# --------------------------------------------------------------------------- augmentations
def test_augmentations_seeded_and_shape_preserving():
    x = process(images(6, seed=1), GREY)
    cfg = aug.AugmentConfig(blur=0.5)
    a = aug.augment(x, cfg, GREY, aug.generator(7))
    assert a.shape == x.shape and torch.isfinite(a).all()
    assert torch.equal(a, aug.augment(x, cfg, GREY, aug.generator(7)))
    assert not torch.equal(a, aug.augment(x, cfg, GREY, aug.generator(8)))
    assert not torch.allclose(a, x)


def test_full_crop_with_flip_is_a_mirror_and_blur_keeps_flat_images():
    x = process(images(2, seed=2), GREY)
    mirror = aug.AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=1.0, jitter=0.0)
    out = aug.augment(x, mirror, GREY, aug.generator(0))
    assert torch.allclose(out, torch.flip(x, dims=[3]), atol=1e-5)
    flat = torch.full((2, 1, 8, 8), 0.3)
    blurred = aug.blur(flat, aug.AugmentConfig(blur=1.0), aug.generator(0))
    assert torch.allclose(blurred, flat, atol=1e-6)


# --------------------------------------------------------------------------- NT-Xent
def test_nt_xent_equals_the_hand_computed_value():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[0.6, 0.8], [0.8, -0.6]])  # unit vectors already
    t = 0.5
    views = [z1[0], z1[1], z2[0], z2[1]]
    partner = [2, 3, 0, 1]
    expected = 0.0
    for i, v in enumerate(views):
        sims = {j: float(v @ w) / t for j, w in enumerate(views) if j != i}
        expected -= math.log(math.exp(sims[partner[i]]) / sum(math.exp(s) for s in sims.values()))
    assert nt_xent(z1, z2, t).item() == pytest.approx(expected / 4, abs=1e-6)


def test_nt_xent_lower_for_aligned_views():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(8, 16, generator=gen)
    aligned = nt_xent(z, z + 0.05 * torch.randn(8, 16, generator=gen), 0.2)
    unrelated = nt_xent(z, torch.randn(8, 16, generator=gen), 0.2)
    assert aligned < unrelated


# --------------------------------------------------------------------------- SimCLR
def test_simclr_steps_lower_the_loss_on_fixed_views(tmp_path):
    settings = SimCLRSettings(batch_size=16, max_steps=12, learning_rate=2.0e-3, logging_steps=4)
    model = build_simclr(GREY, settings, spec=TINY)
    x, _ = two_class_pixels(32)
    data = ImageTensorDataset(x)
    batch = SimCLRCollator(aug.AugmentConfig(), GREY, seed=5)([data[i] for i in range(16)])
    model.eval()
    with torch.no_grad():
        before = model(**batch)["loss"].item()
    result = pretrain(
        model, x, settings, processor=GREY, augment_cfg=aug.AugmentConfig(), out_dir=tmp_path
    )
    model.eval()
    with torch.no_grad():
        after = model(**batch)["loss"].item()
    assert after < before
    assert result["steps"] == 12 and result["images_per_s"] > 0
    assert (tmp_path / "model" / "model.safetensors").is_file()
    clf = build_classifier(GREY, ["a", "b"], base_dir=tmp_path / "model")
    assert torch.equal(clf.vit.embeddings.cls_token, model.vit.embeddings.cls_token)


def test_simclr_resume_after_a_stop_matches_the_uninterrupted_run(tmp_path):
    x, _ = two_class_pixels(32)

    def run(out, *, resume=None, minutes=None):
        settings = SimCLRSettings(batch_size=8, max_steps=4, save_steps=2, max_minutes=minutes)
        model = build_simclr(GREY, settings, spec=TINY)
        result = pretrain(
            model,
            x,
            settings,
            processor=GREY,
            augment_cfg=aug.AugmentConfig(),
            out_dir=out,
            resume=resume,
        )
        return model, result

    whole, _ = run(tmp_path / "a")
    _, stopped = run(tmp_path / "b", resume="fp", minutes=1e-9)  # stopped after one step
    assert stopped["stopped_by_budget"] and stopped["steps"] == 1
    assert (tmp_path / "b" / "checkpoint-1" / MARKER).is_file()
    half = tmp_path / "b" / "checkpoint-3"  # a save cut short by a kill: no marker
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"trunc")
    resumed, result = run(tmp_path / "b", resume="fp")
    assert result["steps"] == 4 and result["images"] == 3 * 8  # from step 1, not from scratch
    assert not half.exists()  # skipped and removed
    for p, q in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


def test_mae_learns_and_resumes_to_the_uninterrupted_weights(tmp_path):
    from tunery.vision import mae
    from tunery.vision.settings import MAESettings

    x, _ = two_class_pixels(32)
    start = build_simclr(GREY, SimCLRSettings(), spec=TINY)

    def run(out, *, resume=None, minutes=None, steps=4):
        settings = MAESettings(
            batch_size=8, max_steps=steps, save_steps=2, max_minutes=minutes, learning_rate=3e-3
        )
        model = mae.build_mae(start, settings)
        return model, mae.pretrain(model, x, settings, out_dir=out, resume=resume)

    model = mae.build_mae(start, MAESettings())
    for k, v in mae.encoder_weights(start).items():  # the start's weights, but MAE's positions
        assert torch.equal(model.state_dict()[k], v) == (k != mae.POSITIONS), k
    _, long = run(tmp_path / "long", steps=24)
    assert long["loss_last"] < long["loss_first"]
    whole, _ = run(tmp_path / "a")
    _, stopped = run(tmp_path / "b", resume="fp", minutes=1e-9)  # stopped after one step
    assert stopped["stopped_by_budget"] and stopped["steps"] == 1
    resumed, result = run(tmp_path / "b", resume="fp")
    assert result["resumed_from_step"] == 1 and result["steps"] == 4
    for p, q in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
    encoder = mae.into_encoder(resumed, build_simclr(GREY, SimCLRSettings(), spec=TINY))
    assert torch.equal(encoder.vit.embeddings.cls_token, resumed.vit.embeddings.cls_token)


# --------------------------------------------------------------------------- probe
def test_probe_runs_on_pretrained_and_random_encoders():
    from tunery.vision.probe import embed, pixel_baseline, probe

    x, y = two_class_pixels(40)
    random_clf = build_classifier(GREY, ["a", "b"], spec=TINY, seed=1)
    other = build_simclr(GREY, SimCLRSettings(seed=2), spec=TINY)
    assert embed(other, x[:5], pooling="cls").shape == (5, 32)
    scores = probe({"simclr": other, "random": random_clf}, x[:30], y[:30], x[30:], y[30:])
    assert set(scores) == {"simclr", "random"}
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    assert pixel_baseline(x[:30], y[:30], x[30:], y[30:]) == 1.0


# --------------------------------------------------------------------------- fine-tune
LORA_SPEC = VitSpec(patch_size=7, hidden_size=64, num_layers=2, num_heads=2)


def test_lora_share_and_merge_keeps_logits():
    model = build_classifier(GREY, ["a", "b", "c"], spec=LORA_SPEC)
    lora = apply_lora(model, FinetuneSettings(method="lora", lora_r=2))
    assert trainable_share(lora) < 0.10
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable)
    assert not any("lora" not in n and "classifier" not in n for n in trainable)
    torch.manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero: give the adapters something to merge
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    x, _ = two_class_pixels(6)
    before = logits(lora, x)
    merged = merge(lora)
    assert not hasattr(merged, "peft_config")
    assert torch.allclose(logits(merged, x), before, atol=1e-5)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_finetune_returns_test_accuracy(tmp_path, method):
    x, y = two_class_pixels(48)
    model = build_classifier(GREY, ["top", "bottom"], spec=TINY)
    settings = FinetuneSettings(method=method, max_steps=8, batch_size=16, learning_rate=2.0e-3)
    result = finetune(model, x[:32], y[:32], x[32:], y[32:], settings, out_dir=tmp_path)
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert (result["trainable_share"] < 1.0) == (method == "lora")
    assert not hasattr(result["model"], "peft_config")


def test_augmented_collator_views_depend_on_the_batch_only():
    """The fine-tune's views: labels kept, pixels changed, the same batch gives the same views
    (a rerun sees what the first run saw), another batch other views."""
    x, y = two_class_pixels(8)
    data = ImageTensorDataset(x, y)
    collate = AugmentedCollator(aug.AugmentConfig(crop_scale=(0.5, 1.0)), GREY, seed=3)
    first = collate([data[i] for i in range(4)])
    assert torch.equal(first["labels"], torch.as_tensor(y[:4]))
    assert first["pixel_values"].shape == x[:4].shape
    assert not torch.allclose(first["pixel_values"], x[:4])
    assert torch.equal(collate([data[i] for i in range(4)])["pixel_values"], first["pixel_values"])
    other = collate([data[i] for i in range(4, 8)])["pixel_values"]
    assert not torch.allclose(other, first["pixel_values"])


@pytest.mark.parametrize("classes", [2, 3])
def test_head_from_probe_predicts_as_the_logistic_regression(classes):
    """LP-FT's start: the classifier is the standardised logistic regression on the frozen CLS
    embeddings (sklearn's two-class single row included), so it predicts what that model does."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tunery.vision.probe import embed

    x, _ = two_class_pixels(40)
    y = [i % classes for i in range(40)]
    model = build_classifier(GREY, [str(c) for c in range(classes)], spec=TINY)
    init_head_from_probe(model, x, y)
    feats = embed(model, x, pooling="cls")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(feats, y)
    assert (logits(model, x).argmax(-1).numpy() == clf.predict(feats)).mean() >= 0.95


def test_finetune_with_augment_needs_the_processor(tmp_path):
    x, y = two_class_pixels(32)
    model = build_classifier(GREY, ["top", "bottom"], spec=TINY)
    settings = FinetuneSettings(max_steps=2, batch_size=8, augment=aug.AugmentConfig())
    with pytest.raises(ValueError, match="processor"):
        finetune(model, x[:16], y[:16], x[16:], y[16:], settings, out_dir=tmp_path)
    result = finetune(
        model, x[:16], y[:16], x[16:], y[16:], settings, out_dir=tmp_path, processor=GREY
    )
    assert 0.0 <= result["test_accuracy"] <= 1.0


# --------------------------------------------------------------------------- ONNX
def test_onnx_export_matches_pytorch_with_a_dynamic_batch(tmp_path):
    pytest.importorskip("onnxruntime")
    from tunery.vision.export import export_onnx, onnx_logits

    model = build_classifier(GREY, [str(i) for i in range(10)], spec=TINY).eval()
    path = export_onnx(model, tmp_path / "model.onnx")
    x, _ = two_class_pixels(5)
    got = onnx_logits(path, x)
    assert got.shape == (5, 10)
    assert np.allclose(got, logits(model, x).numpy(), atol=1e-4)
    assert encoder_of(model) is model.vit


def test_int8_dynamic_keeps_the_patch_embedding_conv_in_float(tmp_path):
    """Only the matmuls become int8: the Conv stays a float Conv (no ConvInteger), and the
    variant still agrees with the float graph on these images."""
    pytest.importorskip("onnxruntime")
    import onnx

    from tunery.vision.export import export_onnx, onnx_logits
    from tunery.vision.variants import build, float_convs

    model = build_classifier(GREY, [str(i) for i in range(10)], spec=TINY).eval()
    raw = export_onnx(model, tmp_path / "raw.onnx")
    assert [n.split("/")[-3:] for n in float_convs(raw)] == [
        ["patch_embeddings", "projection", "Conv"]
    ]
    build("int8_dynamic", raw, tmp_path / "int8.onnx", None, tmp_path)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node]
    assert "Conv" in ops and "ConvInteger" not in ops and "MatMulInteger" in ops
    x, _ = two_class_pixels(8)
    ref, got = onnx_logits(raw, x), onnx_logits(tmp_path / "int8.onnx", x)
    assert (ref.argmax(-1) == got.argmax(-1)).mean() >= 0.75


def test_onnxruntime_waits_passively_where_the_process_asked_for_it(monkeypatch):
    """One wait policy per process: OMP_WAIT_POLICY=PASSIVE (the image stages) turns
    onnxruntime's spinning off too; unset (the text stages), its default stays."""
    ort = pytest.importorskip("onnxruntime")
    from tunery.onnx.runtime import session_options

    def spinning(so) -> str:  # onnxruntime's default when the entry is absent: spin
        key = "session.intra_op.allow_spinning"
        try:
            return so.get_session_config_entry(key)
        except RuntimeError:  # "does not have configuration with key"
            return "1"

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    so = session_options(ort, threads=1)
    assert so.intra_op_num_threads == 1 and spinning(so) == "1"
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert spinning(session_options(ort)) == "0"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert spinning(session_options(ort)) == "1"


def test_torch_throughput_runs_on_the_bench_threads_and_restores_them():
    from tunery.vision.deploy import torch_throughput

    model = build_classifier(GREY, ["a", "b"], spec=TINY).eval()
    x, _ = two_class_pixels(8)
    before = torch.get_num_threads()
    seen = []
    real = model.forward
    model.forward = lambda **kw: (seen.append(torch.get_num_threads()), real(**kw))[1]
    assert torch_throughput(model, x, batch=4, batches=2, repeats=1, threads=1) > 0
    assert set(seen) == {1} and torch.get_num_threads() == before


def test_image_model_folder_carries_its_processor_contract(tmp_path):
    """The deployable folder format (tunery/onnx/export.py) for an image model: modality "image",
    the processor contract in the manifest (rebuilt exactly by `from_contract`), no tokenizer."""
    import json

    from tunery.errors import TuneryError
    from tunery.onnx import export as ox
    from tunery.vision.export import export_onnx
    from tunery.vision.processor import from_contract

    model = build_classifier(GREY, ["a", "b"], spec=TINY).eval()
    raw = export_onnx(model, tmp_path / "raw.onnx")
    dest = tmp_path / "deploy"
    dest.mkdir()
    kw = {"onnx_file": raw, "labels": ["a", "b"], "variant": "fp32", "provider": "cpu"}
    ox.write_model_dir(dest, **kw, opset=17, source={}, processor=contract(GREY))
    manifest = ox.verify_model_dir(dest)
    assert ox.modality(manifest) == "image" and "max_length" not in manifest
    assert from_contract(manifest["processor"]) == GREY
    assert not (dest / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="either a tokenizer"):
        ox.write_model_dir(tmp_path, **kw, opset=17, source={})
    del manifest["processor"]
    (dest / ox.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(TuneryError, match='needs its "processor"'):
        ox.verify_model_dir(dest)
    changed = contract(GREY) | {"layout": "NHWC"}
    with pytest.raises(ValueError, match="does not implement"):
        from_contract(changed)


def test_base_folder_must_take_the_processor_images(tmp_path):
    model = build_classifier(GREY, ["a", "b"], spec=TINY)
    model.save_pretrained(tmp_path / "base")
    loaded = build_classifier(GREY, ["x", "y", "z"], base_dir=tmp_path / "base")
    assert loaded.config.num_labels == 3
    assert torch.equal(loaded.vit.embeddings.cls_token, model.vit.embeddings.cls_token)
    with pytest.raises(ValueError, match="1x32px"):
        build_classifier(ProcessorConfig(size=32), ["a"], base_dir=tmp_path / "base")
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_classifier(GREY, ["a"], base_dir=tmp_path / "nowhere")


def test_bench_runs_on_a_fake_fashion_mnist(tmp_path):
    """40 images per split, 4 per class, with the package's file names."""
    import gzip
    import importlib.util
    import json

    from tunery.data.fashion_mnist import FILES

    rng = np.random.default_rng(0)
    for image_file, label_file in FILES.values():
        for name, array in (
            (image_file, rng.integers(0, 256, (40, 28, 28))),
            (label_file, np.arange(40) % 10),
        ):
            header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
            (tmp_path / name).write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))
    spec = importlib.util.spec_from_file_location("simclr_value", "bench/simclr_value.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "result.json"
    argv = f"--data {tmp_path} --fractions 0.0003 --pool 16 --test 20 --patch 7 --hidden 32"
    argv += " --layers 1 --heads 2 --batch 8 --pretrain-steps 2 --finetune-steps 2"
    bench.main([*argv.split(), "--methods", "full,lora", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["sizes"] == {"pool": 16, "test": 20, "labelled": {"0.0003": 20}}
    assert set(result["simclr_vs_random"]) == {
        "probe@0.0003",
        "finetune_full@0.0003",
        "finetune_lora@0.0003",
    }
    assert result["pretrain"]["images_per_s"] > 0
    use = result["pretrain"]["utilisation"]  # on CPU: the FLOP rate, no MFU
    assert use["model_gflops_per_s"] > 0 and use["mfu"] is None
