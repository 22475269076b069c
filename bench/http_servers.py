"""
The servers `bench.http` measures, one per process:

``python -m bench.http_servers --kind KIND --port N`` (kinds: :data:`KINDS`)

Every kind answers ``GET /hello`` with the same 13-byte body ``{"msg":"hi!"}``
as ``application/json`` with a ``Content-Length`` (so HTTP/1.1 keep-alive
holds for all of them) and listens on 127.0.0.1 only.

- ``twisted``: a bare leaf ``twisted.web`` Resource returning constant bytes;
- ``klein``: a bare Klein app with one route returning constant bytes;
- ``pipecomet``: an :class:`pipecomet.App` route whose chain has five plain
  inline pipes doing real, small gateway work per request — app-key check,
  token-bucket rate check, parameter validation, routing to a handler, and
  formatting; the JSON responder encodes the handler's dict each time;
- ``pipecomet-1``: one inline pipe returning the handler's dict, served by
  pipecomet's own HTTP/1.1 protocol with the access log off;
- ``pipecomet-5``: the five-pipe chain, own protocol, access log off;
- ``pipecomet-5-twisted``: the five-pipe chain on twisted.web's channel
  (``[server] protocol = "twisted"``), access log off;
- ``tornado``: a bare Tornado ``RequestHandler``, an outside anchor;
- ``aiohttp``: a bare aiohttp ``web.Application`` on the plain asyncio loop
  with its access log off, the peer the issue 10 targets compare with.

The bare Twisted kinds and ``pipecomet`` use a default
``twisted.web.server.Site`` / ``App.site()``, so the access-log line each
request costs is paid by all of them; the ``pipecomet-*`` kinds turn it off
as aiohttp does.
The process prints ``ready`` once it listens and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

BODY = b'{"msg":"hi!"}'
assert len(BODY) == 13
CONTENT_TYPE = b"application/json"
PATH = "/hello"
#: The query the driver sends to every kind (only pipecomet's chain reads it).
QUERY = "app_key=bench-key&v=1"


def _twisted_site() -> Any:
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    class Hello(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            request.setHeader(b"content-type", CONTENT_TYPE)
            return BODY

    root = Resource()
    root.putChild(PATH.strip("/").encode(), Hello())
    return Site(root)


def _klein_site() -> Any:
    from klein import Klein
    from twisted.web.server import Site

    app = Klein()

    @app.route(PATH)
    def hello(request: Any) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE)
        return BODY

    return Site(app.resource())


class _Bucket:
    """
    A token bucket per app: ``rate`` tokens a second, at most ``burst``.
    """

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def take(self) -> float:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return -1.0
        self.tokens -= 1.0
        return self.tokens


def make_pipecomet_app() -> Any:
    """
    The measured pipecomet app: one route, a chain of five inline pipes.
    """
    from pipecomet import App, BadRequest, NotFound, Pipe, TooManyRequests, Unauthorized

    apps = {"bench-key": {"app": "bench", "rate": 1e9}}
    buckets = {k: _Bucket(v["rate"], v["rate"]) for k, v in apps.items()}
    handlers = {"/hello": lambda params: {"msg": "hi!"}}

    def app_key(inp, ctx, res):
        key = inp.query.get("app_key")
        app = apps.get(key) if key is not None else None
        if app is None:
            raise Unauthorized("unknown app key", code="bad_app_key")
        ctx["app_key"] = key
        return app

    def rate(inp, ctx, res):
        left = buckets[ctx["app_key"]].take()
        if left < 0:
            raise TooManyRequests("rate limit exceeded", retry_after=1)
        return left

    def validate(inp, ctx, res):
        v = inp.query.get("v", "1")
        if v != "1":
            raise BadRequest("unsupported version", code="bad_parameter", details={"param": "v"})
        return {"v": v}

    def route(inp, ctx, res):
        handler = handlers.get(inp.request.path.decode("ascii", "replace"))
        if handler is None:
            raise NotFound("no such API")
        return handler

    def fmt(inp, ctx, res):
        return res["route"](res["validate"])

    app = App(name="bench")
    app.route(PATH, [Pipe(app_key), Pipe(rate), Pipe(validate), Pipe(route), Pipe(fmt, name="format")])
    return app


def make_one_pipe_app() -> Any:
    """
    One inline pipe returning the handler's dict (JSON-encoded per request).
    """
    from pipecomet import App, Pipe

    app = App(name="bench-1")
    app.route(PATH, [Pipe(lambda inp, ctx, res: {"msg": "hi!"}, name="hello")])
    return app


def _pipecomet_site(reactor: Any, *, pipes: int = 5, protocol: str = "pipecomet",
                    access_log: str = "on") -> Any:
    from pipecomet import Config

    app = make_pipecomet_app() if pipes == 5 else make_one_pipe_app()
    app.runtime.reactor = reactor
    # Configured as twistd configures it (default tables): the site is the
    # one users get, with request limits and lazy body parsing.
    app.configure(Config.from_dict({"server": {"protocol": protocol, "access_log": access_log}}))
    return app.site()


#: kind → keyword arguments of :func:`_pipecomet_site`.
PIPECOMET_KINDS = {
    "pipecomet": {},
    "pipecomet-1": {"pipes": 1, "access_log": "off"},
    "pipecomet-5": {"access_log": "off"},
    "pipecomet-5-twisted": {"protocol": "twisted", "access_log": "off"},
}
KINDS = ("twisted", "klein", *PIPECOMET_KINDS, "tornado", "aiohttp")


def _one_pipe_site(reactor: Any, value: Any) -> Any:
    from pipecomet import App, Pipe

    app = App(name="bench-floor")
    app.runtime.reactor = reactor
    app.route(PATH, [Pipe(lambda inp, ctx, res: value, name="one")])
    return app.site()


#: The kinds the in-process breakdown measures, in table order.
IN_PROCESS_KINDS = {
    "twisted": "bare twisted.web Resource",
    "pipecomet-1-bytes": "pipecomet, 1 pipe returning the body bytes",
    "pipecomet-1-json": "pipecomet, 1 pipe returning a dict (JSON-encoded)",
    "pipecomet": "pipecomet, the 5-pipe chain",
    "pipecomet-1": "pipecomet, 1 pipe (dict), own protocol, no access log",
    "pipecomet-5": "pipecomet, 5-pipe chain, own protocol, no access log",
    "pipecomet-5-twisted": "pipecomet, 5-pipe chain, twisted.web channel, no access log",
    "klein": "bare Klein",
}


def in_process_costs(rounds: int = 15, batch: int = 2000) -> dict[str, float]:
    """
    Server CPU per request without sockets: raw request bytes are fed to a
    real ``HTTPChannel`` of each kind's real ``Site`` over an in-memory
    transport, on one keep-alive connection.  Everything twisted.web does
    (parsing, headers, access log) is in; the kernel's socket work and the
    reactor's polling are not.  Kinds are interleaved; the minimum over
    ``rounds`` batches is kept (the run least disturbed by other work).

    :return: kind → µs of CPU time per request.
    """
    from twisted.internet import reactor
    from twisted.internet.testing import StringTransport

    line = f"GET {PATH}?{QUERY} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    makers = {
        "twisted": _twisted_site,
        "klein": _klein_site,
        "pipecomet": lambda: _pipecomet_site(reactor),
        "pipecomet-1": lambda: _pipecomet_site(reactor, **PIPECOMET_KINDS["pipecomet-1"]),
        "pipecomet-5": lambda: _pipecomet_site(reactor, **PIPECOMET_KINDS["pipecomet-5"]),
        "pipecomet-5-twisted": lambda: _pipecomet_site(
            reactor, **PIPECOMET_KINDS["pipecomet-5-twisted"]),
        "pipecomet-1-bytes": lambda: _one_pipe_site(reactor, BODY),
        "pipecomet-1-json": lambda: _one_pipe_site(reactor, {"msg": "hi!"}),
    }
    setups = {}
    for kind in IN_PROCESS_KINDS:
        site = makers[kind]()
        site.startFactory()
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(line)
        answer = transport.value()
        if not answer.startswith(b"HTTP/1.1 200") or not answer.endswith(BODY if kind != "klein"
                                                                          else b"0\r\n\r\n"):
            raise RuntimeError(f"{kind}: unexpected answer {answer!r}")
        transport.clear()
        setups[kind] = (channel, transport)
    best = {kind: float("inf") for kind in setups}
    for _ in range(rounds):
        for kind, (channel, transport) in setups.items():
            feed = channel.dataReceived
            start = time.process_time()
            for _ in range(batch):
                feed(line)
            took = time.process_time() - start
            if transport.value().count(b"HTTP/1.1 200") != batch:
                raise RuntimeError(f"{kind}: not every request was answered")
            transport.clear()
            best[kind] = min(best[kind], 1e6 * took / batch)
    for channel, transport in setups.values():
        channel.connectionLost(None)
    return best


def _serve_twisted(kind: str, port: int) -> None:
    from twisted.internet import reactor

    if kind == "twisted":
        site = _twisted_site()
    elif kind == "klein":
        site = _klein_site()
    else:
        site = _pipecomet_site(reactor, **PIPECOMET_KINDS[kind])
    reactor.listenTCP(port, site, backlog=1024, interface="127.0.0.1")
    reactor.callWhenRunning(lambda: print("ready", flush=True))
    reactor.run()


def _serve_tornado(port: int) -> None:
    import asyncio
    import signal

    import tornado.web

    class Hello(tornado.web.RequestHandler):
        def get(self) -> None:
            self.set_header("Content-Type", CONTENT_TYPE.decode())
            self.write(BODY)

    async def main() -> None:
        app = tornado.web.Application([(PATH, Hello)])
        app.listen(port, address="127.0.0.1", backlog=1024)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("ready", flush=True)
        await stop.wait()

    asyncio.run(main())


def _serve_aiohttp(port: int) -> None:
    import asyncio
    import signal

    from aiohttp import web

    async def hello(request: Any) -> Any:
        return web.Response(body=BODY, content_type=CONTENT_TYPE.decode())

    async def main() -> None:
        app = web.Application()
        app.router.add_get(PATH, hello)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("ready", flush=True)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=KINDS)
    parser.add_argument("--port", type=int)
    parser.add_argument("--in-process", action="store_true",
                        help="print the in-process CPU cost per request of each kind as JSON")
    args = parser.parse_args(argv)
    if args.in_process:
        import json

        print(json.dumps(in_process_costs()))
        return
    if not args.kind or not args.port:
        parser.error("--kind and --port are required")
    if args.kind == "tornado":
        _serve_tornado(args.port)
    elif args.kind == "aiohttp":
        _serve_aiohttp(args.port)
    else:
        _serve_twisted(args.kind, args.port)


if __name__ == "__main__":
    sys.exit(main())
