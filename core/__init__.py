"""dafar: ship DAFAR (Defending against Adversaries by Feedback-Autoencoder Reconstruction) to edge devices.

Subpackages: ``dafar.train`` (train the four subnetworks, calibrate the threshold),
``dafar.export``, ``dafar.quantize``, ``dafar.runtime`` (what ships to the device; numpy plus one
backend) and ``dafar.bench``.  Core modules here (``data``, ``manifest``, ``threshold``,
``errors``) import only the standard library and numpy, so the CLI and the runtime work on a
Raspberry Pi without torch.
"""
__version__ = "0.1.0"
