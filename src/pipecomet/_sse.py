"""
Server-Sent Events (``text/event-stream``): the one encoder the server
writes with and the one parser the client (:mod:`pipecomet.client`) and the
test helpers (:mod:`pipecomet.testing`) read with.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["encode_event", "HEARTBEAT", "SSEParser", "parse_events"]

#: A comment block: proxies see traffic, clients dispatch nothing.
HEARTBEAT = b": heartbeat\n\n"


def encode_event(data: bytes, event: str | None = None, id: str | None = None,
                 retry: float | None = None) -> bytes:
    """
    One event block: ``retry:`` (``retry`` seconds, sent in milliseconds),
    ``id:``, ``event:`` (left out for ``None``: the type is then
    ``message``) and one ``data:`` line.

    :param data: the payload, one line (compact JSON has no newline).
    """
    out = b"" if retry is None else b"retry: %d\n" % int(retry * 1000)
    if id is not None:
        out += b"id: " + id.encode("ascii") + b"\n"
    if event is not None:
        out += b"event: " + event.encode("ascii") + b"\n"
    return out + b"data: " + data + b"\n\n"


class SSEParser:
    """
    An incremental ``text/event-stream`` parser (the WHATWG rules that
    matter here): calls ``on_event(event_type, data, last_id)`` per
    dispatched event and ``on_retry(ms)``.

    :param on_block: also called with the fields of every block as written
        (``data`` lines joined with newlines), dispatched or not; comment-only
        blocks (heartbeats) are left out.
    """

    def __init__(self, on_event: Callable[[str, str, str | None], None],
                 on_retry: Callable[[int], None] | None = None,
                 on_block: Callable[[dict[str, str]], None] | None = None) -> None:
        self.on_event = on_event
        self.on_retry = on_retry
        self.on_block = on_block
        self._buf = b""
        self._data: list[str] = []
        self._type = ""
        self._block: dict[str, str] = {}
        self.last_id: str | None = None

    def feed(self, chunk: bytes) -> None:
        buf = self._buf + chunk
        lines = buf.split(b"\n")
        self._buf = lines.pop()
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if not line:
                self._dispatch()
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if self.on_block is not None:
                block = self._block
                block[name] = block[name] + "\n" + value if name in block else value
            if name == "data":
                self._data.append(value)
            elif name == "event":
                self._type = value
            elif name == "id":
                if "\0" not in value:
                    self.last_id = value
            elif name == "retry" and value.isdigit() and self.on_retry is not None:
                self.on_retry(int(value))

    def _dispatch(self) -> None:
        if self._block:
            block, self._block = self._block, {}
            if self.on_block is not None:
                self.on_block(block)
        data, self._data = self._data, []
        etype, self._type = self._type or "message", ""
        if not data:
            return
        self.on_event(etype, "\n".join(data), self.last_id)


def parse_events(body: bytes) -> list[dict[str, str]]:
    """
    The complete event blocks of ``body`` as field dicts (see
    :class:`SSEParser`'s ``on_block``); an unfinished last block is left out.
    """
    blocks: list[dict[str, str]] = []
    SSEParser(lambda etype, data, last_id: None, on_block=blocks.append).feed(body)
    return blocks
