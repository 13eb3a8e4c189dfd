"""dafar.export: fuse victim, feedback loop and detector into one ONNX / TFLite graph (issue 3; not built yet)."""
