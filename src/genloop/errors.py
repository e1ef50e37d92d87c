"""Errors a user can cause and fix.

Anything raised as a :class:`GenloopError` is a user-facing condition: the CLI prints its
message as one line and exits with ``exit_code``; the server maps it to an HTTP status.
Everything else is a bug and shows a traceback under ``--debug``.
"""

from __future__ import annotations


class GenloopError(Exception):
    """A problem the user can fix; the message says what is wrong."""

    exit_code: int = 1
    http_status: int = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(GenloopError):
    """A config file or ``--set`` override is invalid."""

    exit_code = 2
    http_status = 422


class NotFoundError(GenloopError):
    """A named thing (model, version, alias, dataset, run) does not exist."""

    http_status = 404


class ConflictError(GenloopError):
    """The request contradicts the current state (a name already taken, say)."""

    http_status = 409


class IntegrityError(GenloopError):
    """A stored file does not match its manifest, or a manifest is missing."""

    http_status = 500


class UnsafePathError(GenloopError):
    """An identifier would make a path leave its root."""

    http_status = 400


class WorkspaceError(GenloopError):
    """The workspace is missing or unusable."""
