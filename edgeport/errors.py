"""The exceptions edgeport raises on purpose.

The CLI maps them to exit codes: `UserError` (and its subclasses) to 2, `CheckFailed` to 1.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import math
import re


class EdgeportError(Exception):
    """Base class of every error edgeport raises deliberately."""


class UserError(EdgeportError):
    """Bad input: a missing or corrupt file, a wrong shape, an unknown name. Exit code 2."""


class EverythingLeftFloat(UserError):
    """A quantization config that leaves every layer of the model float (its float conv
    thresholds take them all): nothing would be quantized."""


class ExportError(UserError):
    """A model that no exporter path could turn into an artifact; names the op and module path."""


class BackendUnavailable(EdgeportError):
    """A backend that cannot run on this machine; `reason` says why, `remedy` what would fix it."""

    def __init__(self, backend: str, reason: str, remedy: str = ""):
        self.backend, self.reason, self.remedy = backend, reason, remedy
        message = f"{backend} is unavailable here: {reason}"
        super().__init__(message + (f" ({remedy})" if remedy else ""))


class CheckFailed(EdgeportError):
    """A check ran and failed (parity, validity). Exit code 1. `report` is the failed check's
    report; `results`, for an export of several targets, what was committed nonetheless."""

    def __init__(self, message: str, report=None, results=None):
        super().__init__(message)
        self.report, self.results = report, results


class EdgeportWarning(UserWarning):
    """Something the user asked for that will not do what they may expect (W4A4 for TensorRT);
    the CLI prints it as one `warning:` line on stderr."""


ENVIRONMENT_PROBLEMS: list[str] = []  # malformed settings read at import; the CLI refuses to run with them


def finite_at_least(value: object, least: float, strictly: bool = False) -> bool:
    """Whether `value` is a finite real number (not a bool) above `least`, or equal to it unless
    `strictly`: the check of a figure a user or a file gives, where NaN compares False both ways
    and would slip past `value < least`."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (value > least or (value == least and not strictly)))


def first_line(error: BaseException) -> str:
    """An exception's message as one line for a user: its first line, colour codes removed (torch
    bolds some messages), at most 200 characters; its type where it has no message."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


def byte_size(count: float) -> str:
    """`count` bytes in the largest binary unit it reaches ("256 bytes", "1.5 GiB")."""
    for unit, power in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 2 ** power:
            return f"{count / 2 ** power:.3g} {unit}"
    return f"{int(count)} bytes"


def limit_from_environment(name: str, default: int) -> int:
    """A positive integer limit from the environment variable `name`, else `default`. A
    malformed or non-positive value is recorded in `ENVIRONMENT_PROBLEMS`, which the CLI
    refuses to run with (one line, exit 2), and the default applies meanwhile: limits are read
    at import, before any handler could turn an exception into one clear line."""
    import os

    value = os.environ.get(name)
    if value is None:
        return default
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit > 0:
        return limit
    ENVIRONMENT_PROBLEMS.append(f"the environment variable {name}={value!r} is not a positive integer "
                                f"(unset it, or give a limit)")
    return default
