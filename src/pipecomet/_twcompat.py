"""
The only place pipecomet touches what Twisted does not make public.

Each function here depends on a detail of a Twisted class that has no
public accessor; ``tests/test_twcompat.py`` pins that detail so that a
Twisted release which changes it fails a test instead of a server.
Everything else in pipecomet uses public Twisted APIs only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.tcp import Client as _TCPClient
from twisted.internet.tcp import Server as _TCPServer

#: The plain TCP transports (both ``tcp.Connection``s) whose buffer we know.
_PLAIN_TCP = (_TCPServer, _TCPClient)

if TYPE_CHECKING:
    from twisted.web import http

__all__ = ["request_gone", "send_now", "transport_pending"]


# Any (both helpers): the transport is read as a tcp.Connection once
# ``type(transport)`` says it is one, a check mypy does not narrow through
# (an isinstance() would be slower on this path and admit subclasses).
def send_now(transport: Any, data: bytes) -> int:
    """
    Send ``data`` straight to the socket of a plain TCP transport whose
    write buffer is empty, in one ``send`` call, and say how many bytes the
    kernel took (the caller writes the rest through ``transport.write``).

    Twisted's own ``write`` appends to its buffer and asks the reactor for
    writability: two more system calls and one more reactor turn per write.
    pipecomet's HTTP protocol sends every response (and every comet frame)
    this way, and the backend client every request; for comet fan-out (one frame to thousands of connections) it
    halves the time to reach everyone.  The check needs the transport's buffer
    state, which ``twisted.internet.tcp.Connection`` keeps in private
    attributes (``dataBuffer``, ``offset``, ``_tempDataLen``,
    ``_writeDisconnected``).  Any other transport (TLS, UNIX, memory)
    returns 0: everything goes through ``transport.write``.
    """
    if type(transport) not in _PLAIN_TCP:
        return 0
    if (transport._tempDataLen or transport.offset != len(transport.dataBuffer)
            or not transport.connected or transport.disconnecting
            or transport._writeDisconnected or transport.producerPaused):
        return 0
    try:
        return transport.socket.send(data)
    except OSError:
        return 0  # Twisted's own write path reports the error


def transport_pending(transport: Any) -> int:
    """
    Bytes a TCP transport holds that the kernel has not taken yet (0 for
    transports whose buffer is not known).
    """
    if type(transport) not in _PLAIN_TCP:
        return 0
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def request_gone(request: http.Request) -> bool:
    """
    True when ``request`` is finished or its client has gone.

    pipecomet's own requests say so publicly (``gone``); a plain
    ``twisted.web`` request keeps it in ``_disconnected`` only (its
    ``notifyFinish()`` Deferred says it too, but costs a Deferred per
    request).
    """
    if request.finished:
        return True
    gone = getattr(request, "gone", None)
    if gone is not None:
        return bool(gone)
    return bool(getattr(request, "_disconnected", False))
