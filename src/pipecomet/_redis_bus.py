"""
The Redis bus: comet across processes and hosts, with the history in Redis.

Each publish is one Lua script (``redis/publish.lua``, run by EVALSHA) that
checks the idempotency key, advances the topic's offset, appends the message
to the topic's capped stream and PUBLISHes it with its ``epoch:offset`` id
on one channel every serving process listens to.  A process loads a topic
from Redis before serving its first subscriber (and again after a drop), so
a client resumes exactly once on any process or host.  A topic whose keys
are gone (a Redis restart without persistence, eviction, expiry) starts a
new epoch: its subscribers get a ``reset`` event, never a silent loss.

The client is a small RESP2 protocol on Twisted (two connections: commands,
and pub/sub), chosen over txredisapi for three things this bus needs and
that library does not give: a notification when either connection drops
(so the hubs hear ``bus_down`` at once and publishes answer 503), the
order "subscribed, then read the streams" on every reconnect, and a reply
timeout that declares a hung server down; stream commands and
MULTI/EXEC pipelines are plain commands here.
"""

from __future__ import annotations

import os
from collections import deque
from importlib import resources
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeAlias, Union
from urllib.parse import unquote, urlsplit

from twisted.internet.defer import Deferred, FirstError, fail, gatherResults, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint, connectProtocol
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ._bus import BusDelivery, StoredMessage, TopicHistory
if TYPE_CHECKING:
    from ._bus import BusConfig
from ._errors import ServiceUnavailable
from ._interfaces import IBusReceiver, IHistoryBus

__all__ = ["RedisBus", "RedisError", "RespProtocol", "parse_url"]

log = Logger()

_END_EVENT = "pipecomet.end"


class RedisError(Exception):
    """
    An error reply (``-ERR ...``) from Redis.
    """


class _Incomplete(Exception):
    pass


#: A RESP2 reply: bulk or simple string, integer, array, error, or nil.
Reply: TypeAlias = Union[bytes, int, list["Reply"], RedisError, None]

#: A command argument, sent as a bulk string.
Arg: TypeAlias = Union[str, bytes, int, float]

#: ``topic → (history_count, history_age, idempotency_ttl)``.
Limits: TypeAlias = Callable[[str], tuple[int, float, float]]


def _parse(buf: bytes, pos: int) -> tuple[Reply, int]:
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    line = buf[pos + 1:end]
    pos = end + 2
    if kind == 36:  # $ bulk string
        n = int(line)
        if n < 0:
            return None, pos
        if len(buf) < pos + n + 2:
            raise _Incomplete
        return buf[pos:pos + n], pos + n + 2
    if kind == 42:  # * array
        n = int(line)
        if n < 0:
            return None, pos
        out: list[Reply] = []
        for _ in range(n):
            value, pos = _parse(buf, pos)
            out.append(value)
        return out, pos
    if kind == 58:  # : integer
        return int(line), pos
    if kind == 43:  # + simple string
        return line, pos
    if kind == 45:  # - error
        return RedisError(line.decode("utf-8", "replace")), pos
    raise ValueError(f"not a RESP reply: {buf[pos - 1:pos + 20]!r}")


def _bytes(reply: Reply) -> bytes:
    if not isinstance(reply, bytes):
        raise RedisError(f"expected a string reply, got {reply!r:.80}")
    return reply


def _int(reply: Reply) -> int:
    if isinstance(reply, int):
        return reply
    if isinstance(reply, bytes) and reply.lstrip(b"-").isdigit():
        return int(reply)
    raise RedisError(f"expected an integer reply, got {reply!r:.80}")


def _list(reply: Reply) -> list[Reply]:
    if not isinstance(reply, list):
        raise RedisError(f"expected an array reply, got {reply!r:.80}")
    return reply


def encode(args: Sequence[Arg]) -> bytes:
    """
    A command as a RESP array of bulk strings.
    """
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            raw = a.encode("utf-8")
        elif isinstance(a, bytes):
            raw = a
        else:
            raw = str(a).encode("ascii")
        out.append(b"$%d\r\n%b\r\n" % (len(raw), raw))
    return b"".join(out)


class RespProtocol(Protocol):
    """
    One connection to Redis: commands answered in order, and, once
    subscribed, pushed messages handed to ``on_message``.

    :param on_message: called with ``(channel, payload)`` for every pub/sub
        message (subscriber connections only).
    :param on_lost: called once when the connection ends.
    """

    def __init__(self, on_message: Callable[[bytes, bytes], None] | None = None,
                 on_lost: Callable[[Failure | None], None] | None = None) -> None:
        self._buf = b""
        self._waiting: deque[Deferred[Reply]] = deque()
        self.on_message = on_message
        self.on_lost = on_lost
        self.replies = 0

    def command(self, *args: Arg) -> Deferred[Reply]:
        if self.transport is None:
            return fail(_unavailable("not connected to Redis"))
        d: Deferred[Reply] = Deferred()
        self._waiting.append(d)
        self.transport.write(encode(args))
        return d

    def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Deferred[Reply]]:
        """
        Several commands in one write; their Deferreds in order.
        """
        if self.transport is None:
            return [fail(_unavailable("not connected to Redis")) for _ in commands]
        out: list[Deferred[Reply]] = []
        for _ in commands:
            d: Deferred[Reply] = Deferred()
            self._waiting.append(d)
            out.append(d)
        self.transport.write(b"".join(encode(c) for c in commands))
        return out

    def abort(self) -> None:
        """
        Drop the connection at once, unsent data and all (a hung server, a
        reply that is not RESP, the other connection gone).
        """
        tcp = ITCPTransport(self.transport, None)  # TCP and UNIX connections both provide it
        if tcp is not None:
            tcp.abortConnection()
        elif self.transport is not None:
            self.transport.loseConnection()

    @property
    def outstanding(self) -> int:
        return len(self._waiting)

    def dataReceived(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos = 0
        n = len(buf)
        while pos < n:
            try:
                value, pos2 = _parse(buf, pos)
            except _Incomplete:
                break
            except ValueError as e:
                log.error("Redis protocol error: {error}", error=e)
                self.abort()
                return
            pos = pos2
            self._reply(value)
        self._buf = buf[pos:] if pos < n else b""

    def _reply(self, value: Reply) -> None:
        self.replies += 1
        if (self.on_message is not None and type(value) is list and len(value) == 3
                and value[0] == b"message" and isinstance(value[1], bytes)
                and isinstance(value[2], bytes)):
            self.on_message(value[1], value[2])
            return
        if not self._waiting:
            return
        d = self._waiting.popleft()
        if isinstance(value, RedisError):
            d.errback(value)
        else:
            d.callback(value)

    def connectionLost(self, reason: Failure | None = None) -> None:
        waiting, self._waiting = self._waiting, deque()
        for d in waiting:
            d.errback(_unavailable("the connection to Redis was lost"))
        if self.on_lost is not None:
            on_lost, self.on_lost = self.on_lost, None
            on_lost(reason)


def _unavailable(message: str, retry_after: float = 1.0) -> ServiceUnavailable:
    return ServiceUnavailable(message, code="bus_unavailable", retry_after=retry_after)


def parse_url(url: str) -> tuple[str, tuple[str, int] | str, int, str | None]:
    """
    ``redis://[:password@]host[:port][/db]`` or ``unix:///path[?db=N]``
    → ``(kind, address, db, password)``.
    """
    u = urlsplit(url)
    password = unquote(u.password) if u.password else None
    if u.scheme == "redis":
        if not u.hostname:
            raise ValueError(f"url: no host in {url!r}")
        path = u.path.strip("/")
        db = int(path) if path else 0
        return "tcp", (u.hostname, u.port or 6379), db, password
    if u.scheme == "unix":
        db = 0
        for part in u.query.split("&"):
            if part.startswith("db="):
                db = int(part[3:])
        return "unix", u.path, db, password
    raise ValueError(f"url: {url!r} is not redis://host:port/db or unix:///path")


def _script() -> bytes:
    return resources.files("pipecomet").joinpath("redis/publish.lua").read_bytes()


_DOWN, _CONNECTING, _UP = "down", "connecting", "up"


@implementer(IHistoryBus)
class RedisBus:
    """
    Publish/subscribe through one Redis server, the history kept there.

    :param reactor: the reactor connections and timers go through.
    :param config: the ``[bus]`` table (:class:`pipecomet._bus.BusConfig`).
    :param limits: ``topic → (history_count, history_age, idempotency_ttl)``,
        the comet config's bounds for that topic (set by the comet
        installer through :meth:`set_limits`).
    """

    def __init__(self, reactor: Any, config: BusConfig, limits: Limits | None = None) -> None:
        self.reactor = reactor
        self.config = config
        self.kind, self.address, self.db, self.password = parse_url(config.url)
        self.prefix = config.prefix
        self.channel = f"{self.prefix}:bus".encode()
        self._limits = limits or (lambda topic: (1000, 300.0, 300.0))
        self._receivers: list[IBusReceiver] = []
        self._cmd: RespProtocol | None = None
        self._sub: RespProtocol | None = None
        self._state = _DOWN
        self._running = False
        self._retry_call: IDelayedCall | None = None
        self._watchdog: IDelayedCall | None = None
        self._ping_call: IDelayedCall | None = None
        self._backoff = 0.0
        self._sha = b""
        self._script = _script()
        self._ready: list[Deferred[None]] = []
        # figures
        self.published = 0
        self.received = 0
        self.round_trips = 0
        self.connects = 0
        self.drops = 0
        self.failed_publishes = 0
        self.loads = 0
        self.pings = 0
        self.last_error = ""

    def set_limits(self, limits: Limits) -> None:
        self._limits = limits

    @property
    def connected(self) -> bool:
        return self._state == _UP

    # -- lifecycle

    def start(self) -> None:
        """
        Connect (and keep reconnecting with backoff until :meth:`stop`).
        """
        if self._running:
            return
        self._running = True
        self._connect()

    def when_connected(self) -> Deferred[None]:
        """
        A Deferred that fires once the bus is up (at once if it is).
        """
        if self._state == _UP:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._ready.append(d)
        return d

    def stop(self) -> Deferred[None]:
        self._running = False
        for call in (self._retry_call, self._watchdog, self._ping_call):
            if call is not None and call.active():
                call.cancel()
        self._retry_call = self._watchdog = self._ping_call = None
        for conn in (self._cmd, self._sub):
            if conn is not None and conn.transport is not None:
                conn.on_lost = None
                conn.transport.loseConnection()
        self._cmd = self._sub = None
        self._state = _DOWN
        return succeed(None)

    def _endpoint(self) -> IStreamClientEndpoint:
        timeout = self.config.connect_timeout
        if isinstance(self.address, tuple):
            host, port = self.address
            return TCP4ClientEndpoint(self.reactor, host, port, timeout=timeout)
        return UNIXClientEndpoint(self.reactor, self.address, timeout=timeout)

    def _connect(self) -> None:
        self._retry_call = None
        if not self._running:
            return
        self._state = _CONNECTING
        ep = self._endpoint()
        cmd = RespProtocol(on_lost=self._lost)
        sub = RespProtocol(on_message=self._message, on_lost=self._lost)

        def both(_: object) -> Deferred[RespProtocol]:
            return connectProtocol(ep, sub)

        d = connectProtocol(ep, cmd).addCallback(both)
        d.addCallback(lambda _: self._handshake(cmd, sub))
        d.addErrback(self._connect_failed, cmd, sub)

    def _handshake(self, cmd: RespProtocol, sub: RespProtocol) -> Deferred[None]:
        self._cmd, self._sub = cmd, sub
        first: list[Deferred[Reply]] = []
        for conn in (cmd, sub):
            if self.password:
                first.append(conn.command("AUTH", self.password))
            if self.db and conn is cmd:
                first.append(conn.command("SELECT", self.db))
        self._arm_watchdog()
        load = cmd.command("SCRIPT", "LOAD", self._script)
        subscribed = sub.command("SUBSCRIBE", self.channel)
        self._arm_watchdog()

        def up(results: list[Reply]) -> None:
            self._sha = results[-2] if isinstance(results[-2], bytes) else b""
            self._state = _UP
            self._backoff = 0.0
            self.connects += 1
            self.last_error = ""
            self._disarm_watchdog()
            log.info("comet bus: connected to Redis at {url}", url=self.config.url)
            self._ping_call = self.reactor.callLater(self.config.ping_interval, self._ping)
            ready, self._ready = self._ready, []
            for d in ready:
                d.callback(None)
            # Subscribed first, then each hub reads the streams: nothing
            # published from now on can fall between the two.
            for r in tuple(self._receivers):
                r.bus_up()

        return gatherResults([*first, load, subscribed], consumeErrors=True).addCallback(up)

    def _connect_failed(self, f: Failure, cmd: RespProtocol, sub: RespProtocol) -> None:
        error = f.value
        if isinstance(error, FirstError):  # from gatherResults: the command that failed
            error = error.subFailure.value
        self.last_error = str(error) or type(error).__name__
        for conn in (cmd, sub):
            conn.on_lost = None
            conn.abort()
        if self._cmd is cmd:
            self._cmd = self._sub = None
        self._disarm_watchdog()
        self._state = _DOWN
        log.warn("comet bus: cannot reach Redis at {url}: {error}", url=self.config.url,
                 error=self.last_error)
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        if not self._running or self._retry_call is not None:
            return
        self._backoff = min(self.config.reconnect_max,
                            max(self.config.reconnect_min, self._backoff * 2))
        self._retry_call = self.reactor.callLater(self._backoff, self._connect)

    def _lost(self, reason: Failure | None) -> None:
        """
        Either connection ended: both go, the hubs hear it, and we
        reconnect.
        """
        was_up = self._state == _UP
        cmd, sub = self._cmd, self._sub
        self._cmd = self._sub = None
        for conn in (cmd, sub):
            if conn is not None:
                conn.on_lost = None
                conn.abort()
        for call in (self._ping_call,):
            if call is not None and call.active():
                call.cancel()
        self._ping_call = None
        self._disarm_watchdog()
        if self._state == _CONNECTING and not was_up:
            return  # the connect path reports and retries
        self._state = _DOWN
        if was_up:
            self.drops += 1
            why = type(reason.value).__name__ if reason is not None else "no reason"
            self.last_error = f"connection lost ({why})"
            log.warn("comet bus: lost Redis at {url}; reconnecting", url=self.config.url)
            for r in tuple(self._receivers):
                r.bus_down("Redis connection lost")
        self._schedule_retry()

    # -- a hung server counts as down

    def _arm_watchdog(self) -> None:
        if self._watchdog is None or not self._watchdog.active():
            self._watchdog = self.reactor.callLater(self.config.command_timeout, self._hung)
        else:
            self._watchdog.reset(self.config.command_timeout)

    def _disarm_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None

    def _replied(self, value: Reply | Failure) -> Reply | Failure:
        cmd = self._cmd
        if cmd is not None and cmd.outstanding == 0:
            self._disarm_watchdog()
        elif cmd is not None:
            self._arm_watchdog()
        return value

    def _hung(self) -> None:
        self._watchdog = None
        self.last_error = f"no reply within {self.config.command_timeout}s"
        log.warn("comet bus: Redis gave no reply within {t}s: dropping the connection",
                 t=self.config.command_timeout)
        for conn in (self._cmd, self._sub):
            if conn is not None:
                conn.abort()

    def _ping(self) -> None:
        self._ping_call = None
        if self._state != _UP:
            return
        self._ping_call = self.reactor.callLater(self.config.ping_interval, self._ping)
        self.pings += 1
        self._call("PING").addErrback(lambda f: None)

    def _call(self, *args: Arg) -> Deferred[Reply]:
        cmd = self._cmd
        if cmd is None or self._state != _UP:
            return fail(_unavailable("the comet bus (Redis) is unavailable",
                                     self.config.retry_after))
        self.round_trips += 1
        self._arm_watchdog()
        return cmd.command(*args).addBoth(self._replied)

    # -- IBus

    def add_receiver(self, receiver: IBusReceiver) -> None:
        if receiver not in self._receivers:
            self._receivers.append(receiver)
            if self._state == _UP:
                receiver.bus_up()
            else:
                receiver.bus_down("Redis not connected yet")

    def remove_receiver(self, receiver: IBusReceiver) -> None:
        if receiver in self._receivers:
            self._receivers.remove(receiver)

    def _key(self, kind: str, topic: str) -> str:
        # One hash tag per topic keeps a topic's keys in one cluster slot.
        return f"{self.prefix}:{{{topic}}}:{kind}"

    def publish(self, topic: str, event: str, data: bytes,
                key: str | None = None) -> Deferred[BusDelivery]:
        if self._state != _UP:
            self.failed_publishes += 1
            return fail(_unavailable("the comet bus (Redis) is unavailable",
                                     self.config.retry_after))
        if event == _END_EVENT:
            payload = b"\n".join((topic.encode(), b"", event.encode(), b"0", data))
            return self._call("PUBLISH", self.channel, payload).addCallback(
                lambda n: BusDelivery(None, _int(n)))
        count, age, idem_ttl = self._limits(topic)
        keys = (self._key("meta", topic), self._key("stream", topic),
                self._key("key:" + key, topic) if key is not None else "")
        args: tuple[Arg, ...] = (event, data, count, int(age * 1000), max(1, int(idem_ttl)),
                                 self.channel, topic, os.urandom(4).hex(),
                                 max(1, int(self.config.topic_ttl)))

        def done(reply: Reply) -> BusDelivery:
            # The script answers {id, duplicate, receivers}.
            id_, duplicate, receivers = _list(reply)[:3]
            self.published += 1
            return BusDelivery(_bytes(id_).decode("ascii"), _int(receivers), bool(duplicate))

        def noscript(f: Failure) -> Deferred[Reply] | Failure:
            # The script cache was emptied (SCRIPT FLUSH, a failover): once
            # more with the script itself, which also caches it again.
            if isinstance(f.value, RedisError) and str(f.value).startswith("NOSCRIPT"):
                return self._call("EVAL", self._script, 3, *keys, *args)
            return f

        def failed(f: Failure) -> Deferred[BusDelivery] | Failure:
            self.failed_publishes += 1
            if isinstance(f.value, RedisError):
                log.error("comet bus: publish script failed: {error}", error=f.value)
                return fail(_unavailable("the comet bus (Redis) refused the publish",
                                         self.config.retry_after))
            return f

        d = self._call("EVALSHA", self._sha, 3, *keys, *args)
        return d.addErrback(noscript).addCallbacks(done, failed)

    def load(self, topic: str, count: int) -> Deferred[TopicHistory]:
        """
        The topic's epoch and last offset (made now when it has none) and
        its newest ``count`` messages, read atomically (MULTI/EXEC).
        """
        cmd = self._cmd
        if cmd is None or self._state != _UP:
            return fail(_unavailable("the comet bus (Redis) is unavailable",
                                     self.config.retry_after))
        self.loads += 1
        self.round_trips += 1
        meta, stream = self._key("meta", topic), self._key("stream", topic)
        ttl = max(1, int(self.config.topic_ttl))
        epoch = os.urandom(4).hex()
        commands: list[tuple[Arg, ...]] = [
            ("MULTI",),
            ("HSETNX", meta, "epoch", epoch),
            ("HSETNX", meta, "offset", 0),
            ("EXPIRE", meta, ttl),
            ("HMGET", meta, "epoch", "offset"),
            ("XREVRANGE", stream, "+", "-", "COUNT", max(1, count)),
            ("EXEC",),
        ]
        self._arm_watchdog()
        replies = cmd.pipeline(commands)
        for d in replies[:-1]:
            d.addErrback(lambda f: None)  # EXEC carries the outcome

        def read(results: Reply) -> TopicHistory:
            if results is None:
                raise _unavailable("the comet bus (Redis) aborted a read")
            # EXEC's array: HSETNX, HSETNX, EXPIRE, HMGET, XREVRANGE.
            replies = _list(results)
            ep, last = _list(replies[3])[:2]
            msgs = []
            for entry in reversed(_list(replies[4]) if replies[4] is not None else []):
                entry_id, fields = _list(entry)[:2]
                values = [_bytes(v) for v in _list(fields)]
                f = dict(zip(values[::2], values[1::2]))
                msgs.append(StoredMessage(int(_bytes(entry_id).split(b"-")[0]),
                                          f[b"e"].decode("ascii"), f[b"d"],
                                          int(f[b"t"]) / 1000.0))
            return TopicHistory(_bytes(ep).decode("ascii"), _int(last), tuple(msgs))

        return replies[-1].addBoth(self._replied).addCallback(read)

    def _message(self, channel: bytes, payload: bytes) -> None:
        self.received += 1
        try:
            topic, id_, event, _ms, data = payload.split(b"\n", 4)
        except ValueError:
            log.warn("comet bus: malformed message on {channel}", channel=channel)
            return
        t, e = topic.decode("utf-8"), event.decode("ascii")
        mid = id_.decode("ascii") or None
        for r in tuple(self._receivers):
            r.bus_message(t, e, data, None, mid)

    def status(self) -> dict[str, Any]:
        return {"kind": "redis", "url": _redact(self.config.url), "connected": self.connected,
                "state": self._state, "receivers": len(self._receivers),
                "published": self.published, "received": self.received,
                "failed_publishes": self.failed_publishes, "loads": self.loads,
                "round_trips": self.round_trips, "pings": self.pings,
                "connects": self.connects,
                "drops": self.drops, "last_error": self.last_error}


def _redact(url: str) -> str:
    u = urlsplit(url)
    if u.password:
        return url.replace(u.password, "***")
    return url


def probe(url: str, timeout: float) -> str | None:
    """
    Blocking PING of the Redis at ``url``: None when it answers, else why
    not.  For the start only, before the reactor runs.
    """
    import socket

    try:
        kind, address, _db, password = parse_url(url)
    except ValueError as e:
        return str(e)
    family = socket.AF_INET if kind == "tcp" else socket.AF_UNIX
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(address)
            out = encode(("AUTH", password)) if password else b""
            s.sendall(out + encode(("PING",)))
            reply = b""
            while reply.count(b"\r\n") < (2 if password else 1):
                chunk = s.recv(4096)
                if not chunk:
                    return "the connection was closed"
                reply += chunk
    except OSError as e:
        return e.strerror or str(e)
    if b"-" in reply[:1] or b"\r\n-" in reply:
        return reply.decode("utf-8", "replace").strip()
    return None
