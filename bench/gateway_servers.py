"""
The processes `bench.gateway` measures, one per process:

``python -m bench.gateway_servers --kind KIND --port N [--backend PORT]``

- ``backend``: a minimal HTTP/1.1 server (a raw Twisted protocol, so it is
  never the bottleneck): ``GET /slow`` answers after ``--delay`` seconds
  (1 s: the seed 002 scenario), anything else at once; body ``{"msg":"hi!"}``.
- gateways, each forwarding ``GET <path>`` to the backend over kept-alive
  connections and answering with the backend's body:
  ``pipecomet`` (the backend client, a one-pipe chain), ``treq-pipe`` (treq
  with a persistent pool inside a pipecomet pipe: what a user writes
  without the client), ``treq`` (a bare twisted.web resource with treq),
  ``tornado`` (Tornado's AsyncHTTPClient), ``aiohttp`` (aiohttp's server and
  ClientSession).

Every process listens on 127.0.0.1 only, prints ``ready`` once it listens
and stops on SIGTERM.  No gateway writes an access log.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from typing import Any

BODY = b'{"msg":"hi!"}'
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(BODY), BODY))
#: Connections a gateway may open to the backend (more than wrk ever holds).
POOL = 4096
KINDS = ("backend", "pipecomet", "treq-pipe", "treq", "tornado", "aiohttp")
#: pipecomet's ``[gc] threshold`` for its gateway (``BENCH_GW_PC_GC``; 0:
#: Python's default): see docs/backends.md, "Where the CPU goes".
GC_THRESHOLD = int(os.environ.get("BENCH_GW_PC_GC", "20000"))


def _gc_report(path: str) -> None:
    """
    Time spent in Python's cyclic garbage collector, by generation, written
    to ``path`` at exit and on SIGUSR1 (``BENCH_GW_GC_REPORT``; for
    profiling runs).
    """
    import atexit
    import gc
    import signal
    import time

    spent = [0.0, 0.0, 0.0]
    runs = [0, 0, 0]
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.process_time()
        else:
            gen = info["generation"]
            spent[gen] += time.process_time() - started[0]
            runs[gen] += 1

    gc.callbacks.append(callback)

    def write() -> None:
        with open(path, "a") as f:
            f.write(f"gc cpu s by generation {[round(x, 3) for x in spent]} runs {runs} "
                    f"total cpu {time.process_time():.2f} s\n")

    atexit.register(write)
    signal.signal(signal.SIGUSR1, lambda signum, frame: write())


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve_backend(port: int, delay: float) -> None:
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    class Backend(Protocol):
        buf = b""

        def dataReceived(self, data: bytes) -> None:
            buf = self.buf + data
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                slow = buf.startswith(b"GET /slow")
                buf = buf[end + 4:]
                if slow:
                    reactor.callLater(delay, self.answer)
                else:
                    self.transport.write(RESPONSE)
            self.buf = buf

        def answer(self) -> None:
            if self.connected:
                self.transport.write(RESPONSE)

    reactor.listenTCP(port, Factory.forProtocol(Backend), backlog=4096, interface="127.0.0.1")
    reactor.callWhenRunning(lambda: print("ready", flush=True))
    reactor.run()


def _serve_site(site: Any, port: int) -> None:
    from twisted.internet import reactor

    reactor.listenTCP(port, site, backlog=4096, interface="127.0.0.1")
    reactor.callWhenRunning(lambda: print("ready", flush=True))
    reactor.run()


def serve_pipecomet(port: int, backend: int) -> None:
    from twisted.internet import reactor

    from pipecomet import Answer, App, Config, Pipe

    app = App(reactor=reactor, name="bench-gateway")

    def answer(body: bytes) -> Answer:
        return Answer(body, content_type="application/json")

    def forward(inp: Any, ctx: Any, res: Any) -> Any:
        d = ctx.backend("b").get(inp.request.path)
        return d.addCallback(lambda r: r.body()).addCallback(answer)

    app.route("/slow", [Pipe(forward, name="forward")])
    app.route("/fast", [Pipe(forward, name="forward")])
    gc_table = {"threshold": GC_THRESHOLD} if GC_THRESHOLD else {}
    app.configure(Config.from_dict({
        "server": {"access_log": "off"},
        "gc": gc_table,
        "backends": {"b": {
            "discovery": {"endpoints": [f"127.0.0.1:{backend}"]},
            "pool": {"max_connections": POOL, "queue": POOL * 2, "queue_timeout": 10.0},
            "timeout": 10.0,
        }},
    }))
    app.service.startService()
    _serve_site(app.site(), port)


def serve_treq_pipe(port: int, backend: int) -> None:
    import treq
    from twisted.internet import reactor
    from twisted.web.client import HTTPConnectionPool

    from pipecomet import Answer, App, Config, Pipe

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = POOL
    base = f"http://127.0.0.1:{backend}"
    app = App(reactor=reactor, name="bench-treq")

    def forward(inp: Any, ctx: Any, res: Any) -> Any:
        d = treq.get(base + inp.path, pool=pool, reactor=reactor)
        return d.addCallback(treq.content).addCallback(
            lambda body: Answer(body, content_type="application/json"))

    app.route("/slow", [Pipe(forward, name="forward")])
    app.route("/fast", [Pipe(forward, name="forward")])
    app.configure(Config.from_dict({"server": {"access_log": "off"}}))
    _serve_site(app.site(), port)


def serve_treq(port: int, backend: int) -> None:
    import treq
    from twisted.internet import reactor
    from twisted.web.client import HTTPConnectionPool
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Site

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = POOL
    base = f"http://127.0.0.1:{backend}"

    class Forward(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> Any:
            def send(body: bytes) -> None:
                request.setHeader(b"content-type", b"application/json")
                request.write(body)
                request.finish()

            def failed(f: Any) -> None:
                if not request.finished and not request._disconnected:
                    request.setResponseCode(502)
                    request.finish()

            d = treq.get(base + request.path.decode(), pool=pool, reactor=reactor)
            d.addCallback(treq.content).addCallbacks(send, failed)
            return NOT_DONE_YET

    site = Site(Forward())
    site.log = lambda request: None
    _serve_site(site, port)


def serve_tornado(port: int, backend: int) -> None:
    import asyncio
    import signal

    import tornado.web
    from tornado.httpclient import AsyncHTTPClient

    base = f"http://127.0.0.1:{backend}"

    class Forward(tornado.web.RequestHandler):
        async def get(self) -> None:
            resp = await AsyncHTTPClient().fetch(base + self.request.path, request_timeout=10)
            self.set_header("Content-Type", "application/json")
            self.write(resp.body)

    async def main() -> None:
        AsyncHTTPClient.configure(None, max_clients=POOL)
        app = tornado.web.Application([(r"/.*", Forward)], log_function=lambda h: None)
        app.listen(port, address="127.0.0.1", backlog=4096)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("ready", flush=True)
        await stop.wait()

    asyncio.run(main())


def serve_aiohttp(port: int, backend: int) -> None:
    import asyncio
    import signal

    import aiohttp
    from aiohttp import web

    base = f"http://127.0.0.1:{backend}"

    async def main() -> None:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=POOL))

        async def forward(request: web.Request) -> web.Response:
            async with session.get(base + request.path) as resp:
                body = await resp.read()
            return web.Response(body=body, content_type="application/json")

        app = web.Application()
        app.router.add_get("/{tail:.*}", forward)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("ready", flush=True)
        await stop.wait()
        await runner.cleanup()
        await session.close()

    asyncio.run(main())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", type=int, default=0)
    parser.add_argument("--delay", type=float, default=1.0)
    args = parser.parse_args(argv)
    _raise_fd_limit()
    if os.environ.get("BENCH_GW_GC_REPORT"):
        _gc_report(os.environ["BENCH_GW_GC_REPORT"])
    if os.environ.get("BENCH_GW_GC_THRESHOLD"):
        # (profiling: how much of a call's CPU is the cyclic collector's)
        import gc

        gc.set_threshold(int(os.environ["BENCH_GW_GC_THRESHOLD"]), 50, 100)
    if args.kind == "backend":
        serve_backend(args.port, args.delay)
        return
    serve = {"pipecomet": serve_pipecomet, "treq-pipe": serve_treq_pipe, "treq": serve_treq,
             "tornado": serve_tornado, "aiohttp": serve_aiohttp}[args.kind]
    serve(args.port, args.backend)


if __name__ == "__main__":
    sys.exit(main())
