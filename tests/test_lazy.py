"""
Unit tests of the lazy parser: incremental parsers, LazyBody, and the
LazyChannel/LazyRequest pair driven over a memory transport with a fake
clock (no reactor, no sockets).
"""

from __future__ import annotations

import hashlib
import json
from urllib.parse import parse_qsl, urlencode

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pipecomet import App, BadRequest, Pipe
from pipecomet._config import Config
from pipecomet._lazy import (
    FormParser,
    JSONParser,
    LazyBody,
    LimitsConfig,
    MultipartParser,
    install,
    parse_content_type,
)
from pipecomet._lazy._http import Phase
from tests.conftest import examples

FORM = b"application/x-www-form-urlencoded"


# ---------------------------------------------------------------------------
# helpers


class Collect:
    """
    A FieldSink that records everything, files included.
    """

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self._file: list | None = None

    def field(self, name, value):
        self.events.append(("field", name, value))

    def file_start(self, name, filename, content_type):
        self._file = [name, filename, content_type, b""]

    def file_data(self, data):
        self._file[3] += data

    def file_end(self):
        self.events.append(("file", *self._file))
        self._file = None


def feed_split(parser, body: bytes, cuts: list[int]) -> None:
    prev = 0
    for c in sorted(set(cuts)):
        parser.feed(body[prev:c])
        prev = c
    parser.feed(body[prev:])
    parser.close()


def multipart_body(parts: list[tuple], boundary: str) -> bytes:
    out = []
    for p in parts:
        if p[0] == "field":
            _, name, value = p
            out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                       .encode() + value.encode("utf-8") + b"\r\n")
        else:
            _, name, filename, ctype, data = p
            out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                       f'filename="{filename}"\r\nContent-Type: {ctype}\r\n\r\n'.encode()
                       + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


def response(raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """
    The last full response in ``raw`` (1xx interim responses skipped).
    """
    rest = raw
    while True:
        head, _, rest = rest.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
        if status >= 200:
            break
    n = int(headers.get(b"content-length", b"0"))
    return status, headers, rest[:n]


def error_code(raw: bytes) -> str:
    return json.loads(response(raw)[2])["error"]["code"]


def post(path: bytes, body: bytes, ctype: bytes = FORM, extra: bytes = b"") -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: t\r\nContent-Type: " + ctype +
            b"\r\nContent-Length: %d\r\n" % len(body) + extra + b"\r\n" + body)


class Server:
    """
    A configured app's LazySite on a fake clock, with connections over
    memory transports.
    """

    def __init__(self, routes, lazy: bool = True, **limits) -> None:
        self.clock = Clock()
        self.app = App(reactor=self.clock)
        routes(self.app)
        self.app.configure(Config.from_dict({"limits": {"lazy": lazy, **limits}}))
        self.site = self.app.site()
        self.stats = self.app.runtime.lazy.stats

    def connect(self):
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport


def first_then_form(log: list):
    """
    Routes: /f needs field ``a`` first (``a=bad`` is refused), then the form.
    """

    def routes(app: App) -> None:
        def check_a(inp, ctx, res):
            def got(v):
                log.append(("a", v))
                if v == "bad":
                    raise BadRequest("a is bad", code="invalid_parameter")
                return v
            return inp.param("a").addCallback(got)

        def rest(inp, ctx, res):
            log.append(("rest", None))
            return inp.form()

        def query_only(inp, ctx, res):
            if inp.query.get("ok") != "1":
                raise BadRequest("ok must be 1", code="invalid_parameter")
            return True

        app.route("/f", [Pipe(check_a), Pipe(rest)], methods=("POST",))
        app.route("/q", [Pipe(query_only), Pipe(check_a), Pipe(rest)], methods=("POST",))
        app.route("/raw", [Pipe(lambda inp, ctx, res: inp.body(), name="raw")], methods=("POST",))
        app.route("/json", [Pipe(lambda inp, ctx, res: inp.param("a"), name="a"),
                            Pipe(lambda inp, ctx, res: inp.form(), name="form")],
                  methods=("POST",))
        app.route("/default", [Pipe(lambda inp, ctx, res: inp.param("zz", "dflt"), name="zz")],
                  methods=("POST",))

    return routes


# ---------------------------------------------------------------------------
# parsers


_names = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"),
                 min_size=1, max_size=12)
_values = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)


class FormParserTests(SynchronousTestCase):
    @settings(max_examples=examples("parser"))
    @given(pairs=st.lists(st.tuples(_names, _values), max_size=12),
           cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=8))
    def test_split_equals_whole(self, pairs, cuts):
        """
        A urlencoded body cut anywhere parses to the same fields as the
        whole body, which are the fields encoded and what the stdlib reads.
        """
        body = urlencode(pairs).encode("ascii")
        whole, split = Collect(), Collect()
        feed_split(FormParser(whole), body, [])
        feed_split(FormParser(split), body, [c % (len(body) + 1) for c in cuts])
        expected = [("field", k, v) for k, v in pairs]
        self.assertEqual(split.events, whole.events)
        self.assertEqual(whole.events, expected)
        self.assertEqual([(k, v) for _, k, v in whole.events],
                         parse_qsl(body.decode("ascii"), keep_blank_values=True))

    def test_field_complete_at_ampersand(self):
        sink = Collect()
        p = FormParser(sink)
        p.feed(b"a=1")
        self.assertEqual(sink.events, [])
        p.feed(b"&b")
        self.assertEqual(sink.events, [("field", "a", "1")])

    def test_bad_percent_encoding(self):
        for body in (b"a=%G1", b"a=%4", b"a%=1", b"a=1&b=%"):
            p = FormParser(Collect())
            with self.assertRaises(BadRequest) as cm:
                feed_split(p, body, [])
            self.assertEqual(cm.exception.code, "bad_percent_encoding")

    def test_bad_charset(self):
        with self.assertRaises(BadRequest) as cm:
            feed_split(FormParser(Collect()), b"a=%FF%FE", [])
        self.assertEqual(cm.exception.code, "bad_charset")
        sink = Collect()
        feed_split(FormParser(sink, charset="latin-1"), b"a=%E9", [])
        self.assertEqual(sink.events, [("field", "a", "\xe9")])

    def test_unknown_charset(self):
        with self.assertRaises(BadRequest) as cm:
            FormParser(Collect(), charset="no-such-charset")
        self.assertEqual(cm.exception.code, "unsupported_charset")

    def test_limits(self):
        with self.assertRaises(Exception) as cm:
            feed_split(FormParser(Collect(), max_fields=2), b"a=1&b=2&c=3", [])
        self.assertEqual((cm.exception.status, cm.exception.code), (413, "too_many_fields"))
        p = FormParser(Collect(), max_field_bytes=10)
        with self.assertRaises(Exception) as cm:
            p.feed(b"a=" + b"x" * 20)
        self.assertEqual((cm.exception.status, cm.exception.code), (413, "field_too_large"))


_boundaries = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789'()+_,-./:=?",
                      min_size=1, max_size=40)
_field_names = st.text(alphabet=st.characters(codec="utf-8", exclude_characters='"\\\r\n\x00'),
                       min_size=1, max_size=10)
_parts = st.lists(
    st.one_of(
        st.tuples(st.just("field"), _field_names,
                  st.text(alphabet=st.characters(codec="utf-8"), max_size=60)),
        st.tuples(st.just("file"), _field_names,
                  st.text(alphabet="abcxyz._-", min_size=1, max_size=10),
                  st.sampled_from(["application/octet-stream", "text/plain", "image/png"]),
                  st.binary(max_size=300) | st.sampled_from([b"\r\n--", b"\r\n-\r\n--x", b"--"])),
    ),
    max_size=6,
)


class MultipartParserTests(SynchronousTestCase):
    @settings(max_examples=examples("parser"))
    @given(parts=_parts, boundary=_boundaries,
           cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=10))
    def test_split_equals_whole(self, parts, boundary, cuts):
        """
        A multipart body cut anywhere (inside boundaries too) parses to the
        parts it was made from, as the whole body does.
        """
        body = multipart_body(parts, boundary)
        if any(("--" + boundary).encode() in (p[2] if p[0] == "field" else p[4])
               if isinstance(p[2 if p[0] == "field" else 4], bytes)
               else ("--" + boundary) in p[2] for p in parts):
            return  # a part that contains its own delimiter cannot be encoded
        whole, split = Collect(), Collect()
        feed_split(MultipartParser(whole, boundary), body, [])
        feed_split(MultipartParser(split, boundary), body, [c % (len(body) + 1) for c in cuts])
        self.assertEqual(split.events, whole.events)
        self.assertEqual(whole.events, [tuple(p) for p in parts])

    def bad(self, body: bytes, boundary: str = "XyZ") -> BadRequest:
        with self.assertRaises(BadRequest) as cm:
            feed_split(MultipartParser(Collect(), boundary), body, [])
        return cm.exception

    def test_broken_boundaries(self):
        ok = multipart_body([("field", "a", "1")], "XyZ")
        self.assertEqual(self.bad(ok[:-8]).code, "bad_multipart")  # no closing boundary
        self.assertEqual(self.bad(ok.replace(b"--XyZ\r\n", b"--XyQ\r\n", 1)).code, "bad_multipart")
        self.assertEqual(self.bad(ok.replace(b"\r\n--XyZ--", b"\r\n--XyZ!!")).code,
                         "bad_multipart")
        self.assertEqual(self.bad(b"--XyZ\r\nContent-Type: text/plain\r\n\r\nx\r\n--XyZ--").code,
                         "bad_multipart")

    def test_missing_boundary(self):
        with self.assertRaises(BadRequest):
            MultipartParser(Collect(), "")

    def test_text_field_charset(self):
        body = (b'--b\r\nContent-Disposition: form-data; name="t"\r\n'
                b"Content-Type: text/plain; charset=utf-8\r\n\r\n\xff\xfe\r\n--b--")
        self.assertEqual(self.bad(body, "b").code, "bad_charset")

    def test_params(self):
        self.assertEqual(parse_content_type(b'multipart/form-data; boundary="a b"; charset=UTF-8'),
                         ("multipart/form-data", {"boundary": "a b", "charset": "UTF-8"}))


# ---------------------------------------------------------------------------
# LazyBody


class LazyBodyTests(SynchronousTestCase):
    def test_param_fires_when_field_completes(self):
        demanded = []
        body = LazyBody(LimitsConfig(), FORM, lambda: demanded.append(1))
        d = body.param("b")
        self.assertEqual(demanded, [1])
        got = []
        d.addCallback(got.append)
        body.feed(b"a=1&b=2")
        self.assertEqual(got, [])  # b may go on
        body.feed(b"&c=3")
        self.assertEqual(got, ["2"])
        self.assertEqual(self.successResultOf(body.param("a")), "1")

    def test_query_first(self):
        body = LazyBody(LimitsConfig(), FORM)
        self.assertEqual(self.successResultOf(body.param("a", query={"a": "q"})), "q")

    def test_missing_and_default_at_end(self):
        body = LazyBody(LimitsConfig(), FORM)
        missing = body.param("x")
        defaulted = body.param("y", "d")
        body.feed(b"a=1")
        body.finish()
        self.assertEqual(self.failureResultOf(missing, BadRequest).value.code, "missing_parameter")
        self.assertEqual(self.successResultOf(defaulted), "d")
        self.assertEqual(self.successResultOf(body.form()), {"a": ["1"]})
        self.assertEqual(self.successResultOf(body.body()), b"a=1")

    def test_failure_reaches_waiters(self):
        body = LazyBody(LimitsConfig(), FORM)
        d = body.param("a")
        with self.assertRaises(BadRequest):
            body.feed(b"a=%ZZ&")
        self.assertEqual(self.failureResultOf(d, BadRequest).value.code, "bad_percent_encoding")
        self.assertEqual(self.failureResultOf(body.form(), BadRequest).value.code,
                         "bad_percent_encoding")

    def test_cancelled_waiter_is_forgotten(self):
        """
        A cancelled waiter (a field, the whole body, the first field) is
        dropped by the body at once: nothing keeps it alive, and the field
        arriving later neither fires it again nor fails.
        """
        import gc
        import weakref

        body = LazyBody(LimitsConfig(), FORM)
        waiters = [body.param("a"), body.param("a", "dflt"), body.form(), body.body(),
                   body.first_field()]
        kept = body.param("b")
        refs = []
        for d in waiters:
            d.cancel()
            self.failureResultOf(d, CancelledError)
            refs.append(weakref.ref(d))
        del waiters, d
        gc.collect()
        self.assertEqual([r() for r in refs], [None] * len(refs),
                         "the body still holds a cancelled waiter")
        body.feed(b"a=1&b=2&")
        self.assertEqual(self.successResultOf(kept), "2")
        body.finish()
        self.assertEqual(self.successResultOf(body.param("a")), "1")

    def test_asked_after_the_end(self):
        """
        Asked once the body is complete: present fields and files at once,
        missing ones a 400 naming the parameter, defaults as given.
        """
        raw = multipart_body([("field", "k", "v"), ("file", "f", "one.txt", "text/plain", b"1"),
                              ("file", "f", "two.txt", "text/plain", b"22")], "bnd")
        body = LazyBody(LimitsConfig(), b"multipart/form-data; boundary=bnd")
        waiting_for_absent_file = body.file("nope")
        body.feed(raw[:10])
        body.feed(raw[10:])
        body.finish()
        self.assertEqual(body.received, len(raw))
        self.assertEqual(body.raw.read(), raw)  # rewound for whoever reads it next
        self.assertEqual(self.successResultOf(body.param("k")), "v")
        self.assertEqual(self.successResultOf(body.param("absent", "dflt")), "dflt")
        self.assertIsNone(self.successResultOf(body.param("absent", None)))
        for d in (body.param("absent"), body.file("absent"), waiting_for_absent_file):
            err = self.failureResultOf(d, BadRequest).value
            name = "nope" if d is waiting_for_absent_file else "absent"
            self.assertEqual((err.code, err.details), ("missing_parameter", {"param": name}))
            self.assertIn(repr(name), err.message)
        first = self.successResultOf(body.file("f"))
        self.assertEqual((first.filename, first.complete), ("one.txt", True))
        self.assertEqual(first.file.read(), b"1")  # spooled and rewound
        self.assertEqual(first.read(), b"1")
        self.assertEqual(first.read(), b"1")
        files = self.successResultOf(body.files())
        self.assertEqual([u.filename for u in files["f"]], ["one.txt", "two.txt"])
        self.assertEqual(files["f"][1].describe(), {
            "name": "f", "filename": "two.txt", "content_type": "text/plain", "size": 2,
            "sha256": hashlib.sha256(b"22").hexdigest()})
        self.assertEqual(self.successResultOf(body.first_field()), "k")
        self.assertIsNone(self.successResultOf(body.json()))
        self.assertEqual(self.successResultOf(body.body()), raw)
        body.close()
        self.assertTrue(first.file.closed)

    def test_first_field_of_a_form_while_receiving(self):
        body = LazyBody(LimitsConfig(), FORM)
        body.feed(b"a=1&b=")
        self.assertEqual(self.successResultOf(body.first_field()), "a")
        body.feed(b"2&")
        self.assertEqual(self.successResultOf(body.first_field()), "a")

    def test_a_failed_body_fails_waiters_and_later_questions_alike(self):
        """
        The error a malformed body raises reaches everything waiting on it
        and everything asked later, as the same error object.
        """
        body = LazyBody(LimitsConfig(), b"multipart/form-data; boundary=b")
        waiting = [body.param("a"), body.form(), body.body(), body.first_field(), body.file("f")]
        with self.assertRaises(BadRequest) as cm:
            body.feed(b"this is not multipart\r\n--x\r\n\r\n" * 4)
            body.finish()
        error = cm.exception
        self.assertIs(body.error, error)
        later = [body.param("a"), body.form(), body.first_field(), body.file("f")]
        for d in waiting + later:
            self.assertIs(self.failureResultOf(d, BadRequest).value, error)

    def test_cancelling_one_waiter_keeps_the_others(self):
        body = LazyBody(LimitsConfig(), FORM)
        gone, kept = body.param("a"), body.param("a")
        gone_end, kept_end = body.form(), body.form()
        gone.cancel()
        gone_end.cancel()
        self.failureResultOf(gone, CancelledError)
        self.failureResultOf(gone_end, CancelledError)
        body.feed(b"a=1&")
        self.assertEqual(self.successResultOf(kept), "1")
        body.finish()
        self.assertEqual(self.successResultOf(kept_end), {"a": ["1"]})

    def test_a_body_cut_short_fails_at_finish(self):
        """
        A multipart body that ends without its closing boundary: finish()
        raises, and the waiters get that same error.
        """
        body = LazyBody(LimitsConfig(), b"multipart/form-data; boundary=b")
        waiting = body.param("x")
        body.feed(b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\n1')
        with self.assertRaises(BadRequest) as cm:
            body.finish()
        self.assertEqual(cm.exception.code, "bad_multipart")
        self.assertIs(body.error, cm.exception)
        self.assertIs(self.failureResultOf(waiting, BadRequest).value, cm.exception)
        self.assertIs(self.failureResultOf(body.form(), BadRequest).value, cm.exception)

    def test_streamed_file_has_nothing_to_read(self):
        raw = multipart_body([("file", "f", "a", "text/plain", b"data")], "b")
        body = LazyBody(LimitsConfig(), b"multipart/form-data; boundary=b")
        d = body.stream_file("f", lambda chunk: None)
        body.feed(raw)
        up = self.successResultOf(d)
        self.assertEqual((up.read(), up.size, up.complete), (b"", 4, True))

    def test_file_spooled_above_threshold(self):
        limits = LimitsConfig(file_memory_bytes=1024)
        payload = bytes(range(256)) * 20
        raw = multipart_body([("field", "k", "v"), ("file", "f", "x.bin", "application/x", payload)],
                             "bnd")
        body = LazyBody(limits, b"multipart/form-data; boundary=bnd")
        f = body.file("f")
        for i in range(0, len(raw), 100):
            body.feed(raw[i:i + 100])
        up = self.successResultOf(f)
        self.assertEqual((up.size, up.filename, up.content_type), (len(payload), "x.bin",
                                                                  "application/x"))
        self.assertTrue(up.file._rolled, "a file above file_memory_bytes must be on disk")
        self.assertEqual(up.read(), payload)
        import hashlib
        self.assertEqual(up.sha256, hashlib.sha256(payload).hexdigest())

    def test_first_field(self):
        body = LazyBody(LimitsConfig(), b"multipart/form-data; boundary=b")
        d = body.first_field()
        raw = multipart_body([("file", "f", "a", "text/plain", b"x" * 100), ("field", "k", "v")],
                             "b")
        body.feed(raw[:raw.index(b"xxx") + 1])
        self.assertEqual(self.successResultOf(d), "f")
        empty = LazyBody(LimitsConfig(), FORM)
        d = empty.first_field()
        empty.finish()
        self.assertIsNone(self.successResultOf(d))

    def test_stream_file(self):
        raw = multipart_body([("file", "f", "a", "text/plain", b"hello world")], "b")
        body = LazyBody(LimitsConfig(), b"multipart/form-data; boundary=b")
        chunks = []
        d = body.stream_file("f", chunks.append)
        for i in range(0, len(raw), 7):
            body.feed(raw[i:i + 7])
        up = self.successResultOf(d)
        self.assertEqual(b"".join(chunks), b"hello world")
        self.assertIsNone(up.file)

    def test_json_members_as_they_complete(self):
        body = LazyBody(LimitsConfig(), b"application/json")
        a, b = body.param("a"), body.param("b")
        body.feed(b'{"a": [1, {"x": "}"}], "b')
        self.assertEqual(self.successResultOf(a), [1, {"x": "}"}])
        self.assertNoResult(b)
        body.feed(b'": "x\\"y"}')
        self.assertEqual(self.successResultOf(b), 'x"y')
        body.finish()
        self.assertEqual(self.successResultOf(body.json()), {"a": [1, {"x": "}"}], "b": 'x"y'})

    def test_json_not_an_object_at_end(self):
        body = LazyBody(LimitsConfig(), b"application/json")
        body.feed(b"[1, 2")
        body.feed(b"]")
        body.finish()
        self.assertEqual(self.successResultOf(body.json()), [1, 2])
        self.assertEqual(self.successResultOf(body.form()), {})

    def test_invalid_json(self):
        for raw in (b'{"a": ', b'{"a": 1,}', b'{"a" 1}', b'{,}', b'{"a": 1} x', b"[1,", b"",
                    b'{"a": [1}', b'{"a": 1]'):
            body = LazyBody(LimitsConfig(), b"application/json")
            with self.assertRaises(BadRequest) as cm:
                body.feed(raw)
                body.finish()
            self.assertEqual(cm.exception.code, "invalid_json", raw)
        with self.assertRaises(BadRequest) as cm:
            LazyBody(LimitsConfig(), b"application/json; charset=latin-1")
        self.assertEqual(cm.exception.code, "unsupported_charset")


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                  max_size=4),
    max_leaves=12)


class JSONParserTests(SynchronousTestCase):
    @settings(max_examples=examples("parser"))
    @given(doc=st.dictionaries(st.text(max_size=10), _json_values, max_size=8),
           indent=st.sampled_from([None, 0, 2]), ascii=st.booleans(),
           cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=10))
    def test_split_equals_whole(self, doc, indent, ascii, cuts):
        """
        A JSON object cut anywhere gives its members in order and the same
        value as json.loads of the whole body.
        """
        raw = json.dumps(doc, indent=indent, ensure_ascii=ascii).encode("utf-8")
        whole, split = Collect(), Collect()
        pw, ps = JSONParser(whole), JSONParser(split)
        feed_split(pw, raw, [])
        feed_split(ps, raw, [c % (len(raw) + 1) for c in cuts])
        self.assertEqual(split.events, whole.events)
        self.assertEqual(whole.events, [("field", k, v) for k, v in doc.items()])
        self.assertEqual(ps.value, json.loads(raw))

    def test_member_limits(self):
        p = JSONParser(Collect(), max_field_bytes=10)
        with self.assertRaises(Exception) as cm:
            p.feed(b'{"a": "' + b"x" * 20)
        self.assertEqual(cm.exception.code, "field_too_large")
        p = JSONParser(Collect(), max_fields=1)
        with self.assertRaises(Exception) as cm:
            p.feed(b'{"a": 1, "b": 2}')
        self.assertEqual(cm.exception.code, "too_many_fields")


# ---------------------------------------------------------------------------
# the request over a memory transport


class LazyRequestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.log: list = []
        self.waiting: list = []
        self.cancelled = False
        routes = first_then_form(self.log)

        def more(app: App) -> None:
            routes(app)

            def wait(inp, ctx, res):
                def cancel(d):
                    self.cancelled = True
                d = Deferred(cancel)
                self.waiting.append(d)
                return d

            app.route("/wait", [Pipe(wait)], methods=("POST",))

        self.server = Server(more)
        self.channel, self.transport = self.server.connect()

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def test_first_pipe_runs_before_body_end(self):
        body = b"a=1&b=2&b=3&c=%41"
        full = post(b"/f", body)
        self.send(full[:-len(body)])
        self.assertEqual(self.log, [])
        self.send(body[:4])
        self.assertEqual(self.log, [("a", "1"), ("rest", None)])
        self.assertEqual(self.transport.value(), b"")
        self.send(body[4:])
        status, _, out = response(self.transport.value())
        self.assertEqual((status, json.loads(out)), (200, {"a": ["1"], "b": ["2", "3"],
                                                           "c": ["A"]}))

    def test_same_result_as_buffered(self):
        body = b"a=1&b=%E2%82%AC&c="
        self.send(post(b"/f", body))
        lazy = response(self.transport.value())[2]
        buffered = Server(first_then_form([]), lazy=False)
        ch, t = buffered.connect()
        ch.dataReceived(post(b"/f", body))
        self.assertEqual(json.loads(lazy), json.loads(response(t.value())[2]))
        self.assertEqual(buffered.stats.requests_lazy, 0)
        self.assertEqual(self.server.stats.requests_lazy, 1)

    def test_early_answer_stops_reading(self):
        body = b"a=bad&" + b"x=" + b"y" * 100_000
        full = post(b"/f", body)
        head = len(full) - len(body)
        self.send(full[:head + 1000])
        status, headers, out = response(self.transport.value())
        self.assertEqual((status, json.loads(out)["error"]["code"]), (400, "invalid_parameter"))
        self.assertEqual(headers[b"connection"], b"close")
        self.assertEqual(self.transport.producerState, "paused")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.channel.phase, Phase.CLOSING)
        self.send(full[head + 1000:])
        self.assertEqual(self.server.stats.body_bytes_read, 1000)
        self.assertEqual(self.server.stats.answered_before_body_end, 1)
        self.assertEqual(self.log, [("a", "bad")])

    def test_keep_alive_between_lazy_requests(self):
        self.send(post(b"/f", b"a=1&b=2") + post(b"/f", b"a=2"))
        raw = self.transport.value()
        self.assertEqual(raw.count(b"HTTP/1.1 200 OK"), 2)
        self.assertFalse(self.transport.disconnecting)

    def test_answer_with_body_in_hand_keeps_connection(self):
        """
        An answer made while the rest of the body is already in the
        channel's buffer does not close the connection.
        """
        self.send(post(b"/f", b"a=bad&b=2") + post(b"/f", b"a=1"))
        raw = self.transport.value()
        self.assertIn(b"HTTP/1.1 400 Bad Request", raw)
        self.assertIn(b"HTTP/1.1 200 OK", raw)
        self.assertFalse(self.transport.disconnecting)

    def test_expect_continue_refused_on_query(self):
        self.send(post(b"/q?ok=0", b"", extra=b"Expect: 100-continue\r\n")
                  .replace(b"Content-Length: 0", b"Content-Length: 1000000"))
        raw = self.transport.value()
        self.assertNotIn(b"100 Continue", raw)
        self.assertEqual(response(raw)[0], 400)
        self.assertTrue(self.transport.disconnecting)

    def test_expect_continue_sent_when_body_wanted(self):
        body = b"a=1&b=2"
        full = post(b"/q?ok=1", body, extra=b"Expect: 100-continue\r\n")
        self.send(full[:-len(body)])
        self.assertEqual(self.transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        self.send(body)
        self.assertEqual(response(self.transport.value())[0], 200)
        self.assertEqual(self.transport.value().count(b"100 Continue"), 1)

    def test_missing_parameter_at_body_end(self):
        self.send(post(b"/f", b"b=1"))
        self.assertEqual(error_code(self.transport.value()), "missing_parameter")

    def test_default(self):
        self.send(post(b"/default", b"b=1"))
        self.assertEqual(json.loads(response(self.transport.value())[2]), "dflt")

    def test_raw_body(self):
        self.send(post(b"/raw", b"\x00\x01binary", ctype=b"application/octet-stream"))
        status, headers, out = response(self.transport.value())
        self.assertEqual((status, out), (200, b"\x00\x01binary"))

    def test_json(self):
        self.send(post(b"/json", b'{"a": "v", "n": 2}', ctype=b"application/json"))
        self.assertEqual(json.loads(response(self.transport.value())[2]), {"a": ["v"], "n": [2]})

    def test_eof_while_handling_cancels_chain(self):
        """
        A client EOF after a complete request is a disconnect (as in
        twisted.web): the pending pipe is cancelled.
        """
        self.send(post(b"/wait", b"a=1"))
        self.assertEqual(len(self.waiting), 1)
        self.channel.readConnectionLost()
        self.assertTrue(self.transport.disconnecting)
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.cancelled)

    def test_get_without_body_is_buffered(self):
        self.send(b"GET /_pipecomet/status HTTP/1.1\r\nHost: t\r\n\r\n")
        self.assertEqual(response(self.transport.value())[0], 200)
        self.assertEqual(self.server.stats.requests_buffered, 1)


class HalfCloseTransport(StringTransport):
    """
    A memory transport that can shut its write side, like TCP.
    """

    write_closed = False
    aborted = False

    def loseWriteConnection(self):
        self.write_closed = True

    def abortConnection(self):
        self.aborted = True


class MoreRequestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = Server(first_then_form([]), linger=1.5)

    def test_early_close_half_closes_then_drops_after_linger(self):
        ch = self.server.site.buildProtocol(None)
        t = HalfCloseTransport()
        ch.makeConnection(t)
        body = b"a=bad&" + b"x" * 5000
        ch.dataReceived(post(b"/f", body)[:-4000])
        self.assertEqual(response(t.value())[0], 400)
        self.assertEqual((t.producerState, t.write_closed, t.aborted, t.disconnecting),
                         ("paused", True, False, False))
        self.server.clock.advance(1.4)
        self.assertFalse(t.aborted)
        self.server.clock.advance(0.2)
        self.assertTrue(t.aborted)

    def test_chunked_lazy_body(self):
        ch, t = self.server.connect()
        ch.dataReceived(b"POST /f HTTP/1.1\r\nHost: t\r\nContent-Type: " + FORM +
                        b"\r\nTransfer-Encoding: chunked\r\n\r\n4\r\na=1&\r\n")
        self.assertEqual(t.value(), b"")
        ch.dataReceived(b"3\r\nb=2\r\n0\r\n\r\n")
        status, _, out = response(t.value())
        self.assertEqual((status, json.loads(out)), (200, {"a": ["1"], "b": ["2"]}))
        self.assertFalse(t.disconnecting)

    def test_expect_continue_at_once_for_non_chain_paths(self):
        ch, t = self.server.connect()
        ch.dataReceived(post(b"/nowhere", b"abc", extra=b"Expect: 100-continue\r\n")[:-3])
        self.assertEqual(t.value(), b"HTTP/1.1 100 Continue\r\n\r\n")

    def test_expect_continue_at_once_when_not_lazy(self):
        server = Server(first_then_form([]), lazy=False)
        ch, t = server.connect()
        ch.dataReceived(post(b"/f", b"a=1", extra=b"Expect: 100-continue\r\n")[:-3])
        self.assertEqual(t.value(), b"HTTP/1.1 100 Continue\r\n\r\n")

    def test_413_on_headers_sends_no_continue(self):
        ch, t = self.server.connect()
        ch.dataReceived(post(b"/f", b"", extra=b"Expect: 100-continue\r\n").replace(
            b"Content-Length: 0", b"Content-Length: 99999999"))
        self.assertNotIn(b"100 Continue", t.value())
        self.assertEqual(error_code(t.value()), "body_too_large")


class MalformedBodyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = Server(first_then_form([]))

    def answer(self, data: bytes, half_close: bool = False) -> tuple[int, str]:
        ch, t = self.server.connect()
        ch.dataReceived(data)
        if half_close:
            ch.readConnectionLost()
        raw = t.value()
        status, headers, out = response(raw)
        self.assertEqual(headers[b"content-type"], b"application/json")
        return status, json.loads(out)["error"]["code"]

    def test_bad_percent_encoding(self):
        self.assertEqual(self.answer(post(b"/f", b"a=%Z1&b=2")), (400, "bad_percent_encoding"))

    def test_broken_multipart_boundary(self):
        body = multipart_body([("field", "a", "1")], "B").replace(b"--B\r\n", b"--C\r\n")
        self.assertEqual(self.answer(post(b"/f", body, b"multipart/form-data; boundary=B")),
                         (400, "bad_multipart"))

    def test_multipart_without_boundary(self):
        self.assertEqual(self.answer(post(b"/f", b"xx", b"multipart/form-data")),
                         (400, "bad_multipart"))

    def test_malformed_chunked(self):
        data = (b"POST /f HTTP/1.1\r\nHost: t\r\nContent-Type: " + FORM +
                b"\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nb=1\r\nzz\r\n")
        self.assertEqual(self.answer(data), (400, "bad_chunked_encoding"))

    def test_truncated_chunked(self):
        data = (b"POST /f HTTP/1.1\r\nHost: t\r\nContent-Type: " + FORM +
                b"\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nb=1\r\n10\r\nx=")
        self.assertEqual(self.answer(data, half_close=True), (400, "truncated_body"))

    def test_invalid_json(self):
        self.assertEqual(self.answer(post(b"/json", b'{"a": }', b"application/json")),
                         (400, "invalid_json"))

    def test_wrong_charset(self):
        self.assertEqual(self.answer(post(b"/f", b"a=%C3%28")), (400, "bad_charset"))
        self.assertEqual(self.answer(post(b"/f", b"a=1", FORM + b"; charset=x-unknown")),
                         (400, "unsupported_charset"))


class LimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = Server(first_then_form([]), max_body_bytes=1000, max_fields=3,
                             max_field_bytes=50, max_header_bytes=400, max_headers=5,
                             header_timeout=5, body_timeout=7)
        self.channel, self.transport = self.server.connect()

    def answer(self, closed: bool = True) -> tuple[int, str]:
        raw = self.transport.value()
        status, headers, out = response(raw)
        self.assertEqual(headers[b"content-type"], b"application/json")
        # A body that was all in hand when refused leaves the connection open.
        self.assertEqual(bool(self.transport.disconnecting), closed)
        return status, json.loads(out)["error"]["code"]

    def test_content_length_over_limit(self):
        self.channel.dataReceived(post(b"/f", b"")[:-2].replace(b"Content-Length: 0",
                                                                b"Content-Length: 1001")
                                  + b"\r\n")
        self.assertEqual(self.answer(), (413, "body_too_large"))
        self.assertEqual(self.server.stats.body_bytes_read, 0)

    def test_chunked_bytes_over_limit(self):
        self.channel.dataReceived(b"POST /raw HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked"
                                  b"\r\n\r\n")
        for _ in range(3):
            self.channel.dataReceived(b"190\r\n" + b"x" * 400 + b"\r\n")
        self.assertEqual(self.answer(), (413, "body_too_large"))

    def test_declared_chunk_size_over_limit_refused_before_its_data(self):
        """
        A chunk-size line declaring more than the body may still take is
        refused with 413 as soon as the line is in, whatever the reads'
        boundaries: no byte of that chunk's data is needed, and nothing
        after it is read.
        """
        head = b"POST /raw HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        body = b"64;ext=1\r\n" + b"x" * 100 + b"\r\n" + b"3E9\r\n"  # 100, then 1001
        whole = head + body
        line_end = len(whole)  # the 1001-byte chunk's size line ends here
        for cut in range(len(head) - 3, line_end + 1):
            for second in (cut, min(cut + 2, line_end)):
                server = Server(first_then_form([]), max_body_bytes=1000)
                ch, t = server.connect()
                pieces = [whole[:cut], whole[cut:second], whole[second:]]
                for piece in pieces:
                    if piece:
                        ch.dataReceived(piece)
                code = error_code(t.value())
                self.assertEqual((response(t.value())[0], code), (413, "body_too_large"),
                                 (cut, second))
                self.assertTrue(t.disconnecting)
                self.assertEqual(t.producerState, "paused")
                ch.dataReceived(b"y" * 500)
                self.assertEqual(server.stats.body_bytes_read, 100)

    def test_declared_chunk_size_counts_what_came_before(self):
        # 600 bytes in, then a chunk of 401: over; a chunk of 400: served.
        for size, status in ((b"191", 413), (b"190", 200)):
            server = Server(first_then_form([]), max_body_bytes=1000)
            ch, t = server.connect()
            ch.dataReceived(b"POST /raw HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked"
                            b"\r\n\r\n258\r\n" + b"x" * 600 + b"\r\n" + size + b"\r\nab")
            if status == 413:
                self.assertEqual(error_code(t.value()), "body_too_large")
                continue
            self.assertEqual(t.value(), b"")
            ch.dataReceived(b"x" * (0x190 - 2) + b"\r\n0\r\n\r\n")
            self.assertEqual(response(t.value())[0], 200)
            self.assertEqual(len(response(t.value())[2]), 1000)

    def test_declared_chunk_size_of_a_waiting_request(self):
        """
        A pipelined chunked request waiting behind another answer is
        refused on its declared chunk size too, in its turn.
        """
        waiting: list[Deferred] = []

        def routes(app: App) -> None:
            first_then_form([])(app)

            def wait(inp, ctx, res):
                waiting.append(Deferred())
                return waiting[-1]

            app.route("/wait", [Pipe(wait)])

        server = Server(routes, max_body_bytes=1000)
        ch, t = server.connect()
        ch.dataReceived(b"GET /wait HTTP/1.1\r\nHost: t\r\n\r\n"
                        b"POST /raw HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked"
                        b"\r\n\r\nFFFFFF\r\nxx")
        self.assertEqual(t.value(), b"")
        self.assertEqual(t.producerState, "paused")  # nothing more is read
        waiting[0].callback({"ok": 1})
        first, second = t.value().split(b"HTTP/1.1 ")[1:]
        self.assertTrue(first.startswith(b"200 "))
        self.assertEqual(error_code(b"HTTP/1.1 " + second), "body_too_large")
        self.assertTrue(t.disconnecting)

    def test_too_many_fields(self):
        self.channel.dataReceived(post(b"/f", b"a=1&b=2&c=3&d=4"))
        self.assertEqual(self.answer(closed=False), (413, "too_many_fields"))

    def test_field_too_large(self):
        data = post(b"/f", b"a=" + b"x" * 60 + b"&b=" + b"y" * 200)
        self.channel.dataReceived(data[:-100])
        self.assertEqual(self.answer(), (413, "field_too_large"))

    def test_headers_too_large(self):
        self.channel.dataReceived(b"GET / HTTP/1.1\r\nX-Big: " + b"y" * 500 + b"\r\n\r\n")
        self.assertEqual(self.answer(), (431, "header_too_large"))

    def test_too_many_headers(self):
        self.channel.dataReceived(b"GET / HTTP/1.1\r\n" + b"".join(
            b"X-H%d: 1\r\n" % i for i in range(6)) + b"\r\n")
        self.assertEqual(self.answer(), (431, "too_many_headers"))

    def test_header_timeout(self):
        self.channel.dataReceived(b"GET / HTTP/1.1\r\nHost: t\r\n")
        self.server.clock.advance(4.9)
        self.assertEqual(self.transport.value(), b"")
        self.server.clock.advance(0.2)
        self.assertEqual(self.answer(), (408, "header_timeout"))

    def test_body_timeout(self):
        self.channel.dataReceived(post(b"/f", b"a=1&b=")[:-3])
        self.server.clock.advance(6.9)
        self.assertEqual(self.transport.value(), b"")
        self.server.clock.advance(0.2)
        self.assertEqual(self.answer(), (408, "body_timeout"))

    def test_idle_timeout_mid_body_is_408(self):
        server = Server(first_then_form([]), body_timeout=100)
        server.site.timeOut = 3
        ch, t = server.connect()
        ch.dataReceived(post(b"/f", b"a=1&b=")[:-3])
        server.clock.advance(3.1)
        self.assertEqual(error_code(t.value()), "body_timeout")
        self.assertTrue(t.disconnecting)

    def test_body_timeout_buffered_request(self):
        """
        A request for a plain (non-chain) path is buffered, and still held
        to the body deadline.
        """
        self.channel.dataReceived(post(b"/nowhere", b"abcdef")[:-3])
        self.server.clock.advance(7.1)
        self.assertEqual(self.answer(), (408, "body_timeout"))

    def test_limits_in_buffered_mode(self):
        server = Server(first_then_form([]), lazy=False, max_body_bytes=10)
        ch, t = server.connect()
        ch.dataReceived(post(b"/f", b"a=1&b=" + b"x" * 20))
        self.assertEqual(response(t.value())[0], 413)


class NonChainResourceTests(SynchronousTestCase):
    def test_klein_route_keeps_twisted_semantics(self):
        server = Server(lambda app: None)

        @server.app.klein_route("/plain", methods=["POST"])
        def plain(request):
            return json.dumps({k.decode(): [v.decode() for v in vs]
                               for k, vs in request.args.items()}).encode()

        ch, t = server.connect()
        ch.dataReceived(post(b"/plain?q=1", b"a=1&b=2"))
        raw = t.value()
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 OK"))
        # Klein streams it chunked: one chunk holds the JSON.
        chunk = raw.split(b"\r\n\r\n", 1)[1].split(b"\r\n")[1]
        self.assertEqual(json.loads(chunk), {"q": ["1"], "a": ["1"], "b": ["2"]})
        self.assertEqual(server.stats.requests_lazy, 0)


class ConfigTests(SynchronousTestCase):
    def test_bad_value_names_key(self):
        from pipecomet import ConfigError

        with self.assertRaises(ConfigError) as cm:
            Config.from_dict({"limits": {"max_body_bytes": 0}})
        self.assertIn("max_body_bytes", str(cm.exception))
        with self.assertRaises(ConfigError):
            Config.from_dict({"limits": {"nope": 1}})

    def test_site_without_limits_section_is_lazy_by_default(self):
        app = App(reactor=Clock())
        app.configure(Config())
        from pipecomet._lazy import LazySite

        self.assertIsInstance(app.site(), LazySite)

    def test_install_registers_status(self):
        app = App(reactor=Clock())
        install(app, LimitsConfig())
        self.assertIn("lazy", app.runtime.status())
