"""
The integration tests' own bound on waiting (``support.within`` and
``support.fetch``): a wait that never ends fails its test with an
AssertionError naming what it waited for, a silent server included, and a
wait that ends passes its value through.
"""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed

from .support import fetch, within


@pytest_twisted.inlineCallbacks
def test_a_hang_fails_the_test():
    with pytest.raises(AssertionError, match="a hang: nothing within 0.2s"):
        yield within(Deferred(), "a hang", limit=0.2)


@pytest_twisted.inlineCallbacks
def test_a_silent_server_fails_the_test():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)  # accepts (the kernel does), never answers
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        with pytest.raises(AssertionError, match=f"GET {url}: nothing within 0.5s"):
            yield fetch("GET", url, limit=0.5)
    finally:
        listener.close()


@pytest_twisted.inlineCallbacks
def test_a_wait_that_ends_gives_its_value():
    assert (yield within(succeed(3))) == 3
