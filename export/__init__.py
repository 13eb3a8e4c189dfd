"""dafar.export: the whole defence as one ONNX graph and one TFLite graph per detector and input
contract, each checked against torch before it is written (:func:`export`).

Needs the ``[export]`` extra; importing this package imports nothing heavy.
"""
from .api import ExportConfig, ExportResult, export
from .validate import Tolerance, validate_model_outputs

__all__ = ["export", "ExportConfig", "ExportResult", "validate_model_outputs", "Tolerance"]
