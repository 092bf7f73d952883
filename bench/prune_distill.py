"""Does pruning + knowledge-distillation recovery make int8 pay (issue 14, item 5)?

On a finished text project (after `tunery run`): the compress stage's pruning (attention heads
and/or FFN neurons, `tunery.onnx.compress.prune_heads/prune_ffn`), then a short distillation of
the pruned model towards the unpruned one's logits on the train split (KL at temperature T plus
cross-entropy, AdamW, linear warm-up/decay), then the compress stage's export + optimizer +
dynamic int8. Reported per configuration: val+test macro-F1 (the compress stage's judged rows)
of the pruned, recovered and recovered-int8 models vs the PyTorch model, and the CPU time of one
pass over the test texts on one thread (`time.process_time`, best of 3: CPU time, so a shared
machine distorts it less than wall time) vs PyTorch eager fp32.

    PYTHONPATH=. python bench/prune_distill.py PROJECT STEPS '[{"heads": 4, "ffn": 0.5}]' WORKDIR

writes WORKDIR/results.json. The recovery is now the compress stage's `prune.recovery`
(`tunery.onnx.distill`); `bench/prune_recovery.py` runs the stage itself per setting.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from tunery.config import load_params
from tunery.data.tokens import unpadded
from tunery.onnx import compress as comp
from tunery.onnx import export as ox
from tunery.onnx import variants as vs
from tunery.onnx.runtime import length_batches


def encode(tok, texts, ml):
    return unpadded(tok, texts, max_length=ml)


root = Path(sys.argv[1])
steps = int(sys.argv[2])
configs = json.loads(sys.argv[3])
work = Path(sys.argv[4])
work.mkdir(exist_ok=True)
params = load_params(root / "params.yaml")
cfg = params.compress
torch.set_num_threads(1)
torch.manual_seed(0)
setup = vs.load_setup(
    cfg,
    finetune_dir=root / params.finetune.out_dir,
    export_dir=root / params.export.out_dir,
    data_dir=root / params.prepare.out_dir,
)
J, tok, names, n = setup.judge, setup.tokenizer, setup.names, setup.judge.n
ml = setup.ft.max_length
train = pd.read_parquet(root / params.prepare.out_dir / "train.parquet")
index = {lab: i for i, lab in enumerate(setup.ft.labels)}
tr_enc = encode(tok, train["text"].tolist(), ml)
tr_y = train["label"].map(index).to_numpy()
cal = encode(tok, train["text"].sample(n=512, random_state=0).tolist(), ml)
feeds = [f for _, f in length_batches(cal, 32, names, sort=False)]
teacher = setup.model.eval()


def f1(logits, part=slice(None)):
    return comp.task_metrics(J.y_true[part], logits[part].argmax(-1), n)["macro_f1"]


ref = f1(J.ref_logits)
print("reference macro-F1 val+test", round(ref, 4), "rows", len(J.y_true), flush=True)


def torch_logits(m):
    return comp.run_batches(comp.torch_forward(m.eval()), J.encoded, 64, names, n)


# teacher logits on train (KD targets)
with torch.inference_mode():
    t_logits = np.zeros((len(tr_enc), n), np.float32)
    for idx, feed in length_batches(tr_enc, 64, names):
        t_logits[idx] = teacher(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()


def recover(student, steps, lr=1e-4, bs=32, T=2.0, alpha=0.5):
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / (0.1 * steps)) * max(0.0, 1 - s / steps)
    )
    rng = np.random.default_rng(0)
    t0 = time.time()
    for s in range(steps):
        idx = rng.choice(len(tr_enc), bs, replace=False)
        _, feed = next(length_batches([tr_enc[i] for i in idx], bs, names, sort=False))
        out = student(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits
        tl = torch.from_numpy(t_logits[idx])
        kd = (
            F.kl_div(F.log_softmax(out / T, -1), F.softmax(tl / T, -1), reduction="batchmean")
            * T
            * T
        )
        loss = alpha * kd + (1 - alpha) * F.cross_entropy(out, torch.from_numpy(tr_y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if s % 50 == 0:
            print(f"  step {s} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    return student.eval()


def cpu_time(path, reps=3):
    r = comp.onnx_runner(path, "cpu", threads=1)
    part = J.encoded[J.test_part]
    best = 1e9
    for _ in range(reps):
        t = time.process_time()
        comp.run_batches(r, part, 64, r.input_names, n)
        best = min(best, time.process_time() - t)
    return best


def torch_time(m, reps=3):
    part = J.encoded[J.test_part]
    best = 1e9
    for _ in range(reps):
        t = time.process_time()
        comp.run_batches(comp.torch_forward(m.eval()), part, 64, names, n)
        best = min(best, time.process_time() - t)
    return best


def int8_of(model, tag, heads_kept):
    model_type, nh, hidden = ox.model_shape(teacher)
    size = hidden // nh
    raw = work / f"{tag}.raw.onnx"
    fp = work / f"{tag}.onnx"
    q = work / f"{tag}.int8.onnx"
    ox.export_onnx(model, tok, raw, opset=setup.opset, max_length=ml)
    ox.optimize(raw, fp, model_type=model_type, num_heads=heads_kept, hidden_size=heads_kept * size)
    comp.quantize_int8_dynamic(fp, q, **cfg.int8.quantize_options())
    return q


eager = AutoModelForSequenceClassification.from_pretrained(str(setup.ft.merged_dir)).eval()
results = {"reference_f1": ref, "torch_eager_cpu_s": torch_time(eager)}
base_q = int8_of(teacher, "base", ox.model_shape(teacher)[1])
bl = comp.run_batches(comp.onnx_runner(base_q, "cpu", threads=1), J.encoded, 64, names, n)
results["int8"] = {"f1": f1(bl), "cpu_s": cpu_time(base_q)}
results["int8"]["speedup"] = results["torch_eager_cpu_s"] / results["int8"]["cpu_s"]
print(json.dumps(results), flush=True)
for c in configs:
    tag = f"h{c['heads']}_f{c['ffn']}"
    s = teacher
    if c["heads"]:
        s = comp.prune_heads(s, feeds, c["heads"])
    if c["ffn"]:
        s = comp.prune_ffn(s, feeds, c["ffn"])
    before = f1(torch_logits(s))
    t0 = time.time()
    s = recover(s, steps, lr=c.get("lr", 1e-4))
    rec_s = time.time() - t0
    after_l = torch_logits(s)
    after = f1(after_l)
    q = int8_of(s, tag, ox.model_shape(teacher)[1] - c["heads"])
    ql = comp.run_batches(comp.onnx_runner(q, "cpu", threads=1), J.encoded, 64, names, n)
    row = {
        "pruned_f1": before,
        "recovered_f1": after,
        "recover_s": rec_s,
        "recovered_int8_f1": f1(ql),
        "int8_cpu_s": cpu_time(q),
    }
    row["speedup"] = results["torch_eager_cpu_s"] / row["int8_cpu_s"]
    row["int8_drop_pt"] = 100 * (ref - row["recovered_int8_f1"])
    results[tag] = row
    print(tag, json.dumps(row), flush=True)
(work / "results.json").write_text(json.dumps(results, indent=1))
