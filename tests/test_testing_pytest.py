"""
How a user tests an app's chains under pytest with pipecomet.testing:
the same helpers as under trial, as plain pytest functions and fixtures.
"""

import pytest

from pipecomet.testing import MemoryClient, make_clock

from .test_testing_trial import make_greeter


@pytest.fixture
def client():
    return MemoryClient(make_greeter(make_clock()))


def test_greets_after_lookup(client):
    call = client.get("/greet?name=bob")
    client.advance(1.0)
    assert not call.done
    client.advance(1.0)
    assert call.json() == {"greeting": "hello BOB"}


def test_disconnect_before_answer(client):
    call = client.get("/greet?name=bob")
    client.disconnect(call)
    client.advance(5)
    assert call.failure is not None
