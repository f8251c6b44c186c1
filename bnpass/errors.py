"""Errors that speak to users.

Everything bnpass raises on purpose derives from :class:`BnpassError`; the CLI prints its
message as one line ``error: ...`` and exits non-zero. Anything else is a bug and keeps its
traceback.
"""


INTERRUPTED = "error: interrupted; no output written"  # what Ctrl-C prints, at any moment (exit 130)


class BnpassError(Exception):
    """A problem with the user's input or environment, described in one line."""


class ModelError(BnpassError):
    """The ONNX model cannot be read, is invalid, or cannot be processed."""


class DataError(BnpassError):
    """Calibration data is missing, unreadable, or does not fit the model."""


class SessionError(ModelError):
    """onnxruntime refused to load or to run a model: ``node`` names the node where its message names
    one (else None), ``detail`` is what onnxruntime said, cleaned to one line."""

    def __init__(self, message: str, node=None, detail: str = ""):
        super().__init__(message)
        self.node = node
        self.detail = detail


class UsageError(BnpassError):
    """The command line asks for options that do not go together (the CLI exits 2, as argparse does)."""


class RuntimeUnavailableError(BnpassError):
    """The requested onnxruntime execution provider cannot be used: ``device`` was asked for, and
    ``reason`` says why it cannot run (the CLI names its own flag, the API its argument)."""

    def __init__(self, device: str, reason: str):
        super().__init__(f"device={device!r}: {reason}")
        self.device = device
        self.reason = reason
