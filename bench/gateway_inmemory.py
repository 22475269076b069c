"""
CPU of a forwarded call without sockets, and the cyclic collector's share.

``python -m bench.gateway_inmemory IN_FLIGHT CALLS GC_THRESHOLD`` prints one
JSON line: pipecomet's real HTTP protocol, chain and backend client on
memory transports (``StringTransport``, ``MemoryReactorClock``), a fake
backend that answers each request only once ``IN_FLIGHT`` others are
waiting (as a 1 s backend at 2,000 connections keeps 2,000 calls open),
and ``CALLS`` measured calls: process CPU per call and the part spent in
Python's cyclic garbage collector (``gc.callbacks``).  ``GC_THRESHOLD`` 0
keeps Python's default; otherwise pipecomet's ``[gc] threshold``.
Kernel and reactor work are not in it; it is steady on a busy machine,
which the socket figures are not.  ``bench.gateway`` runs it.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from collections import deque
from typing import Any

BODY = b'{"msg":"hi!"}'
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(BODY), BODY))
REQUEST = b"GET /fast HTTP/1.1\r\nHost: gw\r\n\r\n"


def measure(in_flight: int, calls: int, threshold: int) -> dict[str, Any]:
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import MemoryReactorClock, StringTransport

    from pipecomet import Answer, App, Config, Pipe

    reactor = MemoryReactorClock()
    app = App(reactor=reactor, name="bench-gateway-inmemory")

    def forward(inp: Any, ctx: Any, res: Any) -> Any:
        d = ctx.backend("b").get(inp.request.path)
        return d.addCallback(lambda r: r.body()).addCallback(
            lambda body: Answer(body, content_type="application/json"))

    app.route("/fast", [Pipe(forward, name="forward")])
    app.configure(Config.from_dict({
        "server": {"access_log": "off"},
        "gc": {"threshold": threshold} if threshold else {},
        "backends": {"b": {"discovery": {"endpoints": ["127.0.0.1:9"]},
                           "pool": {"max_connections": 8192, "queue": 8192},
                           "timeout": 1000.0}},
    }))
    app.service.startService()
    site = app.site()
    servers = []
    for i in range(in_flight + 1):
        address = IPv4Address("TCP", "127.0.0.1", 20000 + i)
        proto = site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        proto.makeConnection(transport)
        servers.append((proto, transport))
    sent: deque[Any] = deque()  # backend connections with a request, oldest first

    class BackendTransport(StringTransport):
        def write(self, data: bytes) -> None:
            sent.append(self.proto)

    free = deque(range(in_flight + 1))
    waiting: deque[int] = deque()

    def step() -> None:
        i = free.popleft()
        servers[i][0].dataReceived(REQUEST)
        waiting.append(i)
        while reactor.tcpClients:
            host, port, factory, _, _ = reactor.tcpClients.pop(0)
            proto = factory.buildProtocol(IPv4Address("TCP", host, port))
            transport = BackendTransport()
            transport.proto = proto  # type: ignore[attr-defined]
            proto.makeConnection(transport)
        if len(waiting) > in_flight:
            sent.popleft().dataReceived(RESPONSE)
            j = waiting.popleft()
            out = servers[j][1]
            if b" 200 OK" not in out.value():
                raise RuntimeError(f"unexpected answer: {out.value()[:200]!r}")
            out.clear()
            free.append(j)

    for _ in range(in_flight + 2000):
        step()
    spent = [0.0, 0.0]

    def timer(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            spent[1] = time.process_time()
        else:
            spent[0] += time.process_time() - spent[1]

    gc.callbacks.append(timer)
    started = time.process_time()
    for _ in range(calls):
        step()
    cpu = time.process_time() - started
    gc.callbacks.remove(timer)
    return {"in_flight": in_flight, "calls": calls, "gc_threshold": threshold,
            "cpu_us_per_call": 1e6 * cpu / calls, "gc_us_per_call": 1e6 * spent[0] / calls}


def main() -> None:
    in_flight, calls, threshold = (int(x) for x in sys.argv[1:4])
    print(json.dumps(measure(in_flight, calls, threshold)))


if __name__ == "__main__":
    main()
