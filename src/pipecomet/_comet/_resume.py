"""
Resuming: a subscription's cursor read against its topics' histories —
what to replay, which ``gap`` or ``reset`` to declare, and where the live
stream goes on from.
"""

from __future__ import annotations

from typing import Any, Sequence

import attrs

from ._topics import Message, Topic

__all__ = ["Resumed", "resolve", "resolve_topic", "RESUME_RANK"]

#: How a resume went, worst last; a subscription of several topics reports
#: its worst.
RESUME_RANK = {"live": 0, "last": 1, "ok": 2, "gap": 3, "reset": 4}


@attrs.frozen
class Resumed:
    """
    The outcome of :func:`resolve`.

    :ivar status: ``live`` (no cursor), ``last`` (``last=1``), ``ok``,
        ``gap`` or ``reset``: the worst of the topics.
    :ivar replay: messages to send before the live ones, in time order.
    :ivar control: the ``gap``/``reset`` events to send first.
    :ivar positions: the offset reached per topic, in the topics' order.
    """

    status: str
    replay: list[Message]
    control: list[dict[str, Any]]
    positions: list[int]


def resolve_topic(t: Topic, cursor: tuple[str, int] | None,
                  last: bool) -> tuple[str, int, list[Message], dict[str, Any] | None]:
    """
    One topic: ``(status, position, replay, control event or None)``.
    """
    first = t.first_offset
    if cursor is None:
        if last and t.history and t.history[-1].offset == t.last_offset:
            return "last", t.last_offset - 1, [t.history[-1]], None
        return "live", t.last_offset, [], None
    epoch, offset = cursor
    if epoch == "" and offset == 0:  # "from the start of the history"
        return "ok", first - 1, t.after(first - 1), None
    ev: dict[str, Any]
    if epoch != t.epoch or offset > t.last_offset:
        ev = {"topic": t.name, "reason": "reset", "from": f"{epoch}:{offset}",
              "resumed_from": t.id_at(first - 1), "epoch": t.epoch}
        return "reset", first - 1, t.after(first - 1), ev
    if offset + 1 < first:
        ev = {"topic": t.name, "reason": "expired", "from": t.id_at(offset),
              "resumed_from": t.id_at(first - 1), "missed": first - 1 - offset}
        return "gap", first - 1, t.after(first - 1), ev
    return "ok", offset, t.after(offset), None


def resolve(topics: Sequence[Topic], cursors: dict[str, tuple[str, int]] | None,
            last: bool) -> Resumed:
    """
    Read ``cursors`` (``{topic: (epoch, offset)}``, None: no cursor)
    against ``topics``' histories.
    """
    replay: list[Message] = []
    control: list[dict[str, Any]] = []
    positions: list[int] = []
    worst = "live"
    for t in topics:
        cur = cursors.get(t.name) if cursors is not None else None
        status, pos, msgs, ev = resolve_topic(t, cur, last)
        if RESUME_RANK[status] > RESUME_RANK[worst]:
            worst = status
        if ev is not None:
            control.append(ev)
        replay.extend(msgs)
        positions.append(pos)
    if len(topics) > 1:
        replay.sort(key=lambda m: m.time)
    return Resumed(worst, replay, control, positions)
