"""dafar.quantize: int8 versions of the exported graphs for ONNX Runtime and LiteRT that keep the
detector's decisions, each checked against its float source (:func:`quantize`).

Needs the ``[export]`` extra; importing this package imports nothing heavy.
"""
from .api import Checks, QuantizeConfig, QuantizeResult, quantize
from .layout import Layout

__all__ = ["quantize", "QuantizeConfig", "QuantizeResult", "Checks", "Layout"]
