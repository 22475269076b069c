"""
What a backend call can fail with, in pipecomet's one error shape.

A client sees the service's name, never an endpoint's address (that goes to
the log).  A backend's own 4xx/5xx answer is not an error here: it is a
:class:`~pipecomet._backend._service.Response` returned to the pipe.
"""

from __future__ import annotations

from typing import Unpack

from .._errors import BadGateway, ErrorOptions, GatewayTimeout, RetryOptions, ServiceUnavailable

__all__ = [
    "BackendError",
    "BackendResponseTooLarge",
    "BackendTimeout",
    "BackendBusy",
    "BackendQueueTimeout",
    "NoBackend",
    "UnknownBackend",
    "ConnectionFailed",
]


class BackendError(BadGateway):
    """
    502: the backend refused the connection, reset it, or answered
    something that is not HTTP.
    """

    code = "backend_error"

    def __init__(self, service: str, message: str = "", **kw: Unpack[ErrorOptions]) -> None:
        kw.setdefault("details", {"service": service})
        super().__init__(message or f"backend service {service!r} failed", **kw)
        self.service = service


class BackendResponseTooLarge(BackendError):
    """
    502: the backend's body is larger than ``max_response_bytes``.
    """

    code = "backend_response_too_large"


class BackendTimeout(GatewayTimeout):
    """
    504: the call's deadline passed before the backend answered.
    """

    code = "backend_timeout"

    def __init__(self, service: str, timeout: float, **kw: Unpack[ErrorOptions]) -> None:
        kw.setdefault("details", {"service": service})
        super().__init__(f"backend service {service!r} did not answer within {timeout:g}s", **kw)
        self.service = service


class BackendBusy(ServiceUnavailable):
    """
    503: every connection of the chosen endpoint is busy and its wait queue
    is full.
    """

    code = "backend_busy"

    def __init__(self, service: str, message: str = "", **kw: Unpack[RetryOptions]) -> None:
        kw.setdefault("details", {"service": service})
        super().__init__(message or f"backend service {service!r} is busy", **kw)
        self.service = service


class BackendQueueTimeout(BackendBusy):
    """
    503: a call waited for a connection longer than ``queue_timeout``.
    """

    code = "backend_queue_timeout"


class NoBackend(ServiceUnavailable):
    """
    503: discovery knows no endpoint of the service (or every one is gone).
    """

    code = "no_backend"

    def __init__(self, service: str, **kw: Unpack[RetryOptions]) -> None:
        kw.setdefault("details", {"service": service})
        super().__init__(f"no endpoint of backend service {service!r} is available", **kw)
        self.service = service


class UnknownBackend(LookupError):
    """
    A pipe asked for a service that is not declared in ``[backends]``.
    """


class ConnectionFailed(Exception):
    """
    Internal: one attempt on one endpoint failed at the connection level.

    :ivar reason: short text for the log (refused, reset, protocol error...).
    :ivar answered: True once any byte of the response arrived (the call
        must not be replayed then).
    :ivar reused: the attempt ran on a kept-alive connection.
    :ivar sent: some of the request reached the socket.
    """

    def __init__(self, reason: str, *, answered: bool = False, reused: bool = False,
                 sent: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.answered = answered
        self.reused = reused
        self.sent = sent
