"""
CPU-heavy Python in a fixed pool of worker processes linked by shared
memory (DESIGN.md "Worker processes"; the bytes are in
``docs/worker-protocol.md``).
"""

from ._config import WorkersConfig
from ._errors import (
    WorkerCallError,
    WorkerCrashed,
    WorkerFunctionError,
    WorkersUnavailable,
    WorkerTimeout,
)
from ._pool import PoolState, WorkerPool, WorkerProtocol, WorkerState, install
from ._registry import worker_function

__all__ = [
    "WorkersConfig",
    "WorkerPool",
    "WorkerProtocol",
    "WorkerState",
    "PoolState",
    "install",
    "worker_function",
    "WorkerCallError",
    "WorkerCrashed",
    "WorkerFunctionError",
    "WorkersUnavailable",
    "WorkerTimeout",
]
