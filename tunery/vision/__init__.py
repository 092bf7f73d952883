"""Images (issue 19): the vision modeling layer and the image pipeline's work.

The seam is the one the text side uses: data source (`tunery.data.images`) -> processor
(`processor`) -> model factory (`vit`) -> ONNX inputs (`export`, the `pixel_values` contract of
`processor.contract`). The image pipeline (`vision/dvc.yaml`, `tasks/vision/`) calls `params`,
`splits`, `pretraining` (SimCLR, `encoder_dir`), `arms` (fine-tune arms and the pretrain gate,
`finetune_dir`), `deploy` and `variants` (ONNX folders, compression), `evaluation`.
"""
