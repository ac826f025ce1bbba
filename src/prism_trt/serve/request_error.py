"""The one error a request handler raises to refuse a request."""

from __future__ import annotations


class RequestError(Exception):
    """A request the server refuses. ``reason`` is a short fixed slug for the error metric."""

    def __init__(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message
        self.headers = headers or {}
