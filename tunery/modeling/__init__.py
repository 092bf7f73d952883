"""Models: build, fine-tune, save and load the classifier.

    methods.py      the model factory: encoder + head, wrapped for a PEFT method; warm starts
    trainer.py      the training loop (`train`), on `transformers.Trainer`
    hf_trainer.py   the Trainer subclass, its step callback and the weighted loss
    devices.py      device, precision, peak memory
    save.py         write adapter/ and merged/, with reload and merge parity checks
    predict.py      PyTorch predictions; a finetune output loaded to predict
    finetune_dir.py the finetune output folder's contract (names, write, check, read)

The modality seam (text today, images next): data source (`tunery.data`) -> processor (the
tokenizer, `AutoTokenizer` of the encoder) -> model factory (`methods.load_base`) -> ONNX inputs
(`tunery.onnx.export.input_names_for`) -> predictor inputs (`tunery.onnx.runtime.Predictor`).
A second modality brings its own processor and factory at these points; the stages, tracking,
registry and flows stay as they are (see `tunery.modality`).
"""
