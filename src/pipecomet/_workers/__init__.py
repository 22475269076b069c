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
from ._registry import worker_function

# The pool needs Twisted; a worker process imports this package without it
# (see ``_pool.BOOT``), so the pool's names load on first use.
_POOL_NAMES = ("PoolState", "WorkerPool", "WorkerProtocol", "WorkerState", "install")


def __getattr__(name: str) -> object:
    if name in _POOL_NAMES:
        from . import _pool

        return getattr(_pool, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
