"""dafar.train: the four DAFAR subnetworks, joint training, threshold calibration, run folders.

Needs the ``[train]`` extra (torch, safetensors, tqdm, matplotlib).  Import the submodules
(``dafar.train.models``, ``dafar.train.trainer``) directly; this package imports nothing heavy.
"""
from dafar.errors import require as _require

_require("torch", "train", "training")
