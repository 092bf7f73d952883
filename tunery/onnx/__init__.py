"""ONNX: the deployable side of a model.

export.py         PyTorch -> ONNX (+ the transformer optimizer), graph rewrites, model folders
logits.py         the module the exporter traces
compress.py       quantization, pruning, parity, benchmarks, the report's markdown and plot
compress_report.py  <compress.report_dir>/report.{json,md}: names, writes, checks, reads it
variants.py       the compress stage's work: build, judge, select and calibrate the variants
int8_fallback.py  accuracy-aware int8 (sensitive nodes kept in float)
calibration.py    temperature scaling baked into the deployed graph
runtime.py        `Predictor`: a verified model folder (or `models:/` URI) on ONNX Runtime
http.py           the HTTP server around a `Predictor`
"""
