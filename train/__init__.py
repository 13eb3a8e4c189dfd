"""dafar.train: the four DAFAR subnetworks, joint training, threshold calibration, run folders
(:func:`train`; :func:`attach` puts the decoder on an already trained classifier), and the gray-box attacks on the trained victim (:mod:`dafar.train.attacks`).

Training needs the ``[train]`` extra (torch, safetensors, tqdm, matplotlib).  The configuration
(:class:`TrainConfig`) imports without it, so the command line can describe its options on a
device; :func:`train` raises an ImportError naming the extra when torch is missing.
"""
from dafar.errors import require as _require

from .config import TrainConfig

__all__ = ["train", "attach", "TrainConfig", "TrainResult"]


def __getattr__(name: str):
    # torch is imported on first use of the stage, not by `import dafar.train`
    if name in ("train", "attach", "TrainResult"):
        _require("torch", "train", "training")
        from . import trainer

        globals()[name] = value = getattr(trainer, name)
        return value
    raise AttributeError(f"module 'dafar.train' has no attribute {name!r}")
