"""Errors the library raises. Each message says what went wrong and what to do about it.

Exit codes (the CLI maps these): 0 ok, 1 user error (EdgeqError), 2 usage (click),
3 device/runtime failure (DeviceError).
"""


class EdgeqError(Exception):
    """A user-facing error: bad input, bad option, missing file. Exit code 1."""

    exit_code = 1


class ModelFormatError(EdgeqError):
    """The model file is missing, corrupt, or not a format edgeq reads."""


class CalibrationError(EdgeqError):
    """The calibration data does not fit the model (shape, dtype, NaN, empty)."""


class ProfileError(EdgeqError):
    """A device profile is invalid or unknown."""


class OutputExistsError(EdgeqError):
    """Refusing to overwrite an existing file (or the input)."""


class QuantizationError(EdgeqError):
    """The produced model does not meet what was asked (--strict, budget, plan mismatch)."""


class DiskFullError(EdgeqError):
    """This host's disk (or quota) has no room for an output. Exit code 1."""


class IncompatibleModelError(EdgeqError):
    """The model uses ops or op versions the target runtime cannot run."""


class DeviceError(EdgeqError):
    """The device or its runtime failed (connection, crash, timeout). Exit code 3."""

    exit_code = 3


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (libraries embed long logs), or its type."""
    for line in str(e).splitlines():
        line = line.strip()
        if line:  # cut at a word, marked, not mid-word ("... results are pas")
            return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + " ..."
    return type(e).__name__
