"""The one base of every error prism-trt reports to its users.

A :class:`PrismError` is expected: bad input, a missing file, a build that does not match, a
peer that went away. Its message names the problem and what to do, so the CLI prints it without
a traceback and exits with :attr:`PrismError.exit_code`. Anything else that escapes is a bug and
keeps its traceback. Subclasses also derive from the builtin they refine (``ValueError``,
``RuntimeError``) so code that catches those keeps working.
"""

from __future__ import annotations


class PrismError(Exception):
    """An error with a message meant for the user."""

    exit_code = 1


class UsageError(PrismError, ValueError):
    """Arguments that do not fit together (a mode without its CR, a CR that was not built, ...)."""

    exit_code = 2


class MissingFileError(PrismError, FileNotFoundError):
    """A file the user named (checkpoint, data set, engine) is not there."""
