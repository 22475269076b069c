"""
Every error a pipecomet app may raise or see, with its HTTP status and
``code`` (``docs/errors.md`` lists them all).  The common ones are also
exported by :mod:`pipecomet`.
"""

from ._backend import (
    BackendBusy,
    BackendError,
    BackendQueueTimeout,
    BackendResponseTooLarge,
    BackendTimeout,
    NoBackend,
)
from ._errors import (
    BadGateway,
    BadRequest,
    Forbidden,
    GatewayTimeout,
    HeadersTooLarge,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    PipecometError,
    RequestTimeout,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
)
from ._quota import ExecutionTimeout, PoolClosing, QueueFull, QueueTimeout
from ._workers import (
    WorkerCallError,
    WorkerCrashed,
    WorkerFunctionError,
    WorkersUnavailable,
    WorkerTimeout,
)

__all__ = [
    "BackendBusy",
    "BackendError",
    "BackendQueueTimeout",
    "BackendResponseTooLarge",
    "BackendTimeout",
    "BadGateway",
    "BadRequest",
    "ExecutionTimeout",
    "Forbidden",
    "GatewayTimeout",
    "HeadersTooLarge",
    "InternalError",
    "MethodNotAllowed",
    "NoBackend",
    "NotFound",
    "PayloadTooLarge",
    "PipecometError",
    "PoolClosing",
    "QueueFull",
    "QueueTimeout",
    "RequestTimeout",
    "ServiceUnavailable",
    "TooManyRequests",
    "Unauthorized",
    "WorkerCallError",
    "WorkerCrashed",
    "WorkerFunctionError",
    "WorkersUnavailable",
    "WorkerTimeout",
]
