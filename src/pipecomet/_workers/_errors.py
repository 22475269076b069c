"""
How a worker call fails, as the client sees it (DESIGN.md "HTTP error
mapping"): crash 502, timeout 504, queue full or pool closing 503, an
exception in the function 500 with an error id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, TypedDict, Unpack

from .._errors import (
    BadGateway,
    GatewayTimeout,
    InternalError,
    PipecometError,
    ServiceUnavailable,
)

if TYPE_CHECKING:
    from .._json import JSON

__all__ = [
    "WorkerCrashed",
    "WorkerTimeout",
    "WorkersUnavailable",
    "WorkerFunctionError",
    "WorkerCallError",
]


class WorkerCrashed(BadGateway):
    """
    The worker running the call died; the message names the cause.
    """

    code = "worker_crashed"


class WorkerTimeout(GatewayTimeout):
    """
    The call ran past its timeout; its worker was killed and replaced.
    """

    code = "worker_timeout"


class WorkersUnavailable(ServiceUnavailable):
    """
    The queue is full, the call waited too long, the pool is closing, or
    every worker is down (codes ``queue_full``, ``queue_timeout``,
    ``pool_closing``, ``workers_down``).
    """

    code = "workers_unavailable"


class WorkerFunctionError(InternalError):
    """
    The worker function raised.  The client sees only the error id; the
    server log has the type, message and the worker's traceback under it.

    :ivar exc_type: the exception's qualified type name.
    :ivar exc_message: its message.
    :ivar remote_traceback: the traceback formatted in the worker.
    """

    def __init__(self, function: str, exc_type: str, exc_message: str, remote_traceback: str) -> None:
        super().__init__()
        self.function = function
        self.exc_type = exc_type
        self.exc_message = exc_message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return f"worker function {self.function!r} raised {self.exc_type}: {self.exc_message}"


class _CallErrorOptions(TypedDict, total=False):
    status: int | None
    headers: Mapping[str, str] | None
    details: Mapping[str, JSON] | None


class WorkerCallError(PipecometError, TypeError):
    """
    The call cannot be made as asked: its argument or result cannot be
    pickled (codes ``unpicklable_argument``, ``unpicklable_result``), or no
    worker function has that name (``unknown_function``).  A programming
    error, answered 500 with a message that says what to fix.
    """

    status = 500
    code = "worker_call_error"

    def __init__(self, message: str, *, code: str, **kw: Unpack[_CallErrorOptions]) -> None:
        PipecometError.__init__(self, message, code=code, **kw)
