"""export: merged model -> checked, optimized ONNX; parity per method; the deployable folder format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_rows
from tests.tiny import make_tiny_encoder
from tunery.config import ExportConfig
from tunery.errors import TuneryError

LABELS = ["animal", "food", "tool"]


def make_finetune_dir(
    root: Path, *, method: str = "full", seed: int = 0, train_steps: int = 10
) -> Path:
    """A finetune output as the finetune stage writes it: merged/, labels.json, finetune.json.

    The head is trained for a few steps on the toy rows so predictions are not all one class.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    ft = root / "finetune"
    ft.mkdir(parents=True)
    info = {"method": method, "mergeable": method != "prefix", "encoder": "tiny", "max_length": 32}
    (ft / "finetune.json").write_text(json.dumps(info))
    (ft / "labels.json").write_text(json.dumps(LABELS))
    if method == "prefix":
        return ft
    enc = make_tiny_encoder(root / "encoder", seed=seed)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        enc,
        num_labels=3,
        id2label=dict(enumerate(LABELS)),
        label2id={k: i for i, k in enumerate(LABELS)},
    )
    tok = AutoTokenizer.from_pretrained(enc)
    rows = make_rows(20)
    batch = tok(rows["text"].tolist(), padding=True, return_tensors="pt")
    y = torch.tensor([LABELS.index(x) for x in rows["label"]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(train_steps):
        opt.zero_grad()
        model(**batch, labels=y).loss.backward()
        opt.step()
    if method in ("lora", "ia3", "adalora"):
        model = merged_adapter(model, method, seed)
    model.eval().save_pretrained(ft / "merged")
    tok.save_pretrained(ft / "merged")
    return ft


def merged_adapter(model, method: str, seed: int):
    """Wrap `model` in a peft adapter with non-trivial weights and merge it back (what finetune does)."""
    import torch
    from peft import AdaLoraConfig, IA3Config, LoraConfig, TaskType, get_peft_model

    task = TaskType.SEQ_CLS
    config = {
        "lora": lambda: LoraConfig(task_type=task, r=4, target_modules=["query", "value"]),
        "ia3": lambda: IA3Config(
            task_type=task,
            target_modules=["key", "value", "output.dense"],
            feedforward_modules=["output.dense"],
        ),
        "adalora": lambda: AdaLoraConfig(
            task_type=task, init_r=4, target_r=2, total_step=10, target_modules=["query", "value"]
        ),
    }[method]()
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if any(k in name for k in ("lora_A", "lora_B", "lora_E", "ia3_l")):
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
    return peft_model.merge_and_unload()


def make_data_dir(root: Path) -> Path:
    data = root / "prepared"
    data.mkdir(parents=True)
    make_rows(20).to_parquet(data / "train.parquet")
    make_rows(10, offset=40).to_parquet(data / "test.parquet")
    return data


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from tasks import export

    root = tmp_path_factory.mktemp("export")
    ft, data = make_finetune_dir(root), make_data_dir(root)
    metrics = export.run(ExportConfig(), finetune_dir=ft, data_dir=data, out_dir=root / "onnx")
    return root, metrics


def test_export_writes_a_checked_optimized_deployable_folder(exported):
    import onnx

    root, metrics = exported
    out = root / "onnx"
    for name in ("model.onnx", "raw.onnx", "labels.json", "tunery_model.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "tunery_model.json").read_text())
    assert manifest["variant"] == "fp32" and manifest["opset"] >= 17
    assert manifest["max_length"] == 32
    model = onnx.load(out / "model.onnx")
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= ops, ops  # fused by the optimizer
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "sequence"]
    assert metrics["parity"]["max_abs_logit_diff"] < 1e-4
    assert metrics["parity"]["agreement"] == 1.0


def test_exported_model_runs_at_other_batch_and_sequence_sizes(exported):
    from tunery.onnx.runtime import Predictor

    root, _ = exported
    p = Predictor(root / "onnx", device="cpu", batch_size=3)
    texts = ["a", "a quick dish made from rice " * 3, "a red animal", "wood", "old tool", "x y"]
    one_by_one = np.concatenate([p.logits([t]) for t in texts])
    np.testing.assert_allclose(p.logits(texts), one_by_one, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "ia3", "adalora"])
def test_export_parity_for_mergeable_methods(tmp_path, method):
    """Every mergeable method leaves the same merged layout; each exports with parity."""
    from tasks import export

    ft, data = make_finetune_dir(tmp_path, method=method, train_steps=3), make_data_dir(tmp_path)
    metrics = export.run(ExportConfig(), finetune_dir=ft, data_dir=data, out_dir=tmp_path / "o")
    assert metrics["method"] == method
    assert metrics["parity"]["max_abs_logit_diff"] < 1e-4


def test_prefix_tuning_fails_with_the_methods_that_export(tmp_path):
    from tasks import export

    ft, data = make_finetune_dir(tmp_path, method="prefix"), make_data_dir(tmp_path)
    with pytest.raises(TuneryError, match=r"prefix.*lora, ia3, adalora, full"):
        export.run(ExportConfig(), finetune_dir=ft, data_dir=data, out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_parity_failure_writes_nothing(tmp_path):
    from tasks import export

    ft, data = make_finetune_dir(tmp_path, train_steps=3), make_data_dir(tmp_path)
    strict = ExportConfig(max_logit_diff=1e-12)
    with pytest.raises(TuneryError, match="parity failed"):
        export.run(strict, finetune_dir=ft, data_dir=data, out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_external_data_outside_the_folder_is_refused(exported, tmp_path):
    import shutil

    import onnx

    from tunery.onnx import export as ox

    root, _ = exported
    folder = tmp_path / "m"
    shutil.copytree(root / "onnx", folder)
    model = onnx.load(folder / "model.onnx")
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in {"location": "../outside.bin", "offset": "0", "length": "4"}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(model, folder / "model.onnx")
    (tmp_path / "outside.bin").write_bytes(b"\0" * 4)
    with pytest.raises(TuneryError, match="outside the model folder"):
        ox.check_external_data(folder / "model.onnx")


def test_external_data_inside_the_folder_is_accepted(exported, tmp_path):
    import onnx

    from tunery.onnx import export as ox

    root, _ = exported
    model = onnx.load(root / "onnx" / "model.onnx")
    dest = tmp_path / "m" / "model.onnx"
    dest.parent.mkdir()
    onnx.save(model, dest, save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert ox.check_external_data(dest) == ["weights.bin"]


def test_last_layer_runs_on_the_first_token_only(exported, tmp_path):
    """The classifier reads token 0: the last layer's tail is sliced to it, logits unchanged."""
    import onnx

    from tunery.onnx import export as ox

    root, metrics = exported
    assert metrics["fused_operators"]["ClsOnlyTail"] >= 4  # O-proj, 2 layer norms, FFN
    graph = onnx.load(root / "onnx" / "model.onnx").graph
    assert sum(n.name.startswith("cls_only_tail_Slice") for n in graph.node) == 2
    full = ox.optimize(
        root / "onnx" / "raw.onnx",
        tmp_path / "full.onnx",
        model_type="bert",
        num_heads=2,
        hidden_size=32,
        cls_only=False,
    )
    assert "ClsOnlyTail" not in full
    outs = _run_padded_batch([root / "onnx" / "model.onnx", tmp_path / "full.onnx"], padded={1: 5})
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


def _run_padded_batch(paths, padded):
    """Each model's first output on 4 random 9-token texts; `padded`: row -> tokens kept."""
    from tunery.onnx.runtime import create_session

    rng = np.random.default_rng(0)
    ids = rng.integers(5, 100, (4, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    for row, keep in padded.items():
        mask[row, keep:] = 0
    feed = {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": 0 * ids}
    outs = []
    for path in paths:
        session, _ = create_session(path, "cpu")
        names = {i.name for i in session.get_inputs()}
        outs.append(session.run(None, {k: v for k, v in feed.items() if k in names})[0])
    return outs


def _graph(tail: str):
    """x (batch, seq, 4) -> Reshape -> MatMul -> Add -> <tail>; tail: gather0 | mean | both."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array([0, 0, 4], np.int64), "shape"),
        numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "b"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["r"], "reshape"),
        helper.make_node("MatMul", ["r", "w"], ["m"], "matmul"),
        helper.make_node("Add", ["m", "b"], ["h"], "add"),
    ]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    outputs = [y]
    if tail == "mean":
        nodes.append(helper.make_node("ReduceMean", ["h"], ["y"], "mean", axes=[1], keepdims=0))
    else:
        nodes.append(helper.make_node("Gather", ["h", "zero"], ["y"], "gather", axis=1))
        if tail == "both":
            outputs.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, None))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])
    graph = helper.make_graph(nodes, "g", [x], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_cls_only_tail_only_where_token_zero_is_all_that_is_read():
    import onnxruntime as ort

    from tunery.onnx.export import cls_only_tail

    x = np.random.default_rng(1).normal(size=(2, 5, 4)).astype(np.float32)

    def run(model):
        s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return s.run(["y"], {"x": x})[0]

    model = _graph("gather0")
    before = run(model)
    assert cls_only_tail(model) == 2  # MatMul and Add now see token 0 only
    assert [n.op_type for n in model.graph.node][:2] == ["Reshape", "Slice"]
    np.testing.assert_allclose(run(model), before, atol=1e-6)
    for tail in ("mean", "both"):  # every token is read: nothing to narrow
        model = _graph(tail)
        assert cls_only_tail(model) == 0
        assert "Slice" not in {n.op_type for n in model.graph.node}


def test_pack_tokens_skips_the_padding_with_the_same_logits(exported, tmp_path):
    import onnx

    from tunery.onnx.export import pack_tokens

    root, _ = exported
    model = onnx.load(root / "onnx" / "model.onnx")
    assert pack_tokens(model) >= 4  # the first layer's projections, FFN, layer norms at least
    assert "NonZero" in {n.op_type for n in model.graph.node}
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "packed.onnx")
    outs = _run_padded_batch(
        [root / "onnx" / "model.onnx", tmp_path / "packed.onnx"], padded={1: 5, 2: 2}
    )
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)
    assert pack_tokens(_graph("gather0")) == 0  # no attention mask input: nothing to pack
