"""
Whether a request may subscribe (the connection and topic limits, shutting
down), and what it asks for: its topics, cursor (``Last-Event-ID``, then
``last_event_id=``, then ``since=``), ``last=1`` and ``timeout=``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import attrs

from .._chain import PipeInput
from .._errors import BadRequest, ServiceUnavailable
from ._config import CometConfig
from ._publishing import check_topic
from ._topics import Topic, parse_cursor

__all__ = ["Asked", "check_room", "read_request"]


@attrs.frozen
class Asked:
    """
    What a subscribe request asks for.

    :ivar topics: its topics, each once, in the order asked.
    :ivar cursors: ``{topic: (epoch, offset)}`` to resume from; None: no
        cursor.
    :ivar last: ``last=1``: start with the last message kept.
    :ivar timeout: the client's ``timeout=``, capped; None when not given.
    """

    topics: tuple[str, ...]
    cursors: dict[str, tuple[str, int]] | None
    last: bool
    timeout: float | None


def read_request(inp: PipeInput, topics: Sequence[str], cfg: CometConfig) -> Asked:
    """
    Read a subscribe request.  Raises 400 (``bad_topic``,
    ``too_many_topics_per_connection``, ``bad_cursor``, ``bad_timeout``).
    """
    names = tuple(dict.fromkeys(topics))
    if not names:
        raise BadRequest("no topic given", code="bad_topic")
    if len(names) > cfg.max_topics_per_connection:
        raise BadRequest(
            f"{len(names)} topics asked; the limit is {cfg.max_topics_per_connection}",
            code="too_many_topics_per_connection")
    for name in names:
        check_topic(name)
    q = inp.query
    text = inp.header("last-event-id")
    if text is None:
        text = q.get("last_event_id")
    if text is None:
        text = q.get("since")
    cursors = parse_cursor(text, names) if text is not None else None
    last = q.get("last", "") in ("1", "true", "yes")
    timeout = None
    if "timeout" in q:
        try:
            timeout = float(q["timeout"])
        except ValueError:
            timeout = -1.0
        if not (timeout > 0):
            raise BadRequest("timeout must be a positive number of seconds",
                             code="bad_timeout")
        timeout = min(timeout, cfg.longpoll_max_timeout if cfg.max_lifetime == 0
                      else max(cfg.longpoll_max_timeout, cfg.max_lifetime))
    return Asked(names, cursors, last, timeout)


def check_room(cfg: CometConfig, topics: Sequence[str], alive: Mapping[str, Topic],
               connections: int, closing: bool) -> None:
    """
    Raise 503 when the server is shutting down (``shutting_down``), holds
    ``max_connections`` (``too_many_connections``), a topic has
    ``max_connections_per_topic`` subscribers (``topic_full``) or the new
    topics would pass ``max_topics`` (``too_many_topics``).

    :param alive: the topics alive now, by name.
    :param connections: the comet requests held now.
    """
    if closing:
        raise ServiceUnavailable("the server is shutting down", code="shutting_down",
                                 retry_after=cfg.retry)
    if connections >= cfg.max_connections:
        raise ServiceUnavailable(
            f"{connections} comet connections are held; the limit is "
            f"{cfg.max_connections}", code="too_many_connections", retry_after=cfg.retry)
    new = 0
    for name in topics:
        t = alive.get(name)
        if t is None:
            new += 1
        elif t.subscribers >= cfg.max_connections_per_topic:
            raise ServiceUnavailable(
                f"topic {name!r} has {t.subscribers} subscribers; the limit is "
                f"{cfg.max_connections_per_topic}", code="topic_full", retry_after=cfg.retry)
    if new and len(alive) + new > cfg.max_topics:
        raise ServiceUnavailable(f"{len(alive)} topics are alive; the limit is {cfg.max_topics}",
                                 code="too_many_topics", retry_after=cfg.retry)
