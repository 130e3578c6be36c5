"""Errors with an HTTP status (request problems) and exit codes (startup problems)."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """The process exit codes (images/server/README.md "Exit codes")."""

    OK = 0  # served, then shut down cleanly (SIGTERM/SIGINT)
    UNEXPECTED = 1  # a bug: traceback in the log
    USAGE = 2  # bad flag or environment variable
    ARTIFACT = 3  # the artifact cannot be read or fails verification (missing, corrupted, wrong digest)
    CONTRACT = 4  # the artifact is not a servable model (format, task, kiln-model.json, graph inputs/outputs)
    RUNTIME = 5  # ONNX Runtime could not create the session or the warm-up failed
    PORT = 6  # a port could not be bound


class StartupError(Exception):
    """The server cannot serve this model; the message is one line naming the input and the rule."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RequestError(Exception):
    """A request the server answers with ``status`` and ``{"error": message}``."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BadRequest(RequestError):
    status = 400


class Overloaded(RequestError):
    """The queue is full: 429 with Retry-After, answered at once."""

    status = 429


class DeadlineExceeded(RequestError):
    status = 504


class Unavailable(RequestError):
    """Not ready, or shutting down: 503."""

    status = 503


class InferenceFailed(RequestError):
    """ONNX Runtime failed on inputs that passed validation: a server-side error (counted in inference errors)."""

    status = 500
