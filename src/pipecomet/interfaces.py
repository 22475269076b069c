"""
The seams of pipecomet as zope.interface interfaces: what an app, a test or
another implementation plugs into.

- :class:`IChainRequest`: a request's per-request state as the chain runner
  sees it (``IChainRequest(request)``, as Klein's ``IKleinRequest``);
  :class:`IPipeInput`: the request as a pipe sees it;
  :class:`IBodySource`: its body, read whole or parsed lazily.
- :class:`IBus`, :class:`IHistoryBus`, :class:`IBusReceiver`: publish and
  subscribe between processes and hosts (in-memory, Redis).
- :class:`IDiscovery`: where a backend service's endpoints come from
  (static, file, ZooKeeper).
- :class:`IEventListener`: what an event of the event keeper runs.
- :class:`IStreamSink`: where a comet stream's frames go (the SSE, NDJSON
  and long-poll responders implement it).
- :class:`IPipecometReactor`: the reactor an app is given.
"""

from ._backend._discovery import IDiscovery
from ._comet._interfaces import IStreamSink
from ._interfaces import (
    IBodySource,
    IBus,
    IBusReceiver,
    IChainRequest,
    IEventListener,
    IHistoryBus,
    IPipecometReactor,
    IPipeInput,
)

__all__ = [
    "IBodySource",
    "IBus",
    "IBusReceiver",
    "IChainRequest",
    "IDiscovery",
    "IEventListener",
    "IHistoryBus",
    "IPipeInput",
    "IPipecometReactor",
    "IStreamSink",
]
