"""
The demo gateway's open-API steps, each a pipe: app-key authentication,
per-app rate limit (token bucket, 429 + Retry-After), parameter validation,
routing by API name, and the response format (``format=json|xml``).

Routes: ``GET /api/time.get``, ``GET|POST /api/echo``, ``GET /api/search``
(three branches of different latencies, streamed as NDJSON or SSE).
"""

from __future__ import annotations

import time
import weakref
from typing import Callable, Mapping
from xml.sax.saxutils import escape

from twisted.internet.defer import Deferred

from pipecomet import (
    Answer,
    App,
    BadRequest,
    Forbidden,
    Parallel,
    Pipe,
    PipeContext,
    PipeInput,
    PipeResult,
    TooManyRequests,
    Unauthorized,
)

from ._config import AppKey
from ._json import dumps

__all__ = ["install_routes", "auth_pipes", "TokenBucket", "RateLimiter"]


class TokenBucket:
    """
    ``rate`` tokens a second, at most ``capacity`` saved up.
    """

    __slots__ = ("rate", "capacity", "tokens", "stamp")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.stamp = now

    def take(self, now: float) -> float:
        """
        Take one token; 0 when granted, else seconds until one is there.
        """
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RateLimiter:
    """
    One token bucket per app key, on the reactor's clock.

    :param keys: gives the configured keys (read when a key is first seen,
        so the limiter can be made before the app is configured).
    :param clock: the reactor's ``seconds``.
    """

    def __init__(self, keys: Callable[[], Mapping[str, AppKey]], clock: Callable[[], float]) -> None:
        self._keys = keys
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, key: str) -> None:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            spec = self._keys()[key]
            bucket = self._buckets[key] = TokenBucket(spec.rate, spec.capacity, now)
        wait = bucket.take(now)
        if wait:
            raise TooManyRequests(f"rate limit of app key {key!r} exceeded",
                                  retry_after=wait, details={"retry_after": round(wait, 3)})


# -- the steps ---------------------------------------------------------------


def _keys(ctx: PipeContext) -> Mapping[str, AppKey]:
    keys: Mapping[str, AppKey] = ctx.runtime.config.demo.keys
    return keys


def app_key(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> str:
    """
    Authenticate by ``app_key`` (query, or header ``X-App-Key``).
    """
    key = inp.query.get("app_key") or inp.header("x-app-key")
    if not key:
        raise Unauthorized("app_key is required", code="missing_app_key")
    if key not in _keys(ctx):
        raise Forbidden("unknown app_key", code="invalid_app_key")
    return key


_FORMATS = ("json", "xml")


def validate(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> dict[str, object]:
    """
    Check the common parameters: ``format`` and (for time.get) ``tz``.
    """
    q = inp.query
    fmt = q.get("format", "json")
    if fmt not in _FORMATS:
        raise BadRequest(f"format must be one of {', '.join(_FORMATS)}", code="invalid_parameter",
                         details={"param": "format"})
    tz = q.get("tz", "0")
    try:
        offset = int(tz)
    except ValueError:
        raise BadRequest("tz must be an hour offset from UTC, e.g. 9 or -5",
                         code="invalid_parameter", details={"param": "tz"}) from None
    if not -12 <= offset <= 14:
        raise BadRequest("tz must be between -12 and 14", code="invalid_parameter",
                         details={"param": "tz"})
    return {"format": fmt, "tz": offset}


def _api_time(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> dict[str, object]:
    now = ctx.runtime.reactor.seconds()
    offset = res["validate"]["tz"]
    local = time.gmtime(now + offset * 3600)
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", local) + (f"{offset:+03d}:00" if offset else "Z"),
        "epoch": round(now, 3),
    }


_APIS: dict[str, Callable[[PipeInput, PipeContext, PipeResult], object]] = {"time.get": _api_time}


def route_api(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> object:
    """
    Routing: the API name from the path picks the backend step.
    """
    api = inp.path_params.get("api") or inp.path.rsplit("/", 1)[-1]
    handler = _APIS.get(api)
    if handler is None:
        raise BadRequest(f"unknown api {api!r}", code="unknown_api")
    return handler(inp, ctx, res)


def to_xml(value: object, tag: str = "response") -> str:
    """
    A small, predictable JSON-to-XML mapping for the ``format=xml`` answer.
    """
    if isinstance(value, dict):
        inner = "".join(to_xml(v, str(k)) for k, v in value.items())
    elif isinstance(value, list):
        inner = "".join(to_xml(v, "item") for v in value)
    elif value is None:
        inner = ""
    else:
        inner = escape(str(value))
    return f"<{tag}>{inner}</{tag}>"


def render(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> Answer:
    """
    The response format step: JSON or XML by ``format=``.
    """
    value = res.last
    if res["validate"]["format"] == "xml":
        return Answer('<?xml version="1.0" encoding="UTF-8"?>' + to_xml(value),
                      content_type="application/xml; charset=utf-8")
    return Answer(dumps(value), content_type="application/json")


# -- echo --------------------------------------------------------------------


def echo(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> Deferred:
    """
    Query and body parameters echoed back (the body is parsed as it arrives
    when the lazy parser is on).
    """
    query = inp.query_all
    d = inp.form()

    def done(form: Mapping[str, object]) -> dict[str, object]:
        return {"method": inp.method, "query": query, "form": form}

    return d.addCallback(done)


# -- search: parallel branches ------------------------------------------------


def _delayed(name: str, delay: float, make: Callable[[str], object]) -> Pipe:
    def branch(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> Deferred:
        q = res["search_query"]
        d: Deferred = Deferred(lambda d: call.cancel())
        call = ctx.runtime.reactor.callLater(delay, lambda: d.callback(make(q)))
        return d

    return Pipe(branch, name=name)


def search_query(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> str:
    q = inp.query.get("q", "").strip()
    if not q:
        raise BadRequest("q is required", code="missing_parameter", details={"param": "q"})
    if len(q) > 200:
        raise BadRequest("q is longer than 200 characters", code="invalid_parameter",
                         details={"param": "q"})
    return q


def search_summary(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> dict[str, object]:
    return {"query": res["search_query"], "branches": ["web", "news", "images"]}


#: Branch latencies of /api/search, seconds.
SEARCH_LATENCIES = {"web": 0.05, "news": 0.4, "images": 1.2}


_LIMITERS: "weakref.WeakKeyDictionary[App, RateLimiter]" = weakref.WeakKeyDictionary()


def auth_pipes(app: App) -> list[Pipe]:
    """
    The steps every ``/api/*`` route of the demo starts with: the app key
    (``app_key`` in the query or ``X-App-Key``), then its rate limit.  One
    limiter per app, so a key's budget is shared by all its routes.
    """
    limiter = _LIMITERS.get(app)
    if limiter is None:
        limiter = _LIMITERS[app] = RateLimiter(lambda: app.config.demo.keys,
                                               lambda: app.reactor.seconds())

    def rate_limit(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> bool:
        limiter.check(res["app_key"])
        return True

    return [Pipe(app_key), Pipe(rate_limit)]


def install_routes(app: App) -> None:
    auth = auth_pipes(app)
    app.route("/api/<api>", [*auth, Pipe(validate), Pipe(route_api, name="api"), Pipe(render)])
    app.route("/api/echo", [*auth, Pipe(echo)], methods=("GET", "POST"))
    app.route(
        "/api/search",
        [
            *auth,
            Pipe(search_query),
            Parallel(
                [
                    _delayed("web", SEARCH_LATENCIES["web"],
                             lambda q: [f"{q} — result {i}" for i in range(3)]),
                    _delayed("news", SEARCH_LATENCIES["news"], lambda q: [f"news about {q}"]),
                    _delayed("images", SEARCH_LATENCIES["images"],
                             lambda q: [f"https://img.example/{q}/{i}.png" for i in range(2)]),
                ],
                timeout=5.0,
            ),
            Pipe(search_summary),
        ],
    )
