"""
How a user tests an app's chains under trial with pipecomet.testing:
in memory, on a fake clock, synchronous.
"""

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from pipecomet import App, BadRequest, pipe
from pipecomet.testing import MemoryClient, make_clock


def make_greeter(reactor):
    app = App(reactor=reactor)

    @pipe
    def name(inp, ctx, res):
        if "name" not in inp.query:
            raise BadRequest("name is required", code="missing_parameter")
        return inp.query["name"]

    @pipe
    def slow_lookup(inp, ctx, res):
        d = Deferred()
        reactor.callLater(2.0, d.callback, res["name"].upper())
        return d

    @pipe
    def greet(inp, ctx, res):
        return {"greeting": f"hello {res['slow_lookup']}"}

    app.route("/greet", [name, slow_lookup, greet])
    return app


class GreeterTests(SynchronousTestCase):
    def setUp(self):
        self.clock = make_clock()
        self.client = MemoryClient(make_greeter(self.clock))

    def test_greets_after_lookup(self):
        call = self.client.get("/greet?name=ann")
        self.assertFalse(call.done)
        self.client.advance(2.0)
        self.assertEqual(call.status, 200)
        self.assertEqual(call.json(), {"greeting": "hello ANN"})

    def test_missing_name(self):
        call = self.client.get("/greet")
        self.assertEqual(call.status, 400)
        self.assertEqual(call.json()["error"]["code"], "missing_parameter")
