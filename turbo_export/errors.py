"""The one error type for user mistakes; the CLI prints its message on one line and exits with 2."""


class TurboExportError(ValueError):
    """Bad input from the user: a wrong argument, an unsupported model, an unreadable file."""


class ParityError(RuntimeError):
    """An exported graph disagrees with its PyTorch model beyond the tolerance."""
