"""The vision modeling layer (issue 19): image processor, ViT factory, SimCLR, probe, fine-tune, export.

Library code only: the DVC stages do not call it yet. The seam is the one the text side uses:
data source (`tunery.data.images`) -> processor (`processor`) -> model factory (`vit`) ->
ONNX inputs (`export`, the `pixel_values` contract of `processor.contract`).
"""
