"""
The app the ``--processes`` tests and ``bench/scale.py`` serve: a hello
route, a CPU-bound route (about 1 ms of pure-Python work), the serving
process's pid, and comet subscriptions.  Each process counts the requests
it answered (``scale_app`` in its status), so the benchmark can tell how
the requests spread over the processes.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from pipecomet import App, Pipe
from pipecomet._events import Condition


#: Requests this process answered, by route.
ANSWERED: Counter[str] = Counter()


def _hello(inp: Any, ctx: Any, res: Any) -> Any:
    ANSWERED["hello"] += 1
    return {"hello": "world"}


def _cpu(inp: Any, ctx: Any, res: Any) -> Any:
    n = int(inp.query.get("n", "2500"))
    ANSWERED["cpu"] += 1
    total = 0
    for i in range(n):
        total += i * i % 7
    return {"total": total}


def _pid(inp: Any, ctx: Any, res: Any) -> Any:
    ANSWERED["pid"] += 1
    return {"pid": os.getpid()}


def make_app(config: Any = None, reactor: Any = None) -> App:
    app = App(reactor=reactor)
    app.route("/hello", [Pipe(_hello, name="hello")])
    app.route("/cpu", [Pipe(_cpu, name="cpu")])
    app.route("/pid", [Pipe(_pid, name="pid")])
    app.route("/comet/<topic>", [Condition(lambda i, c, r: i.path_params["topic"].split(","),
                                           mode="many")],
              responders=("sse", "json", "ndjson", "longpoll"))
    app.runtime.status_sources["scale_app"] = lambda: {"answered": dict(ANSWERED)}
    return app
