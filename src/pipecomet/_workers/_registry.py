"""
Functions the workers may run, registered by name in the module the
workers import (``[workers] module``).
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar, overload

__all__ = ["worker_function", "registered", "REGISTRY", "WorkerFunction"]

#: ``func(payload) -> value``.  Any: the payload is whatever the process
#: pipe computed, the value whatever the function gives the pipe after it.
WorkerFunction = Callable[[Any], Any]
_F = TypeVar("_F", bound=WorkerFunction)

#: name → function, filled when the workers module is imported.
REGISTRY: dict[str, WorkerFunction] = {}


@overload
def worker_function(func: _F, *, name: str = "") -> _F: ...


@overload
def worker_function(func: None = None, *, name: str = "") -> Callable[[_F], _F]: ...


def worker_function(func: _F | None = None, *, name: str = "") -> _F | Callable[[_F], _F]:
    """
    Register ``func(payload) -> value`` to be run in worker processes under
    ``name`` (the function's own name by default).  Usable bare or as
    ``@worker_function(name="resize")``.
    """

    def register(f: _F) -> _F:
        key = name or f.__name__
        other = REGISTRY.get(key)
        if other is not None and other is not f and (
                getattr(other, "__module__", None), getattr(other, "__qualname__", None)) != (
                getattr(f, "__module__", None), getattr(f, "__qualname__", None)):
            raise ValueError(f"worker function {key!r} registered twice "
                             f"({other.__module__}.{other.__qualname__} and {f.__module__}.{f.__qualname__})")
        REGISTRY[key] = f
        return f

    return register(func) if func is not None else register


def registered() -> dict[str, WorkerFunction]:
    return dict(REGISTRY)
