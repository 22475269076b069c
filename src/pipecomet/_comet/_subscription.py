"""
One client's subscription to one or more topics, held on its request: its
lifecycle, its answers as a long-poll, and what it streams.

The wire format is its sink's (:class:`~pipecomet._comet.IStreamSink`, the
responder the client chose); its writes go through its
:class:`~pipecomet._comet._flow.FlowControl`; its cursor is read by
:func:`~pipecomet._comet._resume.resolve`.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Sequence, cast

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from .._chain import Stream, as_pipecomet_error
from .._events import Event, EventListener
from ._flow import FlowControl
from ._interfaces import IStreamSink
from ._resume import resolve
from ._topics import Message, Topic, format_cursor

if TYPE_CHECKING:
    from ._hub import CometHub

__all__ = ["Subscription", "End"]

log = Logger()

#: Steps of a stream's lifetime jitter (see ``Subscription._lifetime``).
JITTER_STEPS = 64


class End(dict[str, Any]):
    """
    The value an end event completes subscriptions with: ``topic`` and
    ``data``.
    """


class Subscription(Stream, EventListener):
    """
    One client's subscription to one or more topics, held on its request.

    Made by :meth:`CometHub.subscription` (checks and parameters), served
    through the sink its responder gives (:meth:`serve`): ``sse`` and
    ``ndjson`` stream, a long-poll answers once.  It is the event listener
    of its :class:`~pipecomet._events.Event`.

    :ivar transport: ``sse``, ``ndjson`` or ``longpoll`` once served.
    :ivar open: True from :meth:`serve` until the subscription ends.
    :ivar resume: how the cursor resumed (``live``, ``last``, ``ok``,
        ``gap``, ``reset``).
    """

    __slots__ = ("hub", "request", "topics", "cursors", "last", "timeout", "transport",
                 "sink", "event", "flow", "open", "pos", "objs", "_ended", "started", "resume")

    def __init__(self, hub: CometHub, request: IRequest, topics: Sequence[str],
                 cursors: dict[str, tuple[str, int]] | None, last: bool,
                 timeout: float | None) -> None:
        self.hub = hub
        self.request = request
        self.topics = topics
        self.cursors = cursors
        self.last = last
        self.timeout = timeout
        self.transport = ""
        self.sink: IStreamSink | None = None
        self.event: Event | None = None
        self.flow: FlowControl | None = None
        self.open = False
        # Offsets reached per topic, in the order of ``objs``.
        self.pos: list[int] = []
        self.objs: tuple[Topic, ...] = ()
        # Fires when the subscription has ended (see when_done).
        self._ended: Deferred[None] | None = None
        self.started = False
        self.resume = "live"

    # -- Stream

    def when_done(self) -> Deferred[None]:
        if self._ended is None:
            self._ended = Deferred()
            if self.started and not self.open:
                self._ended.callback(None)
        return self._ended

    def cancel(self) -> None:
        """
        The client went away: let go of everything now.
        """
        self._close(None)

    def serve(self, sink: IStreamSink) -> None:
        """
        Start serving through ``sink``, the responder of the request.
        """
        self.sink = sink
        self.transport = sink.transport
        self.started = True
        self.open = True
        self.hub.opened(self)
        try:
            loading = self.hub.load_topics(self.objs)
        except Exception as e:
            self._serve_error(e)
            return
        if loading is not None:
            loading.addCallbacks(lambda _: self._serve_now() if self.open else None,
                                 lambda f: self._serve_error(f.value) if self.open else None)
            return
        self._serve_now()

    def _serve_now(self) -> None:
        try:
            resumed = resolve(self.objs, self.cursors, self.last)
            self.pos = resumed.positions
            self.resume = resumed.status
            self.hub.stats.count_resume(resumed.status)
            if self.transport == "longpoll":
                self._serve_longpoll(resumed.replay, resumed.control)
            else:
                self._serve_stream(resumed.replay, resumed.control)
            self.cursors = None  # resolved: the positions are in ``pos`` now
        except Exception as e:
            self._serve_error(e)

    def _serve_error(self, e: BaseException) -> None:
        error = as_pipecomet_error(e, "comet subscription")
        self._close(None)
        assert self.sink is not None
        self.sink.fail(error)

    # -- positions

    def cursor(self) -> str:
        """
        Where this subscription is now, as a cursor to resume from.
        """
        objs = self.objs
        if len(objs) == 1:
            return f"{objs[0].epoch}:{self.pos[0]}"
        return format_cursor([(t.name, t.epoch, o) for t, o in zip(self.objs, self.pos)],
                             len(self.objs) == 1)

    def set_pos(self, topic: str, offset: int) -> None:
        """
        ``topic`` has reached ``offset`` on this subscription.
        """
        objs = self.objs
        if len(objs) == 1:
            self.pos[0] = offset
            return
        for i, t in enumerate(objs):
            if t.name == topic:
                self.pos[i] = offset
                return

    # -- long-poll

    def _serve_longpoll(self, replay: list[Message], control: list[dict[str, Any]]) -> None:
        sink = self.sink
        assert sink is not None
        sink.start(self.cursor(), self.resume, self.hub.config.retry)
        # A first poll without a cursor answers at once with one (the
        # handshake): held without it, a poll cut before its answer would
        # leave the client nowhere to resume from.
        if replay or control or self.cursors is None:
            batch = replay[: self.hub.config.longpoll_batch]
            for m in batch:
                self.set_pos(m.topic, m.offset)
            self.answer_poll(batch, control)
            return
        timeout = self.timeout if self.timeout is not None else self.hub.config.longpoll_timeout
        sink.hold()
        self.event = self.hub.keeper.listen(self._keys(), self, timeout, many=True)

    def answer_poll(self, batch: list[Message], control: list[dict[str, Any]],
                    extra: dict[str, Any] | None = None,
                    retry_after: float | None = None) -> None:
        """
        Answer the long-poll with ``batch`` and ``control`` events and end.
        """
        self._release()
        assert self.sink is not None
        self.sink.answer_poll(batch, control, self.cursor(), extra, retry_after)
        self._signal_ended()

    # -- streams

    def _serve_stream(self, replay: list[Message], control: list[dict[str, Any]]) -> None:
        sink = self.sink
        assert sink is not None
        hub = self.hub
        if not sink.start(self.cursor(), self.resume, hub.config.retry):
            self._close(None)  # the client left before we started
            return
        for ev in control:
            self.send(sink.control("reset" if ev["reason"] == "reset" else "gap", ev))
        single = len(self.objs) == 1
        for m in replay:
            if single:
                self.send(sink.message(m, None), m)
            else:
                self.set_pos(m.topic, m.offset)
                self.send(sink.message(m, self.cursor()), m)
        if single and replay:
            self.pos[0] = replay[-1].offset
        if not self.open:  # cut off while replaying
            return
        self.event = hub.keeper.listen(self._keys(), self, self._lifetime(), many=True)
        hub.streaming(self)

    def _keys(self) -> tuple[tuple[str, str], ...]:
        """
        The keeper's keys of the topics (one topic's is shared by all its
        subscribers).
        """
        objs = self.objs
        if len(objs) == 1:
            return objs[0].keys
        return tuple(t.key for t in objs)

    def _lifetime(self) -> float | None:
        cfg = self.hub.config
        life = cfg.max_lifetime or None
        if life is not None:
            # The jitter in 64 steps: streams of one step share a timed call
            # in the keeper (its lanes), and they still come back spread.
            life *= 1.0 - cfg.lifetime_jitter * random.randint(0, JITTER_STEPS) / JITTER_STEPS
        if self.timeout is not None:
            life = self.timeout if life is None else min(life, self.timeout)
        return life

    def send(self, data: bytes, msg: Message | None = None) -> None:
        """
        Send a frame on the stream (queued while the client is not reading).
        """
        if not self.open:
            return
        flow = self.flow
        if flow is not None:
            flow.send(data, msg)
            return
        sink = self.sink
        if sink is None or not sink.held or sink.write(data):
            return
        # The client stopped reading: from now on the frames go through
        # flow control (a client that keeps up never needs it).
        flow = self.flow = FlowControl(self, sink, self.hub.config.buffer_bytes,
                                       all(t.limits.drop for t in self.objs))
        flow.backpressure()
        flow.enqueue(data, msg)

    def send_control(self, name: str, fields: dict[str, Any]) -> None:
        """
        Send the control event ``name`` on the stream.
        """
        if self.open and self.sink is not None:
            self.send(self.sink.control(name, fields))

    def heartbeat(self) -> None:
        if self.sink is not None:
            self.send(self.sink.heartbeat())

    def buffered(self) -> int:
        """
        Bytes waiting for this client: queued here and in the socket.
        """
        if self.flow is not None:
            return self.flow.buffered()
        return self.sink.pending() if self.sink is not None else 0

    @property
    def queued(self) -> int:
        """
        Bytes queued here while the client is not reading.
        """
        return self.flow.queued if self.flow is not None else 0

    def slow(self) -> None:
        """
        Past ``buffer_bytes`` of queue with the ``disconnect`` policy: cut
        the client off.
        """
        self.hub.stats.slow_disconnects += 1
        log.info("comet client too slow ({queued} bytes queued): disconnected",
                 queued=self.queued)
        sink = self.sink
        self._close(None)
        if sink is not None:
            sink.abort()

    def dropped_gaps(self, dropped: dict[str, list[int]]) -> list[bytes]:
        """
        The ``gap`` frames of messages dropped while the client was slow.
        """
        out = []
        for topic, (a, b) in dropped.items():
            t = self.hub.topics.get(topic)
            if t is not None and self.sink is not None:
                out.append(self.sink.control("gap", {
                    "topic": topic, "reason": "slow", "from": t.id_at(a - 1),
                    "to": t.id_at(b), "missed": b - a + 1}))
        return out

    # -- EventListener

    def on_invoke(self, event: Event, value: object) -> None:
        # The topics' keys are fired with their messages only.
        msg = cast(Message, value)
        if self.transport == "longpoll":
            event.complete(msg)
            return
        sink = self.sink
        assert sink is not None
        if len(self.objs) == 1:
            # The frame is shared and carries the message's own id; the
            # position still moves, for the cursor of a reconnect or
            # shutdown frame.
            self.pos[0] = msg.offset
            self.send(sink.message(msg, None), msg)
        else:
            self.set_pos(msg.topic, msg.offset)
            self.send(sink.message(msg, self.cursor()), msg)

    def on_complete(self, event: Event, value: object) -> None:
        if isinstance(value, Message):  # a long-poll answered by a publish
            self.set_pos(value.topic, value.offset)
            self.answer_poll([value], [])
            return
        # The end event: the topic is over.
        end = cast(End, value)
        fields = {"topic": end.get("topic"), "data": end.get("data")}
        if self.transport == "longpoll":
            self.answer_poll([], [], {"end": fields})
        else:
            assert self.sink is not None
            self._close(self.sink.control("end", fields))

    def on_timeout(self, event: Event) -> None:
        if self.transport == "longpoll":
            self.answer_poll([], [])
            return
        cfg = self.hub.config
        self.hub.stats.lifetime_ends += 1
        assert self.sink is not None
        self._close(self.sink.control("reconnect", {"reconnect_after": cfg.retry,
                                                    "cursor": self.cursor()}, retry=cfg.retry))

    def on_cancel(self, event: Event) -> None:
        pass

    # -- ending

    def shutdown(self, reconnect_after: float) -> None:
        """
        The server is stopping: tell the client when to come back, then close.
        """
        if not self.open:
            return
        if self.transport == "longpoll":
            self.answer_poll([], [], {"shutdown": {"reconnect_after": reconnect_after}},
                             retry_after=reconnect_after)
            return
        assert self.sink is not None
        self._close(self.sink.control("shutdown", {"reconnect_after": reconnect_after,
                                                   "cursor": self.cursor()},
                                      retry=reconnect_after))

    def _release(self) -> None:
        if not self.open:
            return
        self.open = False
        if self.event is not None:
            self.event.cancel()
        self.hub.closed(self)

    def _close(self, final: bytes | None) -> None:
        """
        End the subscription; with ``final``, write it (after anything
        queued) and finish the response.
        """
        if not self.open:
            return
        self._release()
        flow, self.flow = self.flow, None
        queued: list[bytes] = []
        if flow is not None:
            flow.release()
            queued = flow.take()
        sink = self.sink
        if final is not None and sink is not None and sink.held and not sink.gone():
            if queued:
                sink.write_through(queued)
            sink.end(final)
        self._signal_ended()

    def _signal_ended(self) -> None:
        d = self._ended
        if d is not None and not d.called:
            d.callback(None)
