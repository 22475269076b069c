"""
The demo's blocking routes: isolation on the quota thread pool, live.

``GET /api/slow.get`` calls a backend that blocks its thread for about two
seconds (category ``slow``: a small limit and queue in ``demo.toml``, so a
flood of 100+ concurrent calls gets 503 ``queue_full``); ``GET /api/fast.get``
does about a millisecond of blocking work (category ``fast``, with threads
reserved for it).  While ``slow`` is flooded, ``fast`` keeps answering;
``GET /_pipecomet/status`` shows both categories' figures.

Both authenticate the app key first, like every ``/api/*`` route.
Both chains show the async mode: an inline pipe on the reactor, the
blocking pipes as one pool job, then an inline pipe back on the reactor.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from pipecomet import App, BadRequest, Pipe, PipeContext, PipeInput, PipeResult
from ._gateway import auth_pipes

__all__ = ["install_routes", "SLOW_SECONDS", "FAST_SECONDS"]

#: How long the demo's slow backend blocks a thread.
SLOW_SECONDS = 2.0
#: How long the fast route blocks a thread.
FAST_SECONDS = 0.001


def _received(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> float | None:
    # ``?ms=`` lets a curl user try other backend latencies, bounded so the
    # demo cannot be told to hold a thread for long.
    raw = inp.query.get("ms")
    if raw is None:
        return None
    try:
        ms = float(raw)
    except ValueError:
        raise BadRequest("ms must be a number of milliseconds", code="invalid_parameter",
                         details={"param": "ms"}) from None
    if not 0 <= ms <= 10_000:
        raise BadRequest("ms must be between 0 and 10000", code="invalid_parameter",
                         details={"param": "ms"})
    return ms / 1000.0


def _blocking_backend(default: float) -> Callable[[PipeInput, PipeContext, PipeResult],
                                                  dict[str, object]]:
    def call_backend(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> dict[str, object]:
        seconds = res["received"] if res["received"] is not None else default
        started = time.monotonic()
        time.sleep(seconds)  # stands for a blocking client call
        return {"blocked_ms": round((time.monotonic() - started) * 1000, 3),
                "thread": threading.current_thread().name}

    return call_backend


def _shape(category: str) -> Callable[[PipeInput, PipeContext, PipeResult], dict[str, object]]:
    def respond(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> dict[str, object]:
        return {"category": category, **res["backend"],
                "answered_on": threading.current_thread().name}

    return respond


def install_routes(app: App) -> None:
    for path, category, seconds in (("/api/slow.get", "slow", SLOW_SECONDS),
                                    ("/api/fast.get", "fast", FAST_SECONDS)):
        app.route(path, [
            *auth_pipes(app),
            Pipe(_received, name="received"),
            Pipe(_blocking_backend(seconds), name="backend", run="thread", category=category),
            Pipe(_shape(category), name="respond"),
        ])
