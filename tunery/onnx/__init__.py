"""ONNX: the deployable side of a model (export, compression variants, the runtime, HTTP)."""
