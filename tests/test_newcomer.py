"""
Unit tests (fake clock, memory transports) of issue 14's pieces: config
files laid over an app's defaults, the demo's landing page, strict JSON
decoding and text-only charsets, top-level JSON arrays counted and capped,
ASCII cursor offsets, SSE heads the client records, unserialisable
results, non-UTF-8 header values.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from pipecomet import App, ConfigError, pipe
from pipecomet._comet import parse_cursor
from pipecomet._config import Config, merge_tables
from pipecomet._errors import BadRequest, PayloadTooLarge
from pipecomet._lazy._parsers import JSONParser, decode_json, text_decoder
from pipecomet.client import SSEParser
from pipecomet.testing import MemoryClient, make_clock


class ConfigOverlayTests(SynchronousTestCase):
    def test_merge_is_key_by_key(self):
        base = {"comet": {"publish_token": "a", "retry": 2.0}, "quota": {"size": 4}}
        over = {"comet": {"publish_token": "b"}}
        self.assertEqual(merge_tables(base, over),
                         {"comet": {"publish_token": "b", "retry": 2.0}, "quota": {"size": 4}})
        self.assertEqual(base["comet"]["publish_token"], "a")  # not changed

    def test_file_overrides_only_what_it_names(self):
        defaults = {"quota": {"size": 8, "categories": {"slow": {"limit": 4}}},
                    "comet": {"publish_token": "demo"}}
        config = Config.from_dict({"comet": {"publish_token": "mine"}}).with_defaults(defaults)
        self.assertEqual(config.comet.publish_token, "mine")
        self.assertEqual(config.quota.size, 8)
        self.assertEqual(config.quota.categories["slow"].limit, 4)

    def test_unknown_key_still_named(self):
        with self.assertRaises(ConfigError) as e:
            Config.from_dict({"comet": {"publish_tokn": "x"}}).with_defaults(
                {"comet": {"publish_token": "demo"}})
        self.assertIn("comet.publish_tokn", str(e.exception))

    def test_demo_with_only_a_token(self):
        from pipecomet.demo import make_app

        clock = make_clock()
        app = make_app(Config.from_dict({"comet": {"publish_token": "mine"}}), reactor=clock)
        self.assertEqual(app.config.comet.publish_token, "mine")
        self.assertTrue(app.runtime.quota.has_category("slow"))
        self.assertIn("demo-key", app.config.demo.keys)


class LandingPageTests(SynchronousTestCase):
    def setUp(self):
        from pipecomet.demo import make_app

        self.clock = make_clock()
        self.app = make_app(reactor=self.clock)
        self.client = MemoryClient(self.app, self.clock)

    def test_html_for_browsers(self):
        call = self.client.get("/", headers={"accept": "text/html,*/*"})
        self.assertEqual(call.status, 200)
        self.assertTrue(call.header("content-type").startswith("text/html"))
        self.assertIn(b'href="/demo/comet"', call.body)
        self.assertIn(b"/api/time.get?app_key=demo-key", call.body)

    def test_json_and_routes_added_later(self):
        call = self.client.get("/", headers={"accept": "application/json"})
        by_path = {e["path"]: e for e in call.json()["endpoints"]}
        self.assertEqual(by_path["/_pipecomet/dashboard"]["about"], "live dashboard")
        self.assertNotIn("/extra/thing", by_path)
        self.app.route("/extra/thing", [pipe(lambda i, c, r: "x", name="e")])
        call = self.client.get("/", headers={"accept": "application/json"})
        by_path = {e["path"]: e for e in call.json()["endpoints"]}
        self.assertEqual(by_path["/extra/thing"]["href"], "/extra/thing")


class _Sink:
    def __init__(self):
        self.fields = []

    def field(self, name, value):
        self.fields.append((name, value))


class JSONAndCharsetTests(SynchronousTestCase):
    def test_decode_json_refuses_what_json_cannot_carry(self):
        for doc in ("[" * 100_000, "1" * 5000, '{"a": NaN}', "Infinity", "-Infinity", "[1,"):
            with self.assertRaises(BadRequest) as e:
                decode_json(doc)
            self.assertEqual(e.exception.code, "invalid_json", doc[:20])
        self.assertEqual(decode_json('{"a": [1, 2.5, "x"]}'), {"a": [1, 2.5, "x"]})

    def test_only_text_charsets(self):
        for name in ("bz2", "zlib", "base64", "hex", "rot13", "uu", "punycode", "idna",
                     "unicode_escape", "raw_unicode_escape", "quopri", "nope"):
            with self.assertRaises(BadRequest) as e:
                text_decoder(name)
            self.assertEqual(e.exception.code, "unsupported_charset", name)
        for name, raw in (("ISO-8859-1", b"caf\xe9"), ("utf8", b"caf\xc3\xa9"),
                          ("windows-1252", b"caf\xe9"), ("latin1", b"caf\xe9")):
            self.assertEqual(text_decoder(name)(raw), "café")

    def feed(self, chunks, **limits):
        parser = JSONParser(_Sink(), **limits)
        for c in chunks:
            parser.feed(c)
        parser.close()
        return parser.value

    def test_array_items_count_as_fields(self):
        doc = b"[" + b",".join([b'"a,]\\\\"', b"[1,2,3]", b'{"x":[",",1]}'] * 10) + b"]"
        # Any split, even inside an escape, counts the same.
        for size in (1, 2, 3, 7, len(doc)):
            chunks = [doc[i:i + size] for i in range(0, len(doc), size)]
            self.assertEqual(len(self.feed(chunks, max_fields=30)), 30)
            with self.assertRaises(PayloadTooLarge) as e:
                self.feed(chunks, max_fields=29)
            self.assertEqual(e.exception.code, "too_many_fields")

    def test_top_level_value_is_held_within_max_field_bytes(self):
        with self.assertRaises(PayloadTooLarge) as e:
            self.feed([b'["' + b"x" * 600, b"x" * 600 + b'"]'], max_field_bytes=1000)
        self.assertEqual(e.exception.code, "field_too_large")
        self.assertEqual(self.feed([b'"' + b"x" * 900 + b'"'], max_field_bytes=1000), "x" * 900)

    def test_deep_member_is_invalid_json(self):
        with self.assertRaises(BadRequest) as e:
            self.feed([b'{"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"])
        self.assertEqual(e.exception.code, "invalid_json")


class CursorAndSSETests(SynchronousTestCase):
    def test_offsets_are_ascii_digits(self):
        self.assertEqual(parse_cursor("abc:3", ["t"]), {"t": ("abc", 3)})
        for text in ("abc:\u0663", "abc:\uff13", "abc:\u00b2", "abc:-1", "abc: 3x"):
            with self.assertRaises(BadRequest):
                parse_cursor(text, ["t"])

    def test_client_records_the_open_events_cursor(self):
        seen = []
        parser = SSEParser(lambda t, d, i: seen.append((t, d, i)))
        parser.feed(b'retry: 2000\nid: e1:5\nevent: open\ndata: {"event":"open"}\n\n: hb\n\n')
        self.assertEqual(parser.last_id, "e1:5")
        self.assertEqual(seen, [("open", '{"event":"open"}', "e1:5")])


class ServingTests(SynchronousTestCase):
    def setUp(self):
        self.clock = make_clock()
        self.app = App(reactor=self.clock)
        self.app.route("/bad", [pipe(lambda i, c, r: {"a": "\ud800"}, name="bad")])
        self.app.route("/hdr", [pipe(lambda i, c, r: i.header("x-key"), name="hdr")])
        self.client = MemoryClient(self.app, self.clock)

    def test_unserialisable_result_is_500_with_id(self):
        call = self.client.get("/bad")
        self.assertEqual(call.status, 500)
        err = call.json()["error"]
        self.assertEqual(err["code"], "internal_error")
        self.assertTrue(err["id"])
        self.flushLoggedErrors()

    def test_non_utf8_header_is_400(self):
        call = self.client.get("/hdr", headers={"x-key": "ok"})
        self.assertEqual(json.loads(call.body), "ok")
        call = self.client.request("GET", "/hdr", headers={b"x-key": b"\xff"})
        self.assertEqual(call.status, 400)
        self.assertEqual(call.json()["error"]["code"], "bad_header")
