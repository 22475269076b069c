"""
``python -m bench.comet_inprocess``: the comet fan-out path measured in one
process, without sockets or a client (cheap enough to run while others
work; not a substitute for ``make bench-comet``).

``BENCH_INPROC_HELD`` (5,000) subscribers are held on pipecomet's own HTTP
protocol over in-memory transports (the app of ``bench.comet``'s server);
then, per round, one publish answers every held long-poll (or writes one
frame to every SSE stream) and the long-polls poll again.  Reported:

- CPU time per answered long-poll (per delivered SSE frame), median and
  minimum over ``BENCH_INPROC_ROUNDS`` (7) rounds: the publish and every
  answer, up to the bytes handed to the transport;
- Python function calls per answer (cProfile, deterministic: a figure that
  noise on a shared machine does not move);
- bytes allocated per held subscriber (tracemalloc, after warm-up).

The real reactor is installed but never run: its timed calls are a heap, as
in the server (``MemoryReactorClock`` sorts its list on every ``callLater``,
which would swamp the figures).
"""

from __future__ import annotations

import cProfile
import gc
import json
import os
import pstats
import statistics
import sys
import time
import tracemalloc
from typing import TYPE_CHECKING, Sequence

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IProtocol
from twisted.internet.testing import StringTransport

if TYPE_CHECKING:
    from pipecomet import App
    from pipecomet.interfaces import IPipecometReactor


class _CountingTransport(StringTransport):
    """
    Counts the bytes written instead of keeping them.
    """

    written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writeSequence(self, seq: Sequence[bytes]) -> None:
        for data in seq:
            self.write(data)


def _app(reactor: IPipecometReactor) -> App:
    from pipecomet import App, Config
    from pipecomet._events import Condition

    app = App(reactor=reactor, name="bench-comet")
    app.route("/comet/<topic>", [Condition(lambda i, c, r: [i.path_params["topic"]],
                                           mode="many")],
              responders=("sse", "json", "longpoll"))
    app.configure(Config.from_dict({"comet": {
        "publish_token": "x", "heartbeat": 3600.0, "max_lifetime": 0.0,
        "longpoll_timeout": 600.0, "longpoll_max_timeout": 600.0,
        "max_connections": 50_000, "max_connections_per_topic": 50_000,
        "history_count": 100}}))
    app.service.startService()
    return app


def run(mode: str, held: int, rounds: int) -> dict[str, object]:
    from twisted.internet import reactor

    app = _app(reactor)
    site = app.site()
    hub = app.runtime.comet
    assert hub is not None
    hub.publish_json("bench", b"0")
    epoch = hub.topics["bench"].epoch
    offset = hub.topics["bench"].last_offset
    conns: list[tuple[IProtocol, _CountingTransport]] = []

    def ask(proto: IProtocol, offset: int) -> None:
        if mode == "sse":
            req = b"GET /comet/bench HTTP/1.1\r\nHost: b\r\nAccept: text/event-stream\r\n\r\n"
        else:
            req = (b"GET /comet/bench?transport=longpoll&since=%s:%d HTTP/1.1\r\nHost: b\r\n"
                   b"Accept: application/json\r\n\r\n" % (epoch.encode(), offset))
        proto.dataReceived(req)

    def connect(n: int) -> None:
        for _ in range(n):
            proto = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
            assert proto is not None
            transport = _CountingTransport()
            proto.makeConnection(transport)
            ask(proto, offset)
            conns.append((proto, transport))

    connect(100)  # warm-up
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    connect(held)
    gc.collect()
    per_held = (tracemalloc.get_traced_memory()[0] - before) / held
    tracemalloc.stop()
    total = held + 100
    assert hub.connections == total, hub.connections
    payload = json.dumps({"msg": "x" * 36}).encode()
    cpu: list[float] = []
    calls = 0
    for r in range(rounds + 1):
        marks = [t.written for _, t in conns]
        profile = cProfile.Profile() if r == rounds else None
        t0 = time.process_time()
        if profile is not None:
            profile.enable()
        hub.publish_json("bench", payload)
        if profile is not None:
            profile.disable()
        t1 = time.process_time()
        answered = sum(1 for (_, t), m in zip(conns, marks) if t.written > m)
        assert answered == total, (answered, total)
        if profile is None:
            cpu.append((t1 - t0) / total * 1e6)
        else:
            # Every call, primitive or not (the second field of each entry).
            calls = sum(entry[1] for entry in pstats.Stats(profile).stats.values())
        offset += 1
        if mode == "longpoll":
            for proto, _ in conns:
                ask(proto, offset)
            assert hub.connections == total, hub.connections
        gc.collect()
    return {"mode": mode, "held": total, "rounds": rounds,
            "cpu_us_per_answer_median": round(statistics.median(cpu), 1),
            "cpu_us_per_answer_min": round(min(cpu), 1),
            "calls_per_answer": round(calls / total, 1),
            "bytes_per_held": round(per_held)}


def main() -> None:
    from twisted.internet import epollreactor

    epollreactor.install()
    mode = sys.argv[1] if len(sys.argv) > 1 else "longpoll"
    held = int(os.environ.get("BENCH_INPROC_HELD", "5000"))
    rounds = int(os.environ.get("BENCH_INPROC_ROUNDS", "7"))
    # The access log goes to stdout, as in the bench's server: to
    # /dev/null here, so that a terminal's speed is not in the figures.
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        result = run(mode, held, rounds)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(devnull)
        os.close(saved)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
