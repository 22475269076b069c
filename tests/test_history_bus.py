"""
The comet hub with a bus that keeps the history (the Redis bus's contract,
:class:`~pipecomet._interfaces.IHistoryBus`), on a fake clock with an
in-memory stand-in for Redis: loading before serving, catching up after a
drop, gaps for trimmed messages, resets for a lost history, and random
interleavings of publishes, disconnects, reconnects and drops that never
deliver a message twice nor lose one silently.  The real Redis bus runs the
same scenarios against a real ``redis-server`` in ``test_it_redis_bus``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import fail, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pipecomet import App, Config
from pipecomet._bus import BusDelivery, StoredMessage, TopicHistory
from pipecomet._errors import ServiceUnavailable
from pipecomet._events import Condition
from pipecomet._interfaces import IHistoryBus
from pipecomet.testing import MemoryClient, make_clock


@implementer(IHistoryBus)
class FakeRedis:
    """
    Numbers messages per topic, keeps a capped stream, delivers to the
    receivers while "connected"; can drop, come back, trim or forget.
    """

    def __init__(self, clock: Any, count: int = 1000) -> None:
        self.clock = clock
        self.count = count
        self.receivers: list[Any] = []
        self.connected = True
        self.topics: dict[str, list[Any]] = {}  # name -> [epoch, offset, [StoredMessage]]

    def _topic(self, name: str) -> list[Any]:
        t = self.topics.get(name)
        if t is None:
            t = self.topics[name] = [os.urandom(4).hex(), 0, []]
        return t

    def store(self, topic: str, event: str, data: bytes) -> str:
        t = self._topic(topic)
        t[1] += 1
        t[2].append(StoredMessage(t[1], event, data, self.clock.seconds()))
        del t[2][:-self.count]
        return f"{t[0]}:{t[1]}"

    def publish(self, topic: str, event: str, data: bytes, key: str | None = None) -> Any:
        if not self.connected:
            return fail(ServiceUnavailable("down", code="bus_unavailable", retry_after=1))
        mid = self.store(topic, event, data)
        for r in list(self.receivers):
            r.bus_message(topic, event, data, None, mid)
        return succeed(BusDelivery(mid, len(self.receivers)))

    def elsewhere(self, topic: str, data: Any) -> None:
        """
        A publish by another process: stored, and delivered here only while
        this process's connection is up.
        """
        payload = json.dumps(data).encode()
        mid = self.store(topic, "message", payload)
        if self.connected:
            for r in list(self.receivers):
                r.bus_message(topic, "message", payload, None, mid)

    def load(self, topic: str, count: int) -> Any:
        if not self.connected:
            return fail(ServiceUnavailable("down", code="bus_unavailable", retry_after=1))
        t = self._topic(topic)
        return succeed(TopicHistory(t[0], t[1], tuple(t[2][-count:] if count else ())))

    def drop(self) -> None:
        self.connected = False
        for r in list(self.receivers):
            r.bus_down("test drop")

    def back(self) -> None:
        self.connected = True
        for r in list(self.receivers):
            r.bus_up()

    def set_limits(self, limits: Any) -> None:
        self.limits = limits

    def add_receiver(self, r: Any) -> None:
        self.receivers.append(r)

    def remove_receiver(self, r: Any) -> None:
        self.receivers.remove(r)

    def status(self) -> dict[str, Any]:
        return {"kind": "fake-redis", "connected": self.connected}


def make(count: int = 1000) -> tuple[App, MemoryClient, FakeRedis]:
    clock = make_clock()
    app = App(reactor=clock)
    bus = FakeRedis(clock, count)
    app.runtime.bus = bus
    app.route("/sub/<topic>", [Condition(lambda i, c, r: i.path_params["topic"], mode="many")],
              responders=("sse", "json", "ndjson", "longpoll"))
    app.configure(Config.from_dict({"comet": {"publish_token": "t", "heartbeat": 10.0,
                                              "history_count": count}}))
    app.service.startService()
    return app, MemoryClient(app, clock), bus


def hub_of(app: App) -> Any:
    return app.runtime.comet


def sse_data(call: Any) -> list[Any]:
    return [json.loads(e["data"]) for e in call.events()
            if "data" in e and e.get("event", "message") == "message"]


def sse_control(call: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(e["event"], json.loads(e["data"])) for e in call.events()
            if e.get("event") in ("gap", "reset")]


class HistoryBusTests(SynchronousTestCase):
    def test_a_topic_is_loaded_from_the_bus_before_it_serves(self) -> None:
        app, c, bus = make()
        for n in range(5):
            bus.elsewhere("news", n)
        # Not held here: nothing of it in this process yet.
        self.assertNotIn("news", hub_of(app).topics)
        epoch = bus.topics["news"][0]
        call = c.get("/sub/news", headers={"last-event-id": f"{epoch}:2"})
        c.flush()
        self.assertEqual(sse_data(call), [2, 3, 4])
        bus.elsewhere("news", 5)
        c.flush()
        self.assertEqual(sse_data(call), [2, 3, 4, 5])
        last = c.get("/sub/news?transport=longpoll&last=1")
        self.assertEqual([m["data"] for m in last.json()["messages"]], [5])

    def test_a_drop_is_caught_up_from_the_bus(self) -> None:
        app, c, bus = make()
        call = c.get("/sub/news")
        bus.elsewhere("news", 0)
        bus.drop()
        bus.elsewhere("news", 1)
        bus.elsewhere("news", 2)
        c.flush()
        self.assertEqual(sse_data(call), [0])
        # While down: new subscriptions and publishes are told to come back.
        self.assertEqual(c.get("/sub/news?transport=longpoll").status, 503)
        f = self.failureResultOf(hub_of(app).publish("news", 9))
        self.assertEqual(f.value.code, "bus_unavailable")
        bus.back()
        c.flush()
        self.assertEqual(sse_data(call), [0, 1, 2])
        self.assertEqual(sse_control(call), [])

    def test_trimmed_while_away_is_a_gap_with_the_count(self) -> None:
        app, c, bus = make(count=3)
        call = c.get("/sub/news")
        bus.elsewhere("news", 0)
        bus.drop()
        for n in range(1, 8):
            bus.elsewhere("news", n)
        bus.back()
        c.flush()
        self.assertEqual(sse_data(call), [0, 5, 6, 7])
        (name, fields), = sse_control(call)
        self.assertEqual((name, fields["missed"], fields["reason"]), ("gap", 4, "bus"))

    def test_a_lost_history_is_a_reset_then_the_new_epoch(self) -> None:
        app, c, bus = make()
        call = c.get("/sub/news")
        bus.elsewhere("news", 0)
        bus.drop()
        del bus.topics["news"]  # Redis restarted without persistence
        bus.back()
        bus.elsewhere("news", 1)
        c.flush()
        self.assertEqual(sse_data(call), [0, 1])
        (name, fields), = sse_control(call)
        self.assertEqual(name, "reset")
        self.assertEqual(fields["epoch"], bus.topics["news"][0])

    def test_publish_result_comes_from_the_bus(self) -> None:
        app, c, bus = make()
        done = self.successResultOf(hub_of(app).publish("news", {"a": 1}))
        self.assertEqual(done.id, f"{bus.topics['news'][0]}:1")
        self.assertEqual(done.delivered, 1)


OPS = st.lists(st.one_of(st.tuples(st.just("publish"), st.integers(1, 4)),
                         st.just(("disconnect",)), st.just(("reconnect",)),
                         st.just(("drop",)), st.just(("back",)), st.just(("flush",))),
               max_size=30)


class HistoryBusResumeProperties(SynchronousTestCase):
    @settings(max_examples=40, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(ops=OPS, history=st.sampled_from([4, 1000]),
           transport=st.sampled_from(["sse", "longpoll"]))
    def test_exactly_once_or_explicit_gap(self, ops: list[Any], history: int,
                                          transport: str) -> None:
        """
        Publishes by another process, client disconnects and reconnects,
        and bus drops in any order: every message arrives at most once and
        in order, and every one missed is declared by a gap.
        """
        app, c, bus = make(count=history)
        published: list[int] = []
        received: list[int] = []
        missing = 0
        state: dict[str, Any] = {"call": None, "cursor": None, "seen": 0}

        def read() -> None:
            nonlocal missing
            call = state["call"]
            if call is None:
                return
            if transport == "sse":
                evs = call.events()[state["seen"]:]
                state["seen"] += len(evs)
                for e in evs:
                    if "id" in e:
                        state["cursor"] = e["id"]
                    if e.get("event") in ("gap", "reset"):
                        missing += json.loads(e["data"]).get("missed", 0)
                    elif e.get("event") == "open":
                        continue  # the stream's head: its cursor, no message
                    elif "data" in e:
                        received.append(json.loads(e["data"]))
            elif call.done:
                if call.status == 200:
                    body = call.json()
                    for e in body["events"]:
                        missing += e.get("missed", 0)
                    received.extend(m["data"] for m in body["messages"])
                    state["cursor"] = body["cursor"]
                state["call"] = None
                if bus.connected:
                    connect()

        def connect() -> None:
            headers = {}
            if state["cursor"] is not None:
                headers["last-event-id"] = state["cursor"]
            q = "?transport=longpoll" if transport == "longpoll" else ""
            call = c.get("/sub/news" + q, headers=headers)
            if call.done and call.status == 503:
                state["call"] = None  # the bus is down: come back later
                return
            state["call"] = call
            state["seen"] = 0
            read()

        bus.elsewhere("other", 0)
        connect()
        for op in ops:
            if op[0] == "publish":
                for _ in range(op[1]):
                    n = len(published) + 1
                    published.append(n)
                    bus.elsewhere("news", n)
            elif op[0] == "disconnect" and state["call"] is not None:
                read()
                if state["call"] is not None and not state["call"].done:
                    c.disconnect(state["call"])
                state["call"] = None
            elif op[0] == "reconnect" and state["call"] is None and bus.connected:
                connect()
            elif op[0] == "drop" and bus.connected:
                bus.drop()
            elif op[0] == "back" and not bus.connected:
                bus.back()
            c.flush()
            read()
        if not bus.connected:
            bus.back()
            c.flush()
            read()
        if state["call"] is None:
            connect()
        c.flush()
        read()
        self.assertEqual(received, sorted(set(received)))
        self.assertEqual(len(received) + missing, len(published))
        if history == 1000:
            self.assertEqual(received, published)
        app.service.stopService()
        c.flush()
