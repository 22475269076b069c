"""
The one error shape of pipecomet and the map from causes to HTTP statuses.

Every error a client sees is a :class:`PipecometError` (or was turned into
one): it carries the status, a stable machine-readable ``code``, a message
safe to show and extra headers such as ``Retry-After``.  Anything else that
escapes a pipe becomes a 500 whose body carries only an error id; the
details go to the log under the same id.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Mapping, TypedDict, Unpack

if TYPE_CHECKING:
    from twisted.web.http import Request
    from twisted.web.iweb import IRequest

    from ._json import JSON

__all__ = [
    "PipecometError",
    "BadRequest",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "MethodNotAllowed",
    "RequestTimeout",
    "PayloadTooLarge",
    "HeadersTooLarge",
    "TooManyRequests",
    "ServiceUnavailable",
    "BadGateway",
    "GatewayTimeout",
    "InternalError",
    "new_error_id",
    "error_body",
    "error_response",
]


def new_error_id() -> str:
    """
    A short random id that ties a client's error to the server's log line.
    """
    return os.urandom(8).hex()


class PipecometError(Exception):
    """
    An error with its HTTP status, a stable ``code`` and a client-safe message.

    :param message: shown to the client as is.
    :param code: machine-readable code; defaults to the class's ``code``.
    :param headers: extra response headers, e.g. ``{"Retry-After": "1"}``.
    :param details: extra JSON-serialisable fields put in the error object.
    """

    status: int = 500
    code: str = "internal_error"

    def __init__(
        self,
        message: str = "",
        *,
        code: str | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        details: Mapping[str, JSON] | None = None,
    ) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code.replace("_", " ")
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers: dict[str, str] = dict(headers or {})
        self.details: dict[str, JSON] = dict(details or {})
        self.error_id = new_error_id()

    def to_json(self) -> dict[str, JSON]:
        """
        The ``error`` object of the response body.
        """
        body: dict[str, JSON] = {
            "code": self.code,
            "message": self.message,
            "id": self.error_id,
        }
        body.update(self.details)
        return body

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.code!r}, {self.message!r})"


class BadRequest(PipecometError):
    status, code = 400, "bad_request"


class Unauthorized(PipecometError):
    status, code = 401, "unauthorized"


class Forbidden(PipecometError):
    status, code = 403, "forbidden"


class NotFound(PipecometError):
    status, code = 404, "not_found"


class MethodNotAllowed(PipecometError):
    status, code = 405, "method_not_allowed"


class RequestTimeout(PipecometError):
    status, code = 408, "request_timeout"


class PayloadTooLarge(PipecometError):
    status, code = 413, "payload_too_large"


class HeadersTooLarge(PipecometError):
    status, code = 431, "headers_too_large"


class ErrorOptions(TypedDict, total=False):
    """
    The keyword arguments of :class:`PipecometError`, as subclasses pass
    them on (``**kw: Unpack[ErrorOptions]``).
    """

    code: str | None
    status: int | None
    headers: Mapping[str, str] | None
    details: Mapping[str, JSON] | None


class RetryOptions(ErrorOptions, total=False):
    """
    :class:`ErrorOptions` and ``retry_after`` (a 503 or 429).
    """

    retry_after: float


class _RetryAfter(PipecometError):
    """
    An error that tells the client when to come back.
    """

    def __init__(self, message: str = "", *, retry_after: float = 1,
                 **kw: Unpack[ErrorOptions]) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after
        # HTTP wants whole seconds; never tell a client to retry "now".
        self.headers.setdefault("Retry-After", str(max(1, int(-(-retry_after // 1)))))


class TooManyRequests(_RetryAfter):
    status, code = 429, "rate_limited"


class ServiceUnavailable(_RetryAfter):
    status, code = 503, "unavailable"


class BadGateway(PipecometError):
    status, code = 502, "bad_gateway"


class GatewayTimeout(PipecometError):
    status, code = 504, "timeout"


class InternalError(PipecometError):
    status, code = 500, "internal_error"

    def __init__(self, error_id: str | None = None) -> None:
        super().__init__("internal error; quote the id when reporting it")
        if error_id is not None:
            self.error_id = error_id


def error_body(error: PipecometError) -> bytes:
    """
    The JSON body of an error response.
    """
    return json.dumps({"error": error.to_json()}, separators=(",", ":")).encode("utf-8")


def error_response(request: IRequest | Request, error: PipecometError) -> bytes:
    """
    Set the status and headers of ``error``'s response on ``request`` (a
    twisted.web request) and return its body: the one place an error
    response is written.  The caller writes the body and finishes the
    request, or returns it from ``render``.
    """
    body = error_body(error)
    request.setResponseCode(error.status)
    for k, v in error.headers.items():
        request.setHeader(k, v)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body
