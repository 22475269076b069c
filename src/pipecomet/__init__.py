"""
pipecomet: an event-driven HTTP server framework on Twisted for API gateways.

A request runs through a chain of small stateless pipes; a chain can answer
at once, move blocking work onto a quota thread pool, send CPU-heavy work to
worker processes, stream the results of parallel branches, or wait for
events and push them to the client.

This module exports what an app author uses.  Beside it:
:mod:`pipecomet.config` (the configuration tables and the hook to add one),
:mod:`pipecomet.errors` (every error an app may raise or see),
:mod:`pipecomet.interfaces` (the seams, as zope interfaces),
:mod:`pipecomet.testing` (an in-memory client and test doubles),
:mod:`pipecomet.backend` (the backend client) and :mod:`pipecomet.client`
(a comet consumer).  Everything else is private and may change.
"""

from ._app import App
from ._backend import call, proxy
from ._chain import (
    Answer,
    Chain,
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
    BadRequest,
    Forbidden,
    GatewayTimeout,
    NotFound,
    PipecometError,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
)
from ._events import Condition
from ._lazy import UploadedFile
from ._observe import trace_headers
from ._workers import worker_function

__version__ = "0.1.0"

__all__ = [
    "Answer",
    "App",
    "BadRequest",
    "Chain",
    "Condition",
    "Config",
    "ConfigError",
    "Forbidden",
    "GatewayTimeout",
    "NotFound",
    "Parallel",
    "Pipe",
    "PipeContext",
    "PipeInput",
    "PipeResult",
    "PipecometError",
    "ServiceUnavailable",
    "SkipRest",
    "TooManyRequests",
    "Unauthorized",
    "UploadedFile",
    "call",
    "load_config",
    "pipe",
    "process_pipe",
    "proxy",
    "trace_headers",
    "worker_function",
]
