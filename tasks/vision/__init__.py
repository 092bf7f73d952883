"""The image pipeline's stages (`vision/dvc.yaml`): one module per stage, `run(cfg, ...)` plus `main()`."""
