"""
The seams of pipecomet that have more than one implementation or that tests
replace, as zope.interface interfaces in one place (those an app uses made
public by :mod:`pipecomet.interfaces`; :class:`IChainSink`, which only
pipecomet's own responders implement, stays internal).  Nothing here imports
the rest of pipecomet at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFDSet,
    IReactorProcess,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
)
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from ._bus import BusDelivery, TopicHistory
    from ._chain import Answer, ChainRun, Stream
    from ._errors import PipecometError
    from ._events import Event
    from ._json import JSON

__all__ = [
    "IBackendReactor",
    "IBodySource",
    "IBus",
    "IBusReceiver",
    "IChainRequest",
    "IChainSink",
    "IEventListener",
    "IHistoryBus",
    "IPipeInput",
    "IPipecometReactor",
]


class IBackendReactor(IReactorTime, IReactorTCP, IReactorThreads):
    """
    What the backend client uses of its reactor: time and timers, TCP
    connections, and calls brought back from ZooKeeper's threads.
    """


class IPipecometReactor(IBackendReactor, IReactorCore, IReactorProcess, IReactorFDSet):
    """
    The reactor an app is given (as Synapse's ``ISynapseReactor``): timed
    calls, threads, TCP, processes.  Unit tests hand in a fake clock that
    provides only the timed calls the code under test uses.
    """


class IBodySource(Interface):
    """
    A request's body as pipes reach it (``PipeInput.body()``, ``form()``,
    ``param()``): read whole by twisted.web already, or parsed lazily while
    it still arrives (``pipecomet._lazy.LazyBody``).
    """

    def body() -> Deferred[bytes]:
        """
        A Deferred of the whole body as bytes.
        """

    def form() -> Deferred[dict[str, list[JSON]]]:
        """
        A Deferred of the body's form fields, ``{name: [values]}``.
        """

    def param(name: str, default: object = ...,
              query: Mapping[str, str] | None = None) -> Deferred[Any]:
        """
        A Deferred of parameter ``name``: from ``query`` when it is there,
        else from the body as soon as that field is complete; fails with
        400 ``missing_parameter`` when the body ends without it and no
        ``default`` is given.
        """


class IChainRequest(Interface):
    """
    The per-request state the chain runner needs beside twisted.web's
    ``IRequest``, reached as Klein reaches ``IKleinRequest``:
    ``IChainRequest(request)``.  pipecomet's own request provides it
    itself; any other ``IRequest`` is adapted (its body read whole).
    """

    def body_source() -> IBodySource:
        """
        Where the request's body is read from.
        """

    def hold_run(run: ChainRun) -> bool:
        """
        Cancel ``run`` (a chain run, ``run.cancel()``) when the client goes,
        without a ``notifyFinish()`` Deferred kept for the life of the
        request.  False when the caller must watch ``notifyFinish()``
        itself.
        """


class IPipeInput(Interface):
    """
    The request as a pipe sees it (``inp`` in ``pipe(inp, ctx, res)``).
    """

    request = Attribute("The underlying twisted.web request (IRequest, IChainRequest).")
    method = Attribute("The method, as text.")
    path = Attribute("The path, as text (no query).")
    path_params = Attribute("Parameters taken from the route's path.")
    query = Attribute("The first value of each query parameter, as text.")
    query_all = Attribute("Every value of every query parameter, as text.")
    headers = Attribute("The request headers (twisted.web Headers).")
    body_source = Attribute("The IBodySource of the request.")

    def header(name: str, default: str | None = None) -> str | None:
        """
        The first value of header ``name`` as text (400 ``bad_header``
        when it is not UTF-8).
        """

    def body() -> Deferred[bytes]:
        """
        A Deferred of the whole body as bytes.
        """

    def form() -> Deferred[dict[str, list[JSON]]]:
        """
        A Deferred of the body's form fields.
        """

    def param(name: str, default: object = ...) -> Deferred[Any]:
        """
        A Deferred of parameter ``name`` from the query, else the body.
        """


class IChainSink(Interface):
    """
    Where a chain run's outcomes go (:class:`pipecomet._chain.ChainRun`):
    the responder of the request (JSON, NDJSON, SSE), or the parent run for
    a fan-out branch.  A run calls :meth:`answer`, :meth:`result`,
    :meth:`error` or :meth:`stream` once, or, with branches, :meth:`part`
    and :meth:`part_error` per result and then :meth:`close`.
    """

    def answer(answer: Answer) -> None:
        """
        A pipe answered at once (:class:`pipecomet.Answer`).
        """

    def result(value: object) -> None:
        """
        The chain ended with ``value``, its last pipe's result.
        """

    def error(error: PipecometError) -> None:
        """
        The chain failed with ``error`` (what the client is told).
        """

    def part(name: str, value: object) -> None:
        """
        With branches: branch ``name`` (or ``"main"``) ended with ``value``.
        """

    def part_error(name: str, error: PipecometError) -> None:
        """
        With branches: branch ``name`` (or ``"main"``) failed with ``error``.
        """

    def close() -> None:
        """
        With branches: the main chain and every branch have ended.
        """

    def stream(stream: Stream) -> None:
        """
        A pipe made the response a long-lived stream: serve it
        (``stream.serve(sink)``), or, a sink that cannot stream, refuse it
        with :func:`pipecomet._chain.refuse_stream` (the stream cancelled,
        500 ``internal_error``).
        """


class IEventListener(Interface):
    """
    What an event of the event keeper runs on its transitions (init →
    invoke (repeatable) / complete / timeout / cancel).
    """

    def on_invoke(event: Event, value: object) -> None:
        """
        The event fired and goes on waiting (comet push).
        """

    def on_complete(event: Event, value: object) -> None:
        """
        The event fired and stops waiting.
        """

    def on_timeout(event: Event) -> None:
        """
        The event's deadline passed.
        """

    def on_cancel(event: Event) -> None:
        """
        The waiter went away (client disconnect).
        """


class Delivery(Protocol):
    """
    What one receiver did with a published message.
    """

    @property
    def id(self) -> str | None: ...

    @property
    def delivered(self) -> int: ...

    @property
    def duplicate(self) -> bool: ...


class IBusReceiver(Interface):
    """
    What a bus delivers to: in pipecomet, the comet hub of one process.
    """

    def bus_message(topic: str, event: str, data: bytes, key: str | None,
                    id: str | None = None) -> BusDelivery | None:
        """
        A message published on ``topic`` reached this process.

        :param event: the event name (``"message"`` by default).
        :param data: the payload as JSON text (UTF-8).
        :param key: the publisher's idempotency key, or None.
        :param id: ``epoch:offset`` when the bus numbers the messages
            itself (a bus that holds the history, :class:`IHistoryBus`);
            None when the receiver numbers them.
        :return: what the publish did in this process (a :class:`Delivery`;
            the in-memory bus passes it back to the publisher), or None.
        """

    def bus_down(reason: str) -> None:
        """
        The bus lost its broker: messages published meanwhile may not
        arrive.  The receiver tells its subscribers (a gap) when it is back.
        """

    def bus_up() -> None:
        """
        The bus is connected (again).
        """


class IBus(Interface):
    """
    Publish/subscribe between the processes and hosts that serve one app.

    The in-memory bus (:class:`pipecomet._bus.MemoryBus`) connects one
    process to itself and is never down; a broker-backed bus (Redis) may
    drop and reconnect, and says so through :meth:`IBusReceiver.bus_down`
    and :meth:`IBusReceiver.bus_up`.
    """

    connected = Attribute("True while messages published now reach every receiver.")

    def publish(topic: str, event: str, data: bytes,
                key: str | None = None) -> Deferred[BusDelivery]:
        """
        Send a message to every receiver (this process included).

        :return: a Deferred of a :class:`pipecomet._bus.BusDelivery` (the
            message's id, how many it reached, whether it was a retry
            already stored) that fires once the bus accepted the message
            (the in-memory bus delivers before it returns and fires at once);
            it fails with a 503 ``bus_unavailable`` when the bus cannot take
            it (broker down).
        """

    def add_receiver(receiver: IBusReceiver) -> None:
        """
        Deliver every message from now on to ``receiver``.
        """

    def remove_receiver(receiver: IBusReceiver) -> None:
        """
        Stop delivering to ``receiver``.
        """

    def status() -> dict[str, JSON]:
        """
        Live figures for ``/_pipecomet/status``.
        """


class IHistoryBus(IBus):
    """
    A bus that numbers the messages and keeps each topic's history itself
    (Redis), so that a client resumes on any process or host.  A receiver
    loads a topic from it before serving the topic's first subscriber, and
    again after the bus comes back from a drop.
    """

    def set_limits(limits: Callable[[str], tuple[int, float, float]]) -> None:
        """
        ``limits(topic)`` → ``(history_count, history_age, idempotency_ttl)``:
        the bounds the bus keeps each topic's history and keys within (the
        comet installer hands in the ``[comet]`` table's).
        """

    def load(topic: str, count: int) -> Deferred[TopicHistory]:
        """
        The topic's epoch, last offset and its newest ``count`` messages.

        :return: a Deferred of a :class:`pipecomet._bus.TopicHistory`.
        """
