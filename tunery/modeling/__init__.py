"""Models: build, pretrain, fine-tune, save and load the classifier.

    factory.py       base encoders (folder, package:, hub id) and scratch BERT + WordPiece
    objectives.py    the pretraining objectives (MLM, SimCSE), collators, embeddings, the probe
    training.py      checkpoints and fingerprints, Trainer arguments, devices, DDP
    callbacks.py     Trainer callbacks: checkpoint marker, wall-clock budget, head warm-up, progress
    encoder.py       the encoder folder (the pretrain stage's output): build, write, check
    pretrainer.py    the pretraining loop, held-out loss, probe (the pretrain stage's work)
    methods.py       the fine-tune model factory: encoder + head, wrapped for a PEFT method
    trainer.py       the fine-tune loop (`train`) on `transformers.Trainer`
    hf_trainer.py    its Trainer subclass, step callback and weighted loss
    devices.py       device, precision, peak memory
    arms.py          the arms (probe, base, pipeline, full) and the pretrain gate
    save.py          adapter/ and merged/, written with reload and merge parity checks
    predict.py       PyTorch predictions; a finetune output loaded to predict
    finetune_dir.py  the finetune output folder (names, write, check, read)

The modality seam (text today, images next) is `tunery.modality`: its model-factory step is
`methods.load_base`.
"""
