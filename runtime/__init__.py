"""dafar.runtime: the thin on-device runtime (numpy plus one backend: ai-edge-litert or onnxruntime).

Importing this package never loads torch or tensorflow, and not even the backend: that is
imported when a :class:`Defence` is constructed (a test checks it in a fresh interpreter).
"""
from .core import Backend, Defence, InferenceError, OnInvalid, Prediction, Provider, default_model, list_models

__all__ = ["Defence", "Prediction", "Backend", "Provider", "OnInvalid", "InferenceError", "default_model", "list_models"]
