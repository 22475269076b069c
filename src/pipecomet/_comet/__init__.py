"""
Comet push: topics with bounded history, subscriptions served as SSE,
long-poll or NDJSON, resume without loss, flow control, publishing.

The package, part by part:

- :mod:`~pipecomet._comet._config`: the ``[comet]`` table, topic and event
  names, the reserved event names;
- :mod:`~pipecomet._comet._topics`: messages, topics and their bounded
  history, cursors (``epoch:offset``);
- :mod:`~pipecomet._comet._resume`: a cursor read against the histories
  (replay, ``gap``, ``reset``);
- :mod:`~pipecomet._comet._subscription`: one held request (lifecycle,
  long-poll answers, what a stream sends);
- :mod:`~pipecomet._comet._flow`: a stream's flow control (queue, push
  producer, slow clients);
- :mod:`~pipecomet._comet._interfaces`: :class:`IStreamSink`, the seam to
  the wire, which the responders (:mod:`pipecomet._responders`) implement:
  SSE, NDJSON, long-poll;
- :mod:`~pipecomet._comet._hub`: the hub of one process (the registry of
  topics and subscriptions, heartbeats and the farewell at shutdown, the
  bus's receiver, publishing through the bus);
- :mod:`~pipecomet._comet._admission`: whether a request may subscribe and
  what it asks for (topics, cursor, ``last=``, ``timeout=``);
- :mod:`~pipecomet._comet._publishing`: a publish's checks, its result
  (:class:`Published`) and idempotency keys;
- :mod:`~pipecomet._comet._history`: topics kept by a bus that keeps the
  history (Redis): loading, catching up, ``gap`` and ``reset``;
- :mod:`~pipecomet._comet._stats`: the hub's counts (:class:`CometStats`)
  and its ``/_pipecomet/status`` section;
- :mod:`~pipecomet._comet._publish`: ``POST /_pipecomet/publish/{topic}``
  and the ``[comet]`` installer.

Resuming is exact: a subscription given a cursor (``Last-Event-ID``,
``last_event_id=`` or ``since=``) replays the history after it and starts
listening in the same reactor turn, so nothing falls between replay and
live.  A cursor older than the history, or from another epoch, gives an
explicit ``gap`` or ``reset`` event and the ``Pipecomet-Resume`` headers,
never a silent loss.  A message's bytes are encoded once per framing and the
same bytes object is written to every connection.

Each streaming connection is a push producer on its request: when the
socket's send buffer is full Twisted pauses it, messages queue on the
connection up to ``buffer_bytes``, and past that the client is cut off as
slow (or, with the ``drop`` policy, the oldest queued messages are dropped
and a ``gap`` event says so).  Held requests are exempt from twisted.web's
idle timeout; heartbeats keep proxies from closing them and make a dead
peer show up as a write error.
"""

from __future__ import annotations

from ._config import RESERVED_EVENTS, CometConfig, TopicConfig
from ._hub import CometHub, CometService
from ._publishing import Published
from ._stats import CometStats
from ._interfaces import IStreamSink
from ._publish import install, publish_pipes
from ._subscription import Subscription
from ._topics import Message, Topic, format_cursor, parse_cursor

__all__ = [
    "CometConfig",
    "TopicConfig",
    "CometHub",
    "CometService",
    "CometStats",
    "IStreamSink",
    "Message",
    "Published",
    "Subscription",
    "Topic",
    "install",
    "publish_pipes",
    "format_cursor",
    "parse_cursor",
    "RESERVED_EVENTS",
]
