"""
The EventKeeper: requests that wait for external events (the seed's
condition pipes).

An :class:`Event` is one waiter tied to one or more keys.  Its lifecycle is
the seed's: ``init`` → ``invoke`` (repeatable) → ``complete`` or
``timeout``, plus ``cancelled`` when its client goes away.  Active
transitions come from the outside (:meth:`EventKeeper.fire`,
:meth:`EventKeeper.complete`) and run the event's listener at once; the
passive one, the timeout, is a timed call on the reactor: nothing is ever
scanned or polled.  Waiters with the same timeout expire in the order they
came, so they share one timed call (a :class:`_Lane`): ten thousand
long-polls held for the same 30 s cost one ``DelayedCall``, not ten
thousand.  Leaving the waiting states removes the event from every key and
from its lane, so a finished event holds nothing.

:class:`Condition` is the pipe that waits: in ``once`` mode it returns a
Deferred that the first firing of its key completes (an async backend that
answers later: the seed's Push & Complete); in ``many`` mode it returns a
comet subscription (see :mod:`pipecomet._comet`), fired by every publish on
its topics until an end event, a timeout or the client leaving.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Union, cast

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ._errors import GatewayTimeout
from ._interfaces import IEventListener

if TYPE_CHECKING:
    from ._chain import PipeContext, PipeInput, PipeResult
    from ._comet import Subscription

__all__ = [
    "EventState",
    "EventAction",
    "InvalidTransition",
    "Event",
    "EventListener",
    "EventKeeper",
    "Condition",
    "TRANSITIONS",
]

log = Logger()


class EventState(enum.Enum):
    # Members are singletons: hashing them by identity (in C) instead of
    # Enum's hash of the name (in Python) makes the transition table's
    # lookups cheap; equality is identity already.
    __hash__ = object.__hash__

    INIT = "init"
    INVOKE = "invoke"
    COMPLETE = "complete"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


class EventAction(enum.Enum):
    __hash__ = object.__hash__

    INVOKE = "invoke"
    COMPLETE = "complete"
    TIMEOUT = "timeout"
    CANCEL = "cancel"


_S, _A = EventState, EventAction

#: (state, action) → next state.  Anything else is an :class:`InvalidTransition`.
TRANSITIONS: dict[tuple[EventState, EventAction], EventState] = {
    (_S.INIT, _A.INVOKE): _S.INVOKE,
    (_S.INVOKE, _A.INVOKE): _S.INVOKE,
    (_S.INIT, _A.COMPLETE): _S.COMPLETE,
    (_S.INVOKE, _A.COMPLETE): _S.COMPLETE,
    (_S.INIT, _A.TIMEOUT): _S.TIMEOUT,
    (_S.INVOKE, _A.TIMEOUT): _S.TIMEOUT,
    (_S.INIT, _A.CANCEL): _S.CANCELLED,
    (_S.INVOKE, _A.CANCEL): _S.CANCELLED,
}

#: States an event waits in (it is registered under its keys).
WAITING = frozenset({_S.INIT, _S.INVOKE})


class InvalidTransition(RuntimeError):
    """
    An action that the event's state does not allow (e.g. invoking a
    completed event).
    """


@implementer(IEventListener)
class EventListener:
    """
    What an event runs on its transitions.  Subclass and override; the
    defaults do nothing.
    """

    __slots__ = ()

    def on_invoke(self, event: Event, value: object) -> None: ...
    def on_complete(self, event: Event, value: object) -> None: ...
    def on_timeout(self, event: Event) -> None: ...
    def on_cancel(self, event: Event) -> None: ...


class Event:
    """
    One waiter: its keys, its state, its listener and its deadline.

    Made by :meth:`EventKeeper.listen`; driven by the keeper and by the
    timed call of its lane (``timer``: the :class:`_Lane` of its timeout,
    None without a deadline).
    """

    __slots__ = ("keeper", "keys", "listener", "state", "timer", "invocations", "__weakref__")

    def __init__(self, keeper: EventKeeper, keys: tuple[Hashable, ...],
                 listener: EventListener) -> None:
        self.keeper = keeper
        self.keys = keys
        self.listener = listener
        self.state = EventState.INIT
        self.timer: _Lane | None = None
        self.invocations = 0

    def __repr__(self) -> str:
        return f"<Event {self.keys!r} {self.state.value}>"

    @property
    def waiting(self) -> bool:
        return self.state in WAITING

    def _move(self, action: EventAction) -> None:
        try:
            self.state = TRANSITIONS[self.state, action]
        except KeyError:
            raise InvalidTransition(f"cannot {action.value} an event in state "
                                    f"{self.state.value}") from None

    def invoke(self, value: object = None) -> None:
        """
        Run the listener once and keep waiting.
        """
        self._move(EventAction.INVOKE)
        self.invocations += 1
        self.keeper.invoked += 1
        self.listener.on_invoke(self, value)

    def complete(self, value: object = None) -> None:
        """
        Run the listener once and stop waiting.
        """
        self._move(EventAction.COMPLETE)
        self.keeper._release(self)
        self.keeper.completed += 1
        self.listener.on_complete(self, value)

    def cancel(self) -> None:
        """
        Stop waiting without running anything but ``on_cancel``; a no-op
        once the event has ended.
        """
        if self.state not in WAITING:
            return
        self._move(EventAction.CANCEL)
        self.keeper._release(self)
        self.keeper.cancelled += 1
        self.listener.on_cancel(self)

    def _timed_out(self) -> None:
        if self.state not in WAITING:
            return
        self._move(EventAction.TIMEOUT)
        self.keeper._release(self)
        self.keeper.timed_out += 1
        self.listener.on_timeout(self)

    def reschedule(self, timeout: float | None) -> None:
        """
        Move the deadline to ``timeout`` seconds from now (None: no deadline).
        """
        keeper = self.keeper
        keeper._disarm(self)
        if timeout is not None and self.state in WAITING:
            keeper._arm(self, timeout)


class _Lane:
    """
    The waiters of one timeout, oldest first: their deadlines come in the
    order they were armed, so one timed call, at the first deadline, serves
    them all.

    :ivar wait: the timeout, in seconds.
    :ivar events: each waiter and its deadline, oldest first.
    :ivar call: the timed call at (or before) the oldest deadline.
    """

    __slots__ = ("wait", "events", "call")

    def __init__(self, wait: float) -> None:
        self.wait = wait
        self.events: OrderedDict[Event, float] = OrderedDict()
        self.call: IDelayedCall | None = None


class _OnceListener(EventListener):
    """
    Turns an event into a Deferred: the first firing completes it.
    """

    __slots__ = ("deferred", "timeout_value", "event")

    def __init__(self, timeout_value: object) -> None:
        self.deferred: Deferred[object] = Deferred(self._cancelled)
        self.timeout_value = timeout_value
        self.event: Event | None = None

    def _cancelled(self, d: Deferred[object]) -> None:
        # Deferred.cancel() on a waiter: the event lets go of its keys.
        if self.event is not None:
            self.event.cancel()

    def on_invoke(self, event: Event, value: object) -> None:
        event.complete(value)

    def on_complete(self, event: Event, value: object) -> None:
        if not self.deferred.called:
            self.deferred.callback(value)

    def on_timeout(self, event: Event) -> None:
        if self.deferred.called:
            return
        tv = self.timeout_value
        if isinstance(tv, BaseException):
            self.deferred.errback(tv)
        elif callable(tv):
            try:
                self.deferred.callback(tv())
            except BaseException as e:
                self.deferred.errback(e)
        else:
            self.deferred.callback(tv)

    def on_cancel(self, event: Event) -> None:
        if not self.deferred.called:
            self.deferred.errback(CancelledError())


class EventKeeper:
    """
    Keeps the waiting events by key.

    ``fire``, ``complete`` and ``timeout`` are the seed's active and passive
    transitions; each returns how many waiters it reached.

    :param reactor: gives ``callLater`` for deadlines (a ``Clock`` in tests).
    """

    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor
        self._by_key: dict[Hashable, dict[Event, None]] = {}
        # Deadlines by timeout (see _Lane).
        self._lanes: dict[float, _Lane] = {}
        self.timers = 0
        self.events = 0
        self.invoked = 0
        self.completed = 0
        self.timed_out = 0
        self.cancelled = 0

    # -- waiting

    def listen(self, keys: Hashable | Iterable[Hashable], listener: EventListener,
               timeout: float | None = None, *, many: bool = False) -> Event:
        """
        Register a waiter on ``keys`` (one key, or several with ``many=True``
        and an iterable) with a deadline ``timeout`` seconds from now.
        """
        # With many=True ``keys`` is an iterable of keys (a str key is
        # iterable too: only the caller knows which it meant).
        ks: tuple[Hashable, ...] = (tuple(cast(Iterable[Hashable], keys)) if many
                                    else (cast(Hashable, keys),))
        event = Event(self, ks, listener)
        for k in ks:
            waiters = self._by_key.get(k)
            if waiters is None:
                waiters = self._by_key[k] = {}
            waiters[event] = None
        self.events += 1
        if timeout is not None:
            self._arm(event, timeout)
        return event

    def wait(self, key: Hashable, timeout: float | None = None, *,
             on_timeout: object = None) -> Deferred[object]:
        """
        A Deferred that fires with the value of the next :meth:`fire` or
        :meth:`complete` of ``key`` (the "once" mode).  Cancelling it lets go
        of the key at once.

        :param on_timeout: what the Deferred gives when ``timeout`` passes:
            an exception instance fails it (default: 504 ``GatewayTimeout``),
            a callable's result or any other value is its result.
        """
        if on_timeout is None:
            on_timeout = GatewayTimeout(f"no event for {key!r} within {timeout}s",
                                        code="event_timeout")
        listener = _OnceListener(on_timeout)
        event = self.listen(key, listener, timeout)
        listener.event = event
        return listener.deferred

    # -- firing

    def fire(self, key: Hashable, value: object = None) -> int:
        """
        Invoke every waiter of ``key`` with ``value`` (a once-mode waiter
        completes).  Returns the number of waiters reached.
        """
        return self._reach(key, "invoke", value)

    invoke = fire

    def complete(self, key: Hashable, value: object = None) -> int:
        """
        Complete every waiter of ``key`` (the end event).  Returns the
        number of waiters reached.
        """
        return self._reach(key, "complete", value)

    def _reach(self, key: Hashable, transition: str, value: object) -> int:
        waiters = self._by_key.get(key)
        if not waiters:
            return 0
        reached = 0
        for event in tuple(waiters):
            if event.state in WAITING:
                reached += 1
                try:
                    getattr(event, transition)(value)
                except Exception:
                    log.failure("listener of {key!r} failed on {transition}", key=key,
                                transition=transition)
        return reached

    # -- books

    def _arm(self, event: Event, timeout: float) -> None:
        lane = self._lanes.get(timeout)
        if lane is None:
            lane = self._lanes[timeout] = _Lane(timeout)
        lane.events[event] = self.reactor.seconds() + timeout
        event.timer = lane
        self.timers += 1
        if lane.call is None:
            lane.call = self.reactor.callLater(timeout, self._expire, lane)

    def _disarm(self, event: Event) -> None:
        lane = event.timer
        if lane is None:
            return
        event.timer = None
        self.timers -= 1
        del lane.events[event]
        if not lane.events:
            # (A lane whose first waiter left keeps its call: when it
            # comes, it moves on to the next deadline.)
            self._drop(lane)

    def _drop(self, lane: _Lane) -> None:
        if lane.call is not None:
            lane.call.cancel()
            lane.call = None
        if self._lanes.get(lane.wait) is lane:
            del self._lanes[lane.wait]

    def _expire(self, lane: _Lane) -> None:
        """
        The timed call of ``lane``: time out its waiters whose deadline
        has come, oldest first, then wait for the next one.
        """
        lane.call = None
        events = lane.events
        now = self.reactor.seconds()
        while events:
            event = next(iter(events))
            deadline = events[event]
            if deadline > now:
                if lane.call is not None:
                    # A listener armed a waiter here meanwhile: its call is
                    # for a later deadline than this one's.
                    lane.call.cancel()
                lane.call = self.reactor.callLater(deadline - now, self._expire, lane)
                return
            del events[event]
            event.timer = None
            self.timers -= 1
            try:
                event._timed_out()
            except Exception:
                log.failure("listener of {keys!r} failed on timeout", keys=event.keys)
        self._drop(lane)

    def _release(self, event: Event) -> None:
        for k in event.keys:
            waiters = self._by_key.get(k)
            if waiters is not None:
                waiters.pop(event, None)
                if not waiters:
                    del self._by_key[k]
        if event.timer is not None:
            self._disarm(event)
        self.events -= 1

    def waiters(self, key: Hashable | None = None) -> int:
        """
        Waiting events on ``key``, or in all when None.
        """
        if key is None:
            return self.events
        return len(self._by_key.get(key, ()))

    def keys(self) -> list[Hashable]:
        return list(self._by_key)

    def status(self) -> dict[str, Any]:
        return {
            "waiters": self.events,
            "keys": len(self._by_key),
            "timers": self.timers,
            "invoked": self.invoked,
            "completed": self.completed,
            "timed_out": self.timed_out,
            "cancelled": self.cancelled,
        }


#: A condition's key function: ``key(inp, ctx, res)`` gives the event key
#: (once mode), or the topic or topics (many mode).
KeyFunction = Callable[["PipeInput", "PipeContext", "PipeResult"], object]

#: What a :class:`Condition` is given as its key: a key or topic (a
#: ``{name}`` in a string is filled from the path and query parameters),
#: topics, or a key function.
ConditionKey = Union[Hashable, Iterable[str], KeyFunction]


def _key_of(key: ConditionKey) -> KeyFunction:
    if callable(key):
        return cast(KeyFunction, key)
    if isinstance(key, str) and "{" in key:
        def fmt(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> str:
            return key.format(**inp.path_params, **inp.query)
        return fmt
    return lambda inp, ctx, res: key


@attrs.frozen
class Condition:
    """
    A condition pipe: the request waits here for external events.

    :param key: in ``once`` mode the event key; in ``many`` mode the topic
        or topics.  A string (``{name}`` is filled from path and query
        parameters) or ``key(inp, ctx, res)``.
    :param mode: ``"once"``: the pipe's result is the value of the first
        :meth:`EventKeeper.fire` of the key and the chain goes on;
        ``"many"``: the response becomes a comet stream of the topics
        (SSE, long-poll or NDJSON by the route's responders).
    :param timeout: seconds to wait in ``once`` mode (then 504
        ``event_timeout``, or ``on_timeout``); ``many`` mode takes its
        timeouts from the transport and the ``[comet]`` table.
    :param on_timeout: ``once`` mode: the result (or exception) on timeout.
    """

    key: ConditionKey
    mode: str = attrs.field(default="once", validator=attrs.validators.in_(("once", "many")))
    timeout: float | None = None
    name: str = "condition"
    # An exception instance, a callable, or the value itself.
    on_timeout: object = None
    _key: KeyFunction = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_key", _key_of(self.key))

    @property
    def __name__(self) -> str:  # Pipe() names a plain callable after it
        return self.name

    def __call__(self, inp: PipeInput, ctx: PipeContext,
                 res: PipeResult) -> Deferred[object] | Subscription:
        runtime = ctx.runtime
        keeper = runtime.events if runtime is not None else None
        if keeper is None:
            raise RuntimeError("condition pipe used but no event keeper is installed")
        key = self._key(inp, ctx, res)
        if self.mode == "once":
            return keeper.wait(cast(Hashable, key), self.timeout, on_timeout=self.on_timeout)
        hub = runtime.comet
        if hub is None:
            raise RuntimeError("many-mode condition used but no comet hub is installed")
        topics = [key] if isinstance(key, str) else list(cast(Iterable[str], key))
        return hub.subscription(inp, topics)
