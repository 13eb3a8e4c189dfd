"""dafar: ship DAFAR (Defending against Adversaries by Feedback-Autoencoder Reconstruction) to edge devices.

The pipeline, stage by stage (each reads the previous stage's files from a run folder through its
manifest, and each has one entry function):

* :func:`dafar.train.train`: train E, F, D (and C), calibrate alpha, write the run folder;
* :func:`dafar.export.export`: the whole defence as one ONNX / TFLite graph, checked against torch;
* :func:`dafar.quantize.quantize`: int8 graphs that keep the detector's decisions;
* :func:`dafar.bench.bench`, :func:`dafar.bench.evaluate`, :func:`dafar.bench.check_reliability`:
  cost and latency, the adversarial evaluation, robustness of the shipped pieces;
* :func:`dafar.pipeline`: the main job (train, export, quantize, bench, reports) in one call.

:mod:`dafar.runtime` is what ships to a device (numpy plus one backend).  The core modules
(``schema``, ``run``, ``manifest``, ``data``, ``threshold``, ``options``, ``errors``) import only
the standard library and numpy, so the CLI and the runtime work on a Raspberry Pi without torch.
"""
from dafar.version import __version__

__all__ = ["pipeline", "__version__"]


def __getattr__(name: str):
    # the main job pulls every stage: imported on first use, never by `import dafar`
    if name == "pipeline":
        from dafar.workflow import pipeline

        return pipeline
    raise AttributeError(f"module 'dafar' has no attribute {name!r}")
