"""dafar.runtime: the thin on-device runtime (numpy plus one backend: ai-edge-litert or onnxruntime).

Importing this package never loads torch or tensorflow, and not even the backend: that is
imported when a :class:`Defence` (or a runner of :mod:`dafar.runtime.backends`) is constructed
(a test checks it in a fresh interpreter).  It imports only dafar's core modules.
"""
from .backends import Backend, ModelRunner, Provider, open_model
from .core import Defence, InferenceError, OnInvalid, Prediction, default_model, list_models

__all__ = ["Defence", "Prediction", "Backend", "Provider", "OnInvalid", "InferenceError", "default_model", "list_models",
           "ModelRunner", "open_model"]
