"""Errors that speak to users.

Everything bnpass raises on purpose derives from :class:`BnpassError`; the CLI prints its
message as one line ``error: ...`` and exits non-zero. Anything else is a bug and keeps its
traceback.
"""


class BnpassError(Exception):
    """A problem with the user's input or environment, described in one line."""


class ModelError(BnpassError):
    """The ONNX model cannot be read, is invalid, or cannot be processed."""


class DataError(BnpassError):
    """Calibration data is missing, unreadable, or does not fit the model."""


class RuntimeUnavailableError(BnpassError):
    """The requested onnxruntime execution provider cannot be used."""
