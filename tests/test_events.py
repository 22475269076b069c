"""
Unit tests of the EventKeeper, condition pipes and comet transports, on a
fake clock and in-memory connections (trial and pytest alike).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pipecomet import App, Config, Pipe
from pipecomet._comet import CometConfig, CometStats, format_cursor, parse_cursor
from pipecomet._errors import BadRequest, GatewayTimeout
from pipecomet._events import (
    TRANSITIONS,
    Condition,
    EventAction,
    EventKeeper,
    EventListener,
    EventState,
    InvalidTransition,
)
from pipecomet.testing import MemoryClient, make_clock
from tests.conftest import examples

TOKEN = "t0ken"


class Recorder(EventListener):
    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    def on_invoke(self, event, value):
        self.seen.append(("invoke", value))

    def on_complete(self, event, value):
        self.seen.append(("complete", value))

    def on_timeout(self, event):
        self.seen.append(("timeout", None))

    def on_cancel(self, event):
        self.seen.append(("cancel", None))


class StateMachineTests(SynchronousTestCase):
    def test_table(self) -> None:
        S, A = EventState, EventAction
        self.assertEqual(TRANSITIONS[S.INIT, A.INVOKE], S.INVOKE)
        self.assertEqual(TRANSITIONS[S.INVOKE, A.INVOKE], S.INVOKE)
        for end, action in ((S.COMPLETE, A.COMPLETE), (S.TIMEOUT, A.TIMEOUT),
                            (S.CANCELLED, A.CANCEL)):
            self.assertEqual(TRANSITIONS[S.INIT, action], end)
            self.assertEqual(TRANSITIONS[S.INVOKE, action], end)
            for a in A:
                self.assertNotIn((end, a), TRANSITIONS)

    def test_invalid_transition(self) -> None:
        keeper = EventKeeper(Clock())
        ev = keeper.listen("k", Recorder())
        ev.complete(1)
        self.assertRaises(InvalidTransition, ev.invoke, 2)
        self.assertRaises(InvalidTransition, ev.complete, 2)
        ev.cancel()  # a no-op once ended
        self.assertEqual(ev.state, EventState.COMPLETE)


class KeeperTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.keeper = EventKeeper(self.clock)

    def test_invoke_repeats_then_complete(self) -> None:
        rec = Recorder()
        ev = self.keeper.listen("k", rec, timeout=10)
        self.assertEqual(self.keeper.fire("k", 1), 1)
        self.assertEqual(self.keeper.fire("k", 2), 1)
        self.assertEqual(ev.state, EventState.INVOKE)
        self.assertEqual(self.keeper.complete("k", 3), 1)
        self.assertEqual(rec.seen, [("invoke", 1), ("invoke", 2), ("complete", 3)])
        self.assertEqual(self.keeper.fire("k", 4), 0)
        self.assertEqual(self.keeper.waiters(), 0)
        self.assertEqual(self.keeper.timers, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeout_is_a_timed_call(self) -> None:
        rec = Recorder()
        self.keeper.listen("k", rec, timeout=5)
        self.keeper.listen("k", Recorder(), timeout=50)
        # One timed call per deadline; nothing scans.
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        self.clock.advance(4.9)
        self.assertEqual(rec.seen, [])
        self.clock.advance(0.2)
        self.assertEqual(rec.seen, [("timeout", None)])
        self.assertEqual(self.keeper.waiters("k"), 1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_waiters_of_one_timeout_share_a_timed_call(self) -> None:
        """
        Waiters with the same timeout expire in the order they came: one
        timed call serves them all, each times out at its own deadline,
        and one that leaves (even the first) is not timed out.
        """
        recs = [Recorder() for _ in range(4)]
        events = []
        for rec in recs:
            events.append(self.keeper.listen("k", rec, timeout=5))
            self.clock.advance(1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(self.keeper.timers, 4)
        events[0].cancel()  # t=4: the first leaves before its deadline
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(1.5)  # t=5.5: past the first's deadline only
        self.assertEqual([r.seen for r in recs], [[("cancel", None)], [], [], []])
        self.clock.advance(0.5)  # t=6: the second's
        self.assertEqual(recs[1].seen, [("timeout", None)])
        self.assertEqual(recs[2].seen, [])
        events[3].cancel()
        self.clock.advance(1)  # t=7: the third's
        self.assertEqual(recs[2].seen, [("timeout", None)])
        self.assertEqual(self.keeper.timers, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # Another timeout has a timed call of its own; rescheduling moves
        # an event from one to the other.
        a = self.keeper.listen("k", Recorder(), timeout=5)
        b = self.keeper.listen("k", Recorder(), timeout=9)
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        a.reschedule(9)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        b.reschedule(None)
        self.clock.advance(9)
        self.assertEqual(a.state, EventState.TIMEOUT)
        self.assertEqual(b.state, EventState.INIT)
        self.assertEqual((self.keeper.timers, self.clock.getDelayedCalls()), (0, []))

    def test_a_listener_that_waits_again_on_timeout(self) -> None:
        """
        A waiter armed from a timeout (same timeout, same lane) keeps one
        timed call, at the right deadline, for it and the lane's others.
        """
        keeper, clock = self.keeper, self.clock
        later = Recorder()

        class Again(Recorder):
            def on_timeout(self, event):
                super().on_timeout(event)
                keeper.listen("k", later, timeout=5)

        first = Again()
        keeper.listen("k", first, timeout=5)
        clock.advance(1)
        second = Recorder()
        keeper.listen("k", second, timeout=5)
        clock.advance(4)  # t=5: the first times out and waits again (until 10)
        self.assertEqual(first.seen, [("timeout", None)])
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(1)  # t=6: the second's deadline
        self.assertEqual(second.seen, [("timeout", None)])
        self.assertEqual(later.seen, [])
        clock.advance(4)  # t=10
        self.assertEqual(later.seen, [("timeout", None)])
        self.assertEqual((keeper.timers, clock.getDelayedCalls()), (0, []))

    def test_fire_counts_waiters_on_several_keys(self) -> None:
        a, b = Recorder(), Recorder()
        self.keeper.listen(["x", "y"], a, many=True)
        self.keeper.listen("y", b)
        self.assertEqual(self.keeper.fire("x", 1), 1)
        self.assertEqual(self.keeper.fire("y", 2), 2)
        self.assertEqual(self.keeper.fire("z", 3), 0)
        self.keeper.complete("x")
        self.assertEqual(self.keeper.waiters("y"), 1)
        self.assertEqual(self.keeper.keys(), ["y"])

    def test_wait_once(self) -> None:
        d = self.keeper.wait("job", timeout=3)
        self.assertNoResult(d)
        self.assertEqual(self.keeper.fire("job", {"r": 1}), 1)
        self.assertEqual(self.successResultOf(d), {"r": 1})
        self.assertEqual(self.keeper.waiters(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_wait_timeout(self) -> None:
        d = self.keeper.wait("job", timeout=3)
        self.clock.advance(3)
        f = self.failureResultOf(d, GatewayTimeout)
        self.assertEqual(f.value.status, 504)
        d2 = self.keeper.wait("job", timeout=1, on_timeout={"late": True})
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(d2), {"late": True})

    def test_wait_cancel_releases(self) -> None:
        d = self.keeper.wait("job", timeout=3)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.keeper.waiters(), 0)
        self.assertEqual(self.keeper.timers, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.keeper.fire("job"), 0)


def make(config: dict[str, Any] | None = None, routes: Any = None) -> tuple[App, MemoryClient]:
    clock = make_clock()
    app = App(reactor=clock)
    app.route("/sub/<topic>", [Condition(lambda i, c, r: i.path_params["topic"].split(","),
                                         mode="many")],
              responders=("sse", "json", "ndjson", "longpoll"))
    if routes:
        routes(app)
    comet = {"publish_token": TOKEN, "heartbeat": 10.0, **(config or {})}
    app.configure(Config.from_dict({"comet": comet}))
    app.service.startService()
    return app, MemoryClient(app, clock)


def hub_of(app: App) -> Any:
    return app.runtime.comet


def data_events(call: Any) -> list[dict[str, Any]]:
    return [e for e in call.events() if "data" in e and e.get("event", "message") == "message"]


class CometTransportTests(SynchronousTestCase):
    def test_sse_stream_ids_and_headers(self) -> None:
        app, c = make()
        call = c.get("/sub/news")
        self.assertEqual(call.status, 200)
        self.assertEqual(call.header("content-type"), "text/event-stream")
        self.assertEqual(call.header("cache-control"), "no-cache")
        self.assertEqual(call.header("x-accel-buffering"), "no")
        hub = hub_of(app)
        p1 = self.successResultOf(hub.publish("news", {"n": 1}))
        p2 = self.successResultOf(hub.publish("news", {"n": 2}, event="update"))
        self.assertEqual(p1.delivered, 1)
        c.flush()
        evs = call.events()
        cursor = f"{hub.topics['news'].epoch}:0"
        self.assertEqual(evs[0], {"retry": "2000", "id": cursor, "event": "open",
                                  "data": f'{{"event":"open","cursor":"{cursor}","resume":"live"}}'})
        self.assertEqual(evs[1], {"id": p1.id, "data": '{"n":1}'})
        self.assertEqual(evs[2], {"id": p2.id, "event": "update", "data": '{"n":2}'})
        epoch, off = p2.id.split(":")
        self.assertEqual(off, "2")
        c.advance(10)
        self.assertIn(b": heartbeat\n\n", call.body)

    def test_once_mode_route(self) -> None:
        def routes(app: App) -> None:
            app.route("/job/<id>", [Condition("job:{id}", timeout=5.0),
                                    Pipe(lambda i, c, r: {"got": r.last}, name="out")])

        app, c = make(routes=routes)
        call = c.get("/job/7")
        self.assertFalse(call.done)
        keeper = app.runtime.events
        self.assertEqual(keeper.waiters("job:7"), 1)
        self.assertEqual(keeper.fire("job:7", 42), 1)
        c.flush()
        self.assertEqual(call.json(), {"got": 42})
        late = c.get("/job/8")
        c.advance(5)
        self.assertEqual(late.status, 504)
        self.assertEqual(late.json()["error"]["code"], "event_timeout")
        gone = c.get("/job/9")
        c.disconnect(gone)
        self.assertEqual(keeper.waiters(), 0)
        self.assertEqual(keeper.timers, 0)

    def test_longpoll_timeout_is_an_empty_batch(self) -> None:
        app, c = make({"longpoll_timeout": 5.0, "longpoll_max_timeout": 8.0})
        hello = c.get("/sub/news", headers={"accept": "application/json"})
        # Without a cursor the first poll answers at once with one.
        self.assertEqual(hello.json()["messages"], [])
        cursor = hello.json()["cursor"]
        call = c.get(f"/sub/news?since={cursor}", headers={"accept": "application/json"})
        c.advance(4.9)
        self.assertFalse(call.done)
        c.advance(0.2)
        body = call.json()
        self.assertEqual(body["messages"], [])
        self.assertEqual(call.status, 200)
        # A shorter timeout asked by the client, and a capped longer one.
        short = c.get(f"/sub/news?transport=longpoll&timeout=1&since={cursor}")
        c.advance(1.01)
        self.assertTrue(short.done)
        capped = c.get(f"/sub/news?transport=longpoll&timeout=100&since={cursor}")
        c.advance(7.9)
        self.assertFalse(capped.done)
        c.advance(0.2)
        self.assertTrue(capped.done)
        bad = c.get("/sub/news?transport=longpoll&timeout=-1")
        self.assertEqual(bad.status, 400)
        self.assertEqual(bad.json()["error"]["code"], "bad_timeout")

    def test_longpoll_cursor_chain_loses_nothing(self) -> None:
        app, c = make()
        hub = hub_of(app)
        hello = c.get("/sub/news?transport=longpoll")
        first = c.get("/sub/news?transport=longpoll&since=" + hello.json()["cursor"])
        hub.publish("news", 1)
        c.flush()
        got = [m["data"] for m in first.json()["messages"]]
        cursor = first.json()["cursor"]
        for n in (2, 3, 4):  # published while no poll is held
            hub.publish("news", n)
        nxt = c.get(f"/sub/news?transport=longpoll&since={cursor}")
        got += [m["data"] for m in nxt.json()["messages"]]
        self.assertEqual(got, [1, 2, 3, 4])
        self.assertEqual(nxt.header("pipecomet-resume"), "ok")

    def test_ndjson_and_end_event(self) -> None:
        app, c = make()
        hub = hub_of(app)
        call = c.get("/sub/news", headers={"accept": "application/x-ndjson"})
        hub.publish("news", {"a": 1})
        # The bus's report, not a count the hub read off the keeper.
        self.assertEqual(self.successResultOf(hub.complete("news", {"bye": True})).delivered, 1)
        c.flush()
        lines = call.lines()
        self.assertEqual(lines[0]["event"], "open")
        self.assertEqual(lines[1]["data"], {"a": 1})
        self.assertEqual(lines[-1], {"event": "end", "topic": "news", "data": {"bye": True}})
        self.assertTrue(call.done)
        self.assertEqual(app.runtime.events.waiters(), 0)

    def test_stream_timeout_per_transport(self) -> None:
        app, c = make({"max_lifetime": 0})
        sse = c.get("/sub/news?timeout=3")
        nd = c.get("/sub/news?timeout=3", headers={"accept": "application/x-ndjson"})
        lp = c.get("/sub/news?timeout=3&transport=longpoll&since=0")
        c.advance(2.9)
        self.assertFalse(sse.done or nd.done or lp.done)
        c.advance(0.2)
        self.assertTrue(sse.done and nd.done and lp.done)
        self.assertEqual(sse.events()[-1]["event"], "reconnect")
        self.assertEqual(nd.lines()[-1]["event"], "reconnect")
        self.assertEqual(lp.json()["messages"], [])
        self.assertEqual(app.runtime.events.timers, 0)

    def test_max_lifetime_with_jitter(self) -> None:
        app, c = make({"max_lifetime": 100.0, "lifetime_jitter": 0.2})
        calls = [c.get("/sub/news") for _ in range(20)]
        c.advance(79.9)
        self.assertFalse(any(x.done for x in calls))
        c.advance(20.2)
        self.assertTrue(all(x.done for x in calls))
        ev = calls[0].events()[-1]
        self.assertEqual(ev["event"], "reconnect")
        self.assertIn("retry", ev)

    def test_disconnect_releases_everything(self) -> None:
        app, c = make()
        keeper, hub = app.runtime.events, hub_of(app)
        calls = [c.get("/sub/news"), c.get("/sub/news?transport=longpoll&since=0"),
                 c.get("/sub/a,b", headers={"accept": "application/x-ndjson"})]
        self.assertEqual(keeper.waiters(), 3)
        self.assertEqual(hub.connections, 3)
        for call in calls:
            c.disconnect(call)
        self.assertEqual(keeper.waiters(), 0)
        self.assertEqual(keeper.timers, 0)
        self.assertEqual(hub.connections, 0)
        c.advance(300)
        self.assertEqual(hub.topics, {})

    def test_resume_exactly_once(self) -> None:
        app, c = make()
        hub = hub_of(app)
        call = c.get("/sub/news")
        for n in range(3):
            hub.publish("news", n)
        c.flush()
        seen = data_events(call)
        c.disconnect(call)
        for n in range(3, 6):
            hub.publish("news", n)
        again = c.get("/sub/news", headers={"last-event-id": seen[-1]["id"]})
        hub.publish("news", 6)
        c.flush()
        seen += data_events(again)
        self.assertEqual([json.loads(e["data"]) for e in seen], list(range(7)))
        self.assertEqual(again.header("pipecomet-resume"), "ok")
        self.assertEqual(again.header("pipecomet-resumed-from"), seen[2]["id"])

    def test_gap_and_reset_are_explicit(self) -> None:
        app, c = make({"history_count": 3})
        hub = hub_of(app)
        ids = [self.successResultOf(hub.publish("news", n)).id for n in range(10)]
        old = c.get("/sub/news", headers={"last-event-id": ids[1]})
        evs = old.events()
        gap = [e for e in evs if e.get("event") == "gap"]
        self.assertEqual(len(gap), 1)
        info = json.loads(gap[0]["data"])
        self.assertEqual(info["missed"], 5)
        self.assertEqual(info["resumed_from"], ids[6])
        self.assertEqual([json.loads(e["data"]) for e in data_events(old)], [7, 8, 9])
        self.assertEqual(old.header("pipecomet-resume"), "gap")
        other = c.get("/sub/news?since=abcd:3", headers={"accept": "application/x-ndjson"})
        lines = other.lines()
        self.assertEqual(lines[0]["event"], "open")
        self.assertEqual(lines[0]["resume"], "reset")
        lines = lines[1:]
        self.assertEqual(lines[0]["event"], "reset")
        self.assertEqual([x["data"] for x in lines[1:]], [7, 8, 9])
        bad = c.get("/sub/news?since=zz")
        self.assertEqual(bad.status, 400)
        self.assertEqual(bad.json()["error"]["code"], "bad_cursor")

    def test_gap_of_exactly_one_message_is_declared(self) -> None:
        """
        The smallest gap: the one message after the cursor has left the
        history.  Every transport declares it (missed 1) and replays the
        rest; nothing is skipped silently.
        """
        for transport in ("sse", "ndjson", "longpoll"):
            app, c = make({"history_count": 3})
            hub = hub_of(app)
            ids = [self.successResultOf(hub.publish("news", n)).id for n in range(1, 6)]  # offsets 1..5; 3..5 kept
            headers = {"last-event-id": ids[0]}
            if transport == "ndjson":
                headers["accept"] = "application/x-ndjson"
            q = "?transport=longpoll" if transport == "longpoll" else ""
            call = c.get("/sub/news" + q, headers=headers)
            c.flush()
            self.assertEqual(call.header("pipecomet-resume"), "gap", transport)
            if transport == "sse":
                gap = [json.loads(e["data"]) for e in call.events() if e.get("event") == "gap"]
                data = [json.loads(e["data"]) for e in data_events(call)]
            elif transport == "ndjson":
                lines = call.lines()
                gap = [x for x in lines if x.get("event") == "gap"]
                data = [x["data"] for x in lines if x.get("event") == "message"]
            else:
                body = call.json()
                gap = body["events"]
                data = [m["data"] for m in body["messages"]]
            self.assertEqual([g["missed"] for g in gap], [1], transport)
            self.assertEqual(gap[0]["resumed_from"], ids[1], transport)
            self.assertEqual(data, [3, 4, 5], transport)
            # One message newer: nothing missed, an ordinary resume.
            call = c.get("/sub/news" + q, headers={**headers, "last-event-id": ids[1]})
            c.flush()
            self.assertEqual(call.header("pipecomet-resume"), "ok", transport)
            app.service.stopService()

    def test_history_age_expires_by_timed_call(self) -> None:
        app, c = make({"history_age": 10.0})
        hub = hub_of(app)
        hub.publish("news", 1)
        c.advance(5)
        hub.publish("news", 2)
        self.assertEqual(len(hub.topics["news"].history), 2)
        c.advance(5)
        self.assertEqual(len(hub.topics["news"].history), 1)
        c.advance(5)
        self.assertEqual(len(hub.topics["news"].history), 0)
        # No subscriber, no history: the topic itself is forgotten after
        # history_age more idle seconds.
        c.advance(9.9)
        self.assertIn("news", hub.topics)
        c.advance(0.2)
        self.assertNotIn("news", hub.topics)

    def test_history_bytes_bound(self) -> None:
        app, c = make({"history_bytes": 2000})
        hub = hub_of(app)
        for n in range(50):
            hub.publish("news", "x" * 300)
        t = hub.topics["news"]
        self.assertLessEqual(t.bytes, 2000)
        self.assertEqual(sum(m.size for m in t.history), t.bytes)

    def test_last_value_mode(self) -> None:
        app, c = make()
        hub = hub_of(app)
        for n in range(3):
            hub.publish("news", n)
        call = c.get("/sub/news?last=1&transport=longpoll")
        self.assertEqual([m["data"] for m in call.json()["messages"]], [2])
        self.assertEqual(call.header("pipecomet-resume"), "last")

    def test_several_topics_on_one_connection(self) -> None:
        app, c = make()
        hub = hub_of(app)
        call = c.get("/sub/a,b")
        hub.publish("a", 1)
        hub.publish("b", 2)
        c.flush()
        evs = data_events(call)
        self.assertEqual([json.loads(e["data"])["topic"] for e in evs], ["a", "b"])
        cursor = evs[-1]["id"]
        self.assertEqual(parse_cursor(cursor, ["a", "b"]),
                         {"a": (hub.topics["a"].epoch, 1), "b": (hub.topics["b"].epoch, 1)})
        c.disconnect(call)
        hub.publish("a", 3)
        again = c.get("/sub/a,b?transport=longpoll", headers={"last-event-id": cursor})
        self.assertEqual([m["data"] for m in again.json()["messages"]], [3])

    def test_shutdown_tells_when_to_reconnect(self) -> None:
        app, c = make()
        sse = c.get("/sub/news")
        lp = c.get("/sub/news?transport=longpoll&since=0")
        app.service.stopService()
        c.flush()
        ev = sse.events()[-1]
        self.assertEqual(ev["event"], "shutdown")
        self.assertGreaterEqual(json.loads(ev["data"])["reconnect_after"], 2.0)
        self.assertTrue(lp.done)
        self.assertIn("shutdown", lp.json())
        self.assertEqual(app.runtime.events.waiters(), 0)
        late = c.get("/sub/news")
        self.assertEqual(late.status, 503)
        self.assertEqual(late.json()["error"]["code"], "shutting_down")


class FarewellCursorTests(SynchronousTestCase):
    """
    The cursor a held stream's last frame carries (``reconnect`` at its
    lifetime, ``shutdown``) is where the client is: the id of the last
    message it got, live or replayed, so that resuming from it gives
    exactly the rest.
    """

    def _frames(self, call: Any, transport: str) -> list[dict[str, Any]]:
        if transport == "sse":
            out = []
            for e in call.events():
                if "data" not in e:
                    continue
                body = json.loads(e["data"])
                name = e.get("event", "message")
                out.append({"event": name, "id": e.get("id"), "fields": body})
            return out
        out = []
        for line in call.lines():
            if "id" in line:
                out.append({"event": line["event"], "id": line["id"], "fields": line["data"]})
            else:
                out.append({"event": line["event"], "id": None, "fields": line})
        return out

    def _delivered(self, frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [f for f in frames if f["id"] is not None and f["event"] == "message"]

    def _headers(self, transport: str) -> dict[str, str]:
        return {"accept": "text/event-stream" if transport == "sse"
                else "application/x-ndjson"}

    def _resume(self, c: MemoryClient, transport: str, cursor: str) -> list[Any]:
        again = c.get("/sub/news?transport=longpoll&since=" + cursor)
        return [m["data"] for m in again.json()["messages"]]

    def check_lifetime_end(self, transport: str, resume_first: bool) -> None:
        app, c = make({"max_lifetime": 0})
        hub = hub_of(app)
        start = ""
        if resume_first:
            # A stream that starts with a replay, then goes on live.
            for n in (-2, -1):
                hub.publish("news", n)
            start = "&since=0"
        call = c.get("/sub/news?timeout=5" + start, headers=self._headers(transport))
        for n in range(3):
            hub.publish("news", n)
        c.flush()
        got = self._delivered(self._frames(call, transport))
        self.assertEqual([f["fields"] for f in got],
                         ([-2, -1] if resume_first else []) + [0, 1, 2])
        c.advance(5.1)
        self.assertTrue(call.done)
        last = self._frames(call, transport)[-1]
        self.assertEqual(last["event"], "reconnect")
        self.assertEqual(last["fields"]["cursor"], got[-1]["id"])
        for n in (3, 4):
            hub.publish("news", n)
        self.assertEqual(self._resume(c, transport, last["fields"]["cursor"]), [3, 4])

    def check_shutdown(self, transport: str) -> None:
        app, c = make()
        hub = hub_of(app)
        call = c.get("/sub/news", headers=self._headers(transport))
        for n in range(3):
            hub.publish("news", n)
        c.flush()
        got = self._delivered(self._frames(call, transport))
        self.assertEqual([f["fields"] for f in got], [0, 1, 2])
        app.service.stopService()
        c.flush()
        last = self._frames(call, transport)[-1]
        self.assertEqual(last["event"], "shutdown")
        self.assertEqual(last["fields"]["cursor"], got[-1]["id"])
        # The server comes back (same process, same history): the client
        # resumes from the shutdown frame's cursor.
        app.service.startService()
        for n in (3, 4):
            hub.publish("news", n)
        self.assertEqual(self._resume(c, transport, last["fields"]["cursor"]), [3, 4])

    def test_sse_lifetime_end_cursor_follows_live_messages(self) -> None:
        self.check_lifetime_end("sse", resume_first=False)

    def test_sse_lifetime_end_cursor_after_replay_and_live(self) -> None:
        self.check_lifetime_end("sse", resume_first=True)

    def test_ndjson_lifetime_end_cursor_follows_live_messages(self) -> None:
        self.check_lifetime_end("ndjson", resume_first=False)

    def test_ndjson_lifetime_end_cursor_after_replay_and_live(self) -> None:
        self.check_lifetime_end("ndjson", resume_first=True)

    def test_sse_shutdown_cursor_follows_live_messages(self) -> None:
        self.check_shutdown("sse")

    def test_ndjson_shutdown_cursor_follows_live_messages(self) -> None:
        self.check_shutdown("ndjson")


class _Owner:
    """
    The subscription side a :class:`FlowControl` talks to, recorded.
    """

    def __init__(self) -> None:
        self.open = True
        self.hub = type("Hub", (), {"stats": CometStats()})()

    def slow(self) -> None:
        raise AssertionError("the drop policy keeps the client")

    def dropped_gaps(self, dropped: dict[str, list[int]]) -> list[bytes]:
        return [b"gap %s %d-%d" % (t.encode(), a, b) for t, (a, b) in dropped.items()]


class DropThenEndTests(SynchronousTestCase):
    def test_last_frames_declare_what_was_dropped(self) -> None:
        """
        A stream that ends while its slow client still has messages
        dropped (``drop`` policy) writes their gap before the queued
        frames: the final frame's cursor is past the dropped ones.
        """
        from pipecomet._comet._flow import FlowControl
        from pipecomet._comet._topics import Message

        owner = _Owner()
        flow = FlowControl(owner, None, 10, True)  # type: ignore[arg-type]
        for n in range(1, 5):
            flow.enqueue(b"frame%d" % n, Message("news", n, f"e:{n}", "message", b"1", 0.0))
        self.assertEqual(owner.hub.stats.dropped, 3)
        self.assertEqual(flow.take(), [b"gap news 1-3", b"frame4"])
        self.assertEqual(flow.take(), [])


class DemoCometTests(SynchronousTestCase):
    def setUp(self) -> None:
        from pipecomet.demo import make_app

        self.clock = make_clock()
        self.app = make_app(reactor=self.clock)
        self.app.service.startService()
        self.addCleanup(self.app.service.stopService)
        self.client = MemoryClient(self.app, self.clock)

    def test_once_mode_job(self) -> None:
        call = self.client.get("/demo/job?seconds=2")
        self.client.advance(1.9)
        self.assertFalse(call.done)
        self.client.advance(0.2)
        self.assertEqual(call.json()["result"], "done")
        bad = self.client.get("/demo/job?seconds=99")
        self.assertEqual((bad.status, bad.json()["error"]["code"]), (400, "bad_seconds"))

    def test_private_topics_need_a_known_app_key(self) -> None:
        call = self.client.get("/comet/private.x?transport=longpoll")
        self.assertEqual((call.status, call.json()["error"]["code"]), (400, "missing_app_key"))
        call = self.client.get("/comet/private.x?transport=longpoll&app_key=nobody")
        self.assertEqual((call.status, call.json()["error"]["code"]), (403, "bad_app_key"))
        call = self.client.get("/comet/private.x?transport=longpoll&app_key=demo-key&since=0")
        self.assertFalse(call.done)  # subscribed: held until a message or its timeout

    def test_ticker_and_page(self) -> None:
        call = self.client.get("/comet/ticker")
        for _ in range(3):
            self.client.advance(1.0)
        ticks = [e for e in call.events() if e.get("event") == "ticker"]
        self.assertEqual([json.loads(e["data"])["n"] for e in ticks], [1, 2, 3])
        page = self.client.get("/demo/comet")
        self.assertEqual(page.status, 200)
        self.assertIn(b"new EventSource", page.body)

    def test_subscribe_authorization_is_a_pipe(self) -> None:
        self.assertEqual(self.client.get("/comet/private.x").status, 400)
        self.assertEqual(self.client.get("/comet/private.x?app_key=nope").status, 403)
        ok = self.client.get("/comet/private.x?app_key=demo-key")
        self.assertEqual(ok.status, 200)

    def test_status_shows_comet_figures(self) -> None:
        self.client.get("/comet/chat")
        status = self.client.get("/_pipecomet/status").json()
        comet = status["comet"]
        self.assertEqual(comet["connections_by_transport"]["sse"], 1)
        self.assertEqual(comet["waiters_by_topic"], {"chat": 1})
        for key in ("published", "delivered", "dropped", "slow_disconnects", "resume_hits",
                    "gaps"):
            self.assertIn(key, comet)
        self.assertEqual(status["events"]["waiters"], 1)
        self.assertEqual(status["bus"]["kind"], "memory")

    def test_publish_with_the_documented_token(self) -> None:
        from pipecomet.demo import PUBLISH_TOKEN

        sub = self.client.get("/comet/chat", headers={"accept": "application/x-ndjson"})
        pub = self.client.post("/_pipecomet/publish/chat", json_body={"text": "hi"},
                               headers={"authorization": f"Bearer {PUBLISH_TOKEN}"})
        self.assertEqual(pub.json()["delivered"], 1)
        self.assertEqual(sub.lines()[-1]["data"], {"text": "hi"})


class BusDropTests(SynchronousTestCase):
    def test_a_broker_drop_is_a_gap_for_every_subscriber(self) -> None:
        app, c = make()
        hub = hub_of(app)
        sse = c.get("/sub/news")
        hello = c.get("/sub/news?transport=longpoll")
        poll = c.get("/sub/news?transport=longpoll&since=" + hello.json()["cursor"])
        hub.bus_down("broker connection lost")
        self.assertFalse(hub.status()["bus_connected"])
        hub.bus_up()
        c.flush()
        gap = [e for e in sse.events() if e.get("event") == "gap"]
        self.assertEqual(json.loads(gap[0]["data"])["reason"], "bus")
        self.assertEqual(poll.json()["events"][0]["reason"], "bus")
        self.assertEqual(hub.status()["bus_drops"], 1)


class CometLimitTests(SynchronousTestCase):
    def error(self, call: Any, status: int, code: str) -> None:
        self.assertEqual(call.status, status)
        self.assertEqual(call.header("content-type"), "application/json")
        err = call.json()["error"]
        self.assertEqual(err["code"], code)
        self.assertTrue(err["message"] and err["id"])

    def test_connection_limits(self) -> None:
        app, c = make({"max_connections": 3, "max_connections_per_topic": 2,
                       "max_topics_per_connection": 2, "max_topics": 4})
        c.get("/sub/a")
        c.get("/sub/a")
        full = c.get("/sub/a")
        self.error(full, 503, "topic_full")
        self.assertIsNotNone(full.header("retry-after"))
        self.error(c.get("/sub/b,c,d"), 400, "too_many_topics_per_connection")
        c.get("/sub/b")
        self.error(c.get("/sub/c"), 503, "too_many_connections")
        self.error(c.get("/sub/bad%20name"), 400, "bad_topic")

    def test_topic_count_limit(self) -> None:
        app, c = make({"max_topics": 2})
        hub = hub_of(app)
        c.get("/sub/a")
        c.get("/sub/b")
        self.error(c.get("/sub/c"), 503, "too_many_topics")
        pub = c.post("/_pipecomet/publish/c", headers={"authorization": f"Bearer {TOKEN}"},
                     data=b"x")
        self.error(pub, 503, "too_many_topics")
        self.assertEqual(len(hub.topics), 2)

    def test_publish_auth_size_and_idempotency(self) -> None:
        app, c = make({"max_message_bytes": 100})
        hub = hub_of(app)
        auth = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
        self.error(c.post("/_pipecomet/publish/news", data=b"1"), 401, "missing_token")
        self.error(c.post("/_pipecomet/publish/news", data=b"1",
                          headers={"authorization": "Bearer wrong"}), 403, "bad_token")
        self.error(c.post("/_pipecomet/publish/news", data=b"x" * 101, headers=auth), 413,
                   "message_too_large")
        self.error(c.post("/_pipecomet/publish/news", data=b"{no", headers=auth), 400,
                   "invalid_json")
        self.error(c.post("/_pipecomet/publish/news?event=gap", data=b"1", headers=auth), 400,
                   "bad_event")
        text = {"authorization": f"Bearer {TOKEN}", "content-type": "text/plain"}
        self.error(c.post("/_pipecomet/publish/news", data=b"caf\xe9", headers=text), 400,
                   "bad_encoding")
        self.error(c.post("/_pipecomet/publish/news", data=b"1",
                          headers={**auth, "idempotency-key": "k" * 201}), 400,
                   "bad_idempotency_key")
        self.assertEqual(hub.stats.published, 0)
        sub = c.get("/sub/news", headers={"accept": "application/x-ndjson"})
        keyed = {**auth, "idempotency-key": "abc"}
        first = c.post("/_pipecomet/publish/news", data=b'{"v":1}', headers=keyed)
        again = c.post("/_pipecomet/publish/news", data=b'{"v":1}', headers=keyed)
        self.assertEqual(first.json()["delivered"], 1)
        self.assertEqual(again.json(), {**first.json(), "delivered": 0, "duplicate": True})
        self.assertEqual([x["data"] for x in sub.lines() if "data" in x], [{"v": 1}])
        self.assertEqual(hub.stats.published, 1)
        c.advance(301)  # the key is forgotten after idempotency_ttl
        third = c.post("/_pipecomet/publish/news", data=b'{"v":1}', headers=keyed)
        self.assertFalse(third.json()["duplicate"])

    def test_publish_disabled_without_token(self) -> None:
        app, c = make({"publish_token": ""})
        self.error(c.post("/_pipecomet/publish/news", data=b"1",
                          headers={"authorization": "Bearer x"}), 403, "publish_disabled")

    def test_config_errors_name_the_key(self) -> None:
        from pipecomet import ConfigError

        with self.assertRaises(ConfigError) as e:
            Config.from_dict({"comet": {"buffer_bytes": 0}})
        self.assertIn("buffer_bytes", str(e.exception))
        with self.assertRaises(ConfigError) as e:
            Config.from_dict({"comet": {"topics": {"x": {"slow_policy": "maybe"}}}})
        self.assertIn("slow_policy", str(e.exception))
        self.assertRaises(ValueError, CometConfig, longpoll_timeout=10, longpoll_max_timeout=5)


class CursorTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        pos = [("a", "ab12", 3), ("b", "cd34", 0)]
        text = format_cursor(pos, False)
        self.assertEqual(parse_cursor(text, ["a", "b"]), {"a": ("ab12", 3), "b": ("cd34", 0)})
        self.assertEqual(parse_cursor("ab12:7", ["a"]), {"a": ("ab12", 7)})
        self.assertEqual(parse_cursor("0", ["a"]), {"a": ("", 0)})
        for bad in ("x", "ab12:-1", "ab12:7,", "AB:1", "a:b:c:d", "ab12:1e3"):
            self.assertRaises(BadRequest, parse_cursor, bad, ["a"])


class CursorEdgeTests(SynchronousTestCase):
    def test_parse_edges(self) -> None:
        self.assertEqual(parse_cursor(" 0 ", ["a", "b"]), {"a": ("", 0), "b": ("", 0)})
        self.assertEqual(parse_cursor("", ["a"]), {"a": ("", 0)})
        self.assertEqual(parse_cursor(" a:ab12:3 , b:cd34:4 ", ["a", "b"]),
                         {"a": ("ab12", 3), "b": ("cd34", 4)})
        self.assertEqual(parse_cursor("z:ab12:1", ["a"]), {})  # other topics are ignored
        self.assertEqual(parse_cursor("ab12:" + "9" * 18, ["a"]), {"a": ("ab12", 10**18 - 1)})
        for bad in ("ab12:" + "9" * 19, "ab12:3", "a:" + "f" * 33 + ":1", "a:ab12:x"):
            with self.assertRaises(BadRequest) as cm:
                parse_cursor(bad, ["a", "b"])
            self.assertEqual(cm.exception.code, "bad_cursor")
            self.assertIn(repr(bad[:80]), cm.exception.message)
        self.assertEqual(parse_cursor("a:" + "f" * 32 + ":1", ["a"]), {"a": ("f" * 32, 1)})

    def test_format(self) -> None:
        self.assertEqual(format_cursor([("a", "ab12", 3)], True), "ab12:3")
        self.assertEqual(format_cursor([("a", "ab12", 3), ("b", "cd", 0)], False),
                         "a:ab12:3,b:cd:0")


class HistoryTests(SynchronousTestCase):
    def test_after_slices_the_history(self) -> None:
        app, c = make({"history_count": 5})
        hub = hub_of(app)
        for n in range(1, 9):  # offsets 1..8, 4..8 kept
            hub.publish("news", n)
        topic = hub.topics["news"]
        self.assertEqual((topic.first_offset, topic.last_offset, topic.evicted), (4, 8, 3))
        offsets = lambda ms: [m.offset for m in ms]  # noqa: E731
        self.assertEqual(offsets(topic.after(0)), [4, 5, 6, 7, 8])
        self.assertEqual(offsets(topic.after(3)), [4, 5, 6, 7, 8])
        self.assertEqual(offsets(topic.after(5)), [6, 7, 8])
        self.assertEqual(offsets(topic.after(5, limit=2)), [6, 7])
        self.assertEqual(offsets(topic.after(0, limit=1)), [4])
        self.assertEqual(topic.after(8), [])
        self.assertEqual(topic.after(9), [])
        self.assertEqual(topic.id_at(6), f"{topic.epoch}:6")

    def test_bytes_bound_and_oversized_messages(self) -> None:
        app, c = make({"history_bytes": 300})
        hub = hub_of(app)
        hub.publish("news", "x" * 100)
        topic = hub.topics["news"]
        size = topic.bytes
        self.assertGreater(size, 100)
        hub.publish("news", "y" * 1000)  # larger than the whole bound: not kept
        self.assertEqual((len(topic.history), topic.bytes, topic.last_offset), (1, size, 2))
        hub.publish("news", "z" * 100)
        hub.publish("news", "w" * 100)
        self.assertLessEqual(topic.bytes, 300)
        kept = [m.offset for m in topic.history]
        self.assertEqual(kept, list(range(5 - len(kept), 5)))  # the newest, oldest dropped
        self.assertEqual(topic.evicted, 4 - len(kept) - 1)  # the oversized one never counted
        self.assertEqual(topic.bytes, sum(m.size for m in topic.history))
        self.assertEqual(hub.status()["history_bytes"], topic.bytes)

    def test_expiry_follows_each_message_age(self) -> None:
        app, c = make({"history_age": 10.0})
        hub = hub_of(app)
        hub.publish("news", 1)
        c.advance(4)
        hub.publish("news", 2)
        topic = hub.topics["news"]
        c.advance(5.9)
        self.assertEqual([m.offset for m in topic.history], [1, 2])
        c.advance(0.1)  # message 1 is 10 s old
        self.assertEqual([m.offset for m in topic.history], [2])
        self.assertEqual(topic.bytes, topic.history[0].size)
        c.advance(3.9)
        self.assertEqual(len(topic.history), 1)
        c.advance(0.1)
        self.assertEqual((len(topic.history), topic.bytes, topic.first_offset), (0, 0, 3))
        self.assertIn("news", hub.topics)  # kept while idle, its epoch with it
        c.advance(10)
        self.assertNotIn("news", hub.topics)

    def test_resume_figures_and_control_events(self) -> None:
        app, c = make({"history_count": 2})
        hub = hub_of(app)
        ids = [self.successResultOf(hub.publish("news", n)).id for n in range(1, 6)]  # 4, 5 kept
        epoch = hub.topics["news"].epoch
        ok = c.get("/sub/news?transport=longpoll", headers={"last-event-id": ids[3]})
        self.assertEqual(ok.json()["messages"][0]["data"], 5)
        gap = c.get("/sub/news?transport=longpoll", headers={"last-event-id": ids[0]})
        self.assertEqual(gap.json()["events"], [{
            "topic": "news", "reason": "expired", "from": f"{epoch}:1",
            "resumed_from": f"{epoch}:3", "missed": 2}])
        self.assertEqual(gap.json()["cursor"], f"{epoch}:5")
        reset = c.get("/sub/news?transport=longpoll&since=beef:2")
        self.assertEqual(reset.json()["events"], [{
            "topic": "news", "reason": "reset", "from": "beef:2", "resumed_from": f"{epoch}:3",
            "epoch": epoch}])
        ahead = c.get("/sub/news?transport=longpoll", headers={"last-event-id": f"{epoch}:9"})
        self.assertEqual(ahead.json()["events"][0]["reason"], "reset")
        self.assertEqual([m["data"] for m in ahead.json()["messages"]], [4, 5])
        status = hub.status()
        self.assertEqual((status["resume_hits"], status["gaps"], status["resets"]), (1, 1, 2))
        several = c.get("/sub/news,other?transport=longpoll&since=0")
        self.assertEqual([m["data"] for m in several.json()["messages"]], [4, 5])
        self.assertEqual(parse_cursor(several.json()["cursor"], ["news", "other"])["news"],
                         (epoch, 5))


# -- random interleavings of publish / disconnect / reconnect

OPS = st.lists(st.one_of(st.tuples(st.just("publish"), st.integers(1, 4)),
                         st.just(("disconnect",)), st.just(("reconnect",)),
                         st.just(("flush",))), max_size=30)


class ResumeProperties(SynchronousTestCase):
    @settings(max_examples=examples("resume"))
    # Small histories make the one-message gap (the cursor's next message
    # just expired) a common case rather than a lucky one.
    @given(ops=OPS, history=st.sampled_from([1, 2, 4, 1000]),
           transport=st.sampled_from(["sse", "ndjson", "longpoll"]))
    def test_exactly_once_or_explicit_gap(self, ops: list[Any], history: int,
                                          transport: str) -> None:
        """
        Whatever the order of publishes, disconnects and reconnects, the
        client receives every message at most once and in order, and every
        message it did not receive is declared by a gap event.
        """
        app, c = make({"history_count": history})
        hub = hub_of(app)
        published: list[int] = []
        received: list[int] = []
        declared_missing = 0
        state: dict[str, Any] = {"call": None, "cursor": None, "seen": 0}

        def read() -> None:
            nonlocal declared_missing
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
                        declared_missing += json.loads(e["data"]).get("missed", 0)
                    elif e.get("event") == "open":
                        continue
                    elif "data" in e:
                        received.append(json.loads(e["data"]))
            elif transport == "ndjson":
                lines = call.lines()[state["seen"]:]
                state["seen"] += len(lines)
                for x in lines:
                    if x.get("event") == "open":
                        state["cursor"] = x["cursor"]
                    elif x.get("event") in ("gap", "reset"):
                        declared_missing += x.get("missed", 0)
                    elif "id" in x:
                        received.append(x["data"])
                        state["cursor"] = x["id"]
            elif call.done:
                body = call.json()
                for e in body["events"]:
                    declared_missing += e.get("missed", 0)
                received.extend(m["data"] for m in body["messages"])
                state["cursor"] = body["cursor"]
                state["call"] = None
                connect()

        def connect() -> None:
            headers = {}
            if state["cursor"] is not None:
                headers["last-event-id"] = state["cursor"]
            q = "?transport=longpoll" if transport == "longpoll" else ""
            if transport == "ndjson":
                headers["accept"] = "application/x-ndjson"
            state["call"] = c.get("/sub/news" + q, headers=headers)
            state["seen"] = 0
            read()

        # The first subscription starts before any publish: from then on
        # nothing may be lost silently.
        hub.publish("other", 0)
        connect()
        for op in ops:
            if op[0] == "publish":
                for _ in range(op[1]):
                    n = len(published) + 1
                    published.append(n)
                    hub.publish("news", n)
            elif op[0] == "disconnect" and state["call"] is not None:
                read()
                if state["call"] is not None and not state["call"].done:
                    c.disconnect(state["call"])
                state["call"] = None
            elif op[0] == "reconnect" and state["call"] is None:
                connect()
            c.flush()
            read()
        if state["call"] is None:
            connect()
        c.flush()
        read()
        self.assertEqual(received, sorted(set(received)))
        self.assertEqual(len(received) + declared_missing, len(published))
        if history == 1000:
            self.assertEqual(received, published)
        app.service.stopService()
        c.flush()
        self.assertEqual(app.runtime.events.waiters(), 0)
        self.assertEqual(app.runtime.events.timers, 0)


class _LaterBus:
    """
    A bus that answers a publish only when the test says so, as a networked
    one answers when its broker does.
    """

    connected = True

    def __init__(self) -> None:
        self.receivers: list[Any] = []
        self.pending: list[tuple[Any, str, str, bytes]] = []

    def publish(self, topic: str, event: str, data: bytes, key: str | None = None) -> Any:
        from twisted.internet.defer import Deferred

        d: Deferred[Any] = Deferred()
        self.pending.append((d, topic, event, data))
        return d

    def deliver(self, delivered: int) -> None:
        from pipecomet._bus import BusDelivery

        d, topic, event, data = self.pending.pop(0)
        # Not a bus that keeps the history: the hubs number the message
        # themselves; the publisher still hears the bus's own report.
        for r in self.receivers:
            r.bus_message(topic, event, data, None)
        d.callback(BusDelivery("e0:7", delivered))

    def add_receiver(self, receiver: Any) -> None:
        self.receivers.append(receiver)

    def remove_receiver(self, receiver: Any) -> None:
        self.receivers.remove(receiver)

    def status(self) -> dict[str, Any]:
        return {}


class StreamSinkTests(SynchronousTestCase):
    """
    The responders are the comet stream sinks; publishing reports what the
    bus reports, whenever it reports it.
    """

    def test_every_responder_is_a_stream_sink(self) -> None:
        from twisted.internet.testing import StringTransport
        from twisted.web.http import HTTPChannel, Request
        from zope.interface.verify import verifyObject

        from pipecomet._comet import IStreamSink
        from pipecomet._responders import RESPONDERS

        transports = {}
        for name, cls in RESPONDERS.items():
            channel = HTTPChannel()
            channel.makeConnection(StringTransport())
            sink = cls(Request(channel))
            self.assertTrue(verifyObject(IStreamSink, sink), name)
            transports[name] = sink.transport
        self.assertEqual(transports, {"json": "longpoll", "longpoll": "longpoll",
                                      "sse": "sse", "ndjson": "ndjson"})

    def test_publish_waits_for_the_bus_and_reports_its_result(self) -> None:
        from pipecomet._comet import CometHub

        clock = Clock()
        bus = _LaterBus()
        hub = CometHub(clock, EventKeeper(clock), bus, CometConfig())
        hub.start()
        d = hub.publish_json("news", b"1")
        self.assertNoResult(d)  # nothing is known before the bus answers
        bus.deliver(3)
        done = self.successResultOf(d)
        self.assertEqual((done.topic, done.id, done.delivered, done.duplicate),
                         ("news", "e0:7", 3, False))
        end = hub.complete("news")
        self.assertNoResult(end)
        bus.deliver(2)
        self.assertEqual(self.successResultOf(end).delivered, 2)

    def test_a_held_stream_answers_a_poll_as_frames_and_ends(self) -> None:
        app, c = make()
        hub = hub_of(app)
        call = c.get("/sub/news", headers={"accept": "text/event-stream"})
        hub.publish("news", {"n": 1})
        sub = next(iter(hub._streams))
        msg = hub.topics["news"].history[-1]
        sub.sink.answer_poll([msg], [{"topic": "news", "reason": "bus", "missed": None}],
                             sub.cursor(), {"end": {"topic": "news", "data": None}}, 1.0)
        c.flush()
        events = call.events()
        self.assertEqual([e.get("event") for e in events],
                         ["open", None, "gap", None, "end"])
        self.assertEqual(events[-1]["retry"], "1000")
        self.assertTrue(call.done)


class SSEWireTests(SynchronousTestCase):
    """
    The one SSE encoder and the one parser (the client's and the test
    helpers') agree, byte by byte and split anywhere.
    """

    def test_encoder_and_parser_round_trip_split_anywhere(self) -> None:
        from pipecomet._sse import HEARTBEAT, SSEParser, encode_event, parse_events

        wire = (encode_event(b'{"a":1}', "open", id="e:0", retry=2.0) + HEARTBEAT
                + encode_event(b'{"n":1}', None, id="e:1")
                + encode_event(b'{"n":2}', "message", id="e:2")
                + encode_event(b'{"x":0}', "gap"))
        self.assertEqual(encode_event(b"1", None, id="e:1"), b"id: e:1\ndata: 1\n\n")
        self.assertEqual(encode_event(b"1", "gap", retry=1.5), b"retry: 1500\nevent: gap\ndata: 1\n\n")
        for cut in range(len(wire)):
            seen: list[tuple[str, str, str | None]] = []
            retries: list[int] = []
            parser = SSEParser(lambda t, d, i: seen.append((t, d, i)), retries.append)
            parser.feed(wire[:cut])
            parser.feed(wire[cut:])
            self.assertEqual(seen, [("open", '{"a":1}', "e:0"), ("message", '{"n":1}', "e:1"),
                                    ("message", '{"n":2}', "e:2"), ("gap", '{"x":0}', "e:2")])
            self.assertEqual(retries, [2000])
        blocks = parse_events(wire + b"data: unfinished")
        self.assertEqual([b.get("event") for b in blocks], ["open", None, "message", "gap"])
        self.assertEqual(blocks[0], {"retry": "2000", "id": "e:0", "event": "open",
                                     "data": '{"a":1}'})
