"""Typed errors of the dafar package.

Every public entry point raises a subclass of :class:`DafarError` (or ``ValueError``/``TypeError``
subclasses for bad arguments), with a message that names the file, option or epoch at fault.
The CLI maps them to exit codes, so scripts can tell a user error from a bug.
"""
from __future__ import annotations


class DafarError(Exception):
    """Base class of all errors raised on purpose by dafar."""

    exit_code = 1


class ConfigError(DafarError, ValueError):
    """A configuration value is out of range or inconsistent."""

    exit_code = 2


class DataError(DafarError):
    """A data set is missing, truncated, corrupt or of the wrong shape."""

    exit_code = 3


class DataNotFoundError(DataError, FileNotFoundError):
    """Data files are missing and could not be downloaded."""


class DataCorruptError(DataError):
    """A data file exists but its content is wrong (magic, shape, hash, decode)."""


class RunFolderError(DafarError):
    """A run folder is missing, incomplete or inconsistent with its manifest."""

    exit_code = 4


class ManifestError(RunFolderError):
    """The manifest is missing, unreadable, edited or lacks a field."""


class HashMismatchError(ManifestError):
    """A file's sha256 differs from the one the manifest recorded."""


class WeightsError(RunFolderError):
    """A weights file does not match the architecture the manifest describes."""


class TrainingError(DafarError):
    """Training could not continue (non-finite loss, resume mismatch)."""

    exit_code = 5


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class ExportError(DafarError):
    """An export or conversion step failed (unsupported op, converter error)."""

    exit_code = 7


class UnsupportedOpError(ExportError):
    """A converted model holds ops a stock interpreter cannot run (Flex/custom ops)."""


class ExportValidationError(ExportError):
    """An exported model's outputs differ from the source model's beyond the stated tolerance."""


class OutputShapeError(ExportValidationError):
    """An exported model's outputs have the wrong names, shapes or dtypes."""


class ToleranceError(ExportValidationError):
    """A continuous output (score, logits) differs beyond its tolerance."""


class DecisionMismatchError(ExportValidationError):
    """Labels or reject decisions agree with the source model on too few inputs."""


class InferenceError(DafarError):
    """A backend failed to load or run a model; no result (and so no acceptance) is returned."""

    exit_code = 8


class QuantizationError(ExportError):
    """An int8 model failed its checks (label agreement, accuracy change, decision agreement)."""


class InputValidationError(DafarError, ValueError):
    """An input array has the wrong shape, dtype or range, or holds non-finite values."""

    exit_code = 2


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the pip extra to install."""


def require_available(module: str, extra: str, purpose: str = "") -> None:
    """Check that ``module`` is installed without importing it (for heavy modules used in a child
    process); raise :class:`MissingExtraError` naming the extra otherwise."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        what = f" for {purpose}" if purpose else ""
        raise MissingExtraError(f"'{module}' is needed{what} but is not installed: pip install 'dafar[{extra}]'")


def require(module: str, extra: str, purpose: str = ""):
    """Import ``module`` or raise :class:`MissingExtraError` naming ``pip install 'dafar[extra]'``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised by the no-extra test via a fake name
        what = f" for {purpose}" if purpose else ""
        raise MissingExtraError(
            f"'{module}' is needed{what} but is not installed: pip install 'dafar[{extra}]'"
        ) from exc
