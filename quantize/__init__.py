"""dafar.quantize: int8 quantization of the fused graph with the detector kept intact (issue 4; not built yet)."""
