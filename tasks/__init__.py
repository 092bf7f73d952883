"""One module per `dvc.yaml` stage: `run(cfg, *, inputs..., out_dir) -> metrics` plus a short `main()`."""
