"""Errors with an HTTP status (request problems) and exit codes (startup problems).

The exit codes are every workload's (kiln_artifacts.contract.ExitCode; docs/server.md "Exit codes"): 0 after a
clean shutdown, 2 for a bad flag or variable, the server's own startup failures ARTIFACT, CONTRACT, RUNTIME
and PORT (10-13), and UNTRUSTED (14) for an artifact that --trusted-keys do not vouch for.
"""

from __future__ import annotations

from kiln_artifacts.contract import ExitCode, WorkloadError


class StartupError(WorkloadError):
    """The server cannot serve this model; the message is one line naming the input and the rule."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code


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
