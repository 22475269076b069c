"""
Unit tests of the router (``pipecomet._routing``): one table, one lookup,
used by both server paths (pipecomet's own protocol and twisted.web's
channel), in memory on a fake clock.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from pipecomet import App, Config, Pipe
from pipecomet._routing import Matched, Router, WrongMethod
from pipecomet.testing import MemoryClient, make_clock


def _one(i, c, r):
    return 1


class RouterTests(SynchronousTestCase):
    def setUp(self):
        self.app = App(reactor=make_clock(), builtin_routes=False)
        self.router: Router = self.app.router

    def test_exact_path(self):
        route = self.app.route("/a", [Pipe(_one, name="one")])
        found = self.router.match(b"GET", b"/a")
        self.assertIsInstance(found, Matched)
        self.assertIs(found.route, route)
        self.assertEqual(dict(found.params), {})

    def test_head_follows_get(self):
        route = self.app.route("/a", [Pipe(_one, name="one")])
        self.assertIs(self.router.match(b"HEAD", b"/a").route, route)

    def test_pattern_path(self):
        route = self.app.route("/items/<int:item>", [Pipe(_one, name="one")])
        found = self.router.match(b"GET", b"/items/7")
        self.assertIs(found.route, route)
        self.assertEqual(dict(found.params), {"item": 7})

    def test_no_route(self):
        self.app.route("/a", [Pipe(_one, name="one")])
        self.assertIsNone(self.router.match(b"GET", b"/b"))
        self.assertIsNone(self.router.match(b"GET", b"/items/x"))

    def test_wrong_method_lists_allowed(self):
        self.app.route("/a", [Pipe(_one, name="one")], methods=("GET", "PUT"))
        found = self.router.match(b"POST", b"/a")
        self.assertIsInstance(found, WrongMethod)
        self.assertEqual(found.allow, ("GET", "HEAD", "PUT"))

    def test_exact_path_of_other_method_falls_to_pattern(self):
        """
        ``POST /items/new`` and ``GET /items/<name>``: a GET of
        ``/items/new`` is the pattern route's, not a 405.
        """
        self.app.route("/items/new", [Pipe(_one, name="one")], methods=("POST",))
        pattern = self.app.route("/items/<name>", [Pipe(_one, name="one")])
        found = self.router.match(b"GET", b"/items/new")
        self.assertIs(found.route, pattern)
        self.assertEqual(dict(found.params), {"name": "new"})

    def test_first_declared_wins(self):
        first = self.app.route("/a", [Pipe(_one, name="one")])
        self.app.route("/a", [Pipe(_one, name="one")])
        self.assertIs(self.router.match(b"GET", b"/a").route, first)

    def test_read_only_views(self):
        a = self.app.route("/a", [Pipe(_one, name="one")])
        b = self.app.route("/b/<x>", [Pipe(_one, name="one")], methods=("POST",))
        self.assertEqual(self.router.routes, (a, b))
        self.assertEqual(self.app.routes, (a, b))
        self.assertEqual(len(self.router), 2)
        rules = sorted(r.rule for r in self.router.url_map.iter_rules())
        self.assertEqual(rules, ["/a", "/b/<x>"])

    def test_chains_are_not_mirrored_on_klein(self):
        """
        The server routes chains itself: the wrapped Klein app holds only
        plain Klein handlers unless the app is mounted on it explicitly.
        """
        self.app.route("/a", [Pipe(_one, name="one")])
        self.assertEqual(list(self.app.klein.url_map.iter_rules()), [])
        self.app.mount_in_klein()
        self.assertEqual([r.rule for r in self.app.klein.url_map.iter_rules()], ["/a"])


class BothServerPathsTests(SynchronousTestCase):
    """
    The same answers on pipecomet's protocol and on twisted.web's channel.
    """

    def _client(self, protocol: str) -> tuple[App, MemoryClient]:
        clock = make_clock()
        app = App(reactor=clock, builtin_routes=False)
        app.configure(Config.from_dict({"server": {"protocol": protocol}}))
        return app, MemoryClient(app)

    def _check(self, protocol: str) -> None:
        app, client = self._client(protocol)
        app.route("/a", [Pipe(lambda i, c, r: "a", name="a")], methods=("GET", "PUT"))
        app.route("/p/<int:n>", [Pipe(lambda i, c, r: i.path_params["n"], name="n")])
        self.assertEqual(client.get("/a").json(), "a")
        self.assertEqual(client.get("/p/5").json(), 5)
        wrong = client.post("/a")
        self.assertEqual(wrong.status, 405)
        self.assertEqual(wrong.header("allow"), "GET, HEAD, PUT")
        self.assertEqual(wrong.json()["error"]["code"], "method_not_allowed")
        missing = client.get("/p/x")
        self.assertEqual(missing.status, 404)
        self.assertEqual(missing.json()["error"]["code"], "not_found")

    def test_own_protocol(self):
        self._check("pipecomet")

    def test_twisted_channel(self):
        self._check("twisted")
