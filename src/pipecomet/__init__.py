"""
pipecomet: an event-driven HTTP server framework on Twisted for API gateways.

A request runs through a chain of small stateless pipes; a chain can answer
at once, move blocking work onto a quota thread pool, send CPU-heavy work to
worker processes, stream the results of parallel branches, or wait for
events and push them to the client.
"""

from ._app import App, PipecometResource, Route
from ._chain import (
    Answer,
    Chain,
    ChainRun,
    Parallel,
    Pipe,
    PipeContext,
    PipeInput,
    PipeResult,
    SkipRest,
    pipe,
    process_pipe,
)
from ._config import Config, ConfigError, load_config
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
from ._runtime import Runtime
from ._bus import MemoryBus
from ._comet import CometConfig, CometHub, Published, Subscription
from ._events import Condition, Event, EventKeeper, EventState
from ._interfaces import IBus, IBusReceiver
from ._quota import (
    CategoryConfig,
    ExecutionTimeout,
    PoolClosing,
    QueueFull,
    QueueTimeout,
    QuotaConfig,
    QuotaPool,
    SynchronousThreadPool,
)
from ._workers import (
    WorkerCallError,
    WorkerCrashed,
    WorkerFunctionError,
    WorkerPool,
    WorkersConfig,
    WorkersUnavailable,
    WorkerTimeout,
    worker_function,
)
from ._lazy import LazyBody, LazyRequest, LazySite, LimitsConfig, UploadedFile
from ._backend import (
    BackendBusy,
    BackendError,
    BackendQueueTimeout,
    BackendResponseTooLarge,
    Backends,
    BackendsConfig,
    BackendService,
    BackendTimeout,
    NoBackend,
    ServiceConfig,
    call,
    proxy,
)
from ._backend import Response as BackendResponse
from ._observe import LoggingConfig, MetricsConfig, MetricsResource, trace_headers

__version__ = "0.1.0"

__all__ = [
    "App",
    "Answer",
    "BadGateway",
    "BadRequest",
    "Chain",
    "ChainRun",
    "Config",
    "ConfigError",
    "Forbidden",
    "GatewayTimeout",
    "HeadersTooLarge",
    "InternalError",
    "MethodNotAllowed",
    "NotFound",
    "Parallel",
    "PayloadTooLarge",
    "Pipe",
    "PipeContext",
    "PipeInput",
    "PipeResult",
    "PipecometError",
    "PipecometResource",
    "RequestTimeout",
    "Route",
    "Runtime",
    "MemoryBus",
    "CometConfig",
    "CometHub",
    "Published",
    "Subscription",
    "Condition",
    "Event",
    "EventKeeper",
    "EventState",
    "IBus",
    "IBusReceiver",
    "CategoryConfig",
    "ExecutionTimeout",
    "PoolClosing",
    "QueueFull",
    "QueueTimeout",
    "QuotaConfig",
    "QuotaPool",
    "SynchronousThreadPool",
    "ServiceUnavailable",
    "SkipRest",
    "TooManyRequests",
    "Unauthorized",
    "load_config",
    "pipe",
    "process_pipe",
    "WorkerCallError",
    "WorkerCrashed",
    "WorkerFunctionError",
    "WorkerPool",
    "WorkersConfig",
    "WorkersUnavailable",
    "WorkerTimeout",
    "worker_function",
    "LazyBody",
    "LazyRequest",
    "LazySite",
    "LimitsConfig",
    "UploadedFile",
    "BackendBusy",
    "BackendError",
    "BackendQueueTimeout",
    "BackendResponse",
    "BackendResponseTooLarge",
    "Backends",
    "BackendsConfig",
    "BackendService",
    "BackendTimeout",
    "NoBackend",
    "ServiceConfig",
    "call",
    "proxy",
    "LoggingConfig",
    "MetricsConfig",
    "MetricsResource",
    "trace_headers",
]
