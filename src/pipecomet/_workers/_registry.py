"""
Functions the workers may run, registered by name in the module the
workers import (``[workers] module``).
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["worker_function", "registered", "REGISTRY"]

#: name → function, filled when the workers module is imported.
REGISTRY: dict[str, Callable[[Any], Any]] = {}


def worker_function(func: Callable[[Any], Any] | None = None, *, name: str = "") -> Any:
    """
    Register ``func(payload) -> value`` to be run in worker processes under
    ``name`` (the function's own name by default).  Usable bare or as
    ``@worker_function(name="resize")``.
    """

    def register(f: Callable[[Any], Any]) -> Callable[[Any], Any]:
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


def registered() -> dict[str, Callable[[Any], Any]]:
    return dict(REGISTRY)
