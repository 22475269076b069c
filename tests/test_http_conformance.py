"""
HTTP/1.1 conformance of the two server paths, with raw bytes over real
sockets: a ``twistd -n pipecomet`` subprocess per path (pipecomet's own
protocol, ``[server] protocol = "twisted"``) and, where it matters, over
TLS (``ssl:`` endpoint, a self-signed certificate made in a tmp dir).

Where twisted.web's channel legitimately differs (it has no header or
body deadlines, answers its own refusals with a bare HTML 400, and is
lenient about bare LF and a missing Host), the expectation is marked per
path.  Every refusal by pipecomet's path carries the JSON error body;
nothing after a request whose framing is in doubt is ever processed.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support import ROOT, TWISTD, free_port, stop_process, wait_for_port

PATHS = ["pipecomet", "twisted"]
TIMEOUT = 15.0


# ---------------------------------------------------------------------------
# the app the servers run


def make_app(config: Any = None, reactor: Any = None) -> Any:
    """
    ``GET /n?n=N`` answers ``{"n": "N"}``; ``POST /echo`` answers the body;
    ``POST /check?ok=1`` needs the query to say ok, then body field ``a``.
    """
    from pipecomet import App, BadRequest, Pipe

    app = App(reactor=reactor, name="conformance")
    app.route("/n", [Pipe(lambda i, c, r: {"n": i.query.get("n"), "path": i.path}, name="n")])
    app.route("/echo", [Pipe(lambda i, c, r: i.body(), name="echo")], methods=("POST",))

    def ok(inp, ctx, res):
        if inp.query.get("ok") != "1":
            raise BadRequest("ok must be 1", code="invalid_parameter")

    app.route("/check", [Pipe(ok), Pipe(lambda i, c, r: i.param("a"), name="a")],
              methods=("POST",))
    return app


CONFIG = """
[server]
protocol = "{protocol}"
access_log = "off"
idle_timeout = 30.0

[limits]
max_body_bytes = 65536
max_header_bytes = 4096
max_headers = 30
header_timeout = 1.0
body_timeout = 1.5
linger = 1.0
"""


@contextmanager
def _server(tmp: Path, protocol: str, tls: bool | str) -> Iterator[Any]:
    config = tmp / f"{protocol}-{tls}.toml"
    config.write_text(CONFIG.format(protocol=protocol))
    port = free_port()
    if tls == "unix":
        path = tmp / f"{protocol}.sock"
        endpoint = f"unix:{path}"
    elif tls:
        key, cert = tmp / "key.pem", tmp / "cert.pem"
        if not key.exists():
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                            "-keyout", str(key), "-out", str(cert), "-days", "2",
                            "-subj", "/CN=localhost"], check=True, capture_output=True,
                           timeout=60)
        endpoint = f"ssl:{port}:privateKey={key}:certKey={cert}:interface=127.0.0.1"
    else:
        endpoint = f"tcp:{port}:interface=127.0.0.1"
    cmd = [*TWISTD, "-n", "--pidfile=", "pipecomet", "--port", endpoint,
           "--app", "tests.test_http_conformance:make_app", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                            env=env, start_new_session=True)
    try:
        if tls == "unix":
            deadline = time.monotonic() + 20
            while not path.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the UNIX socket server did not start")
                time.sleep(0.05)
            yield str(path)
        else:
            wait_for_port(port, proc)
            yield port
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """
    ``servers(protocol, tls)`` → port; each server starts on first use and
    stops with the module.
    """
    tmp = tmp_path_factory.mktemp("conformance")
    running: dict[tuple[str, Any], Any] = {}
    stack: list[Any] = []

    def get(protocol: str, tls: bool | str = False) -> Any:
        key = (protocol, tls)
        if key not in running:
            cm = _server(tmp, protocol, tls)
            running[key] = cm.__enter__()
            stack.append(cm)
        return running[key]

    try:
        yield get
    finally:
        for cm in reversed(stack):
            cm.__exit__(None, None, None)


# ---------------------------------------------------------------------------
# a raw client


class Client:
    """
    A blocking socket (TLS optional) and a reader of responses from it.
    """

    def __init__(self, port: Any, tls: bool | str = False) -> None:
        if tls == "unix":
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.settimeout(TIMEOUT)
            raw.connect(port)
        else:
            raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        if tls is True:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            raw = ctx.wrap_socket(raw, server_hostname="localhost",
                                  suppress_ragged_eofs=False)
        self.sock = raw
        self.buf = b""
        self.eof = False
        self.statuses: list[int] = []  # of every response head read, 1xx included

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _more(self) -> bool:
        if self.eof:
            return False
        data = self.sock.recv(65536)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def response(self, head: bool = False) -> tuple[int, dict[str, str], bytes]:
        """
        The next final response (1xx skipped): status, headers (lower-case
        names), body.
        """
        while True:
            status, headers = self._head()
            if status >= 200:
                break
        if head or status in (204, 304):
            return status, headers, b""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            return status, headers, self._chunked()
        if "content-length" in headers:
            n = int(headers["content-length"])
            while len(self.buf) < n:
                if not self._more():
                    raise AssertionError(f"EOF inside a body: {self.buf!r}")
            body, self.buf = self.buf[:n], self.buf[n:]
            return status, headers, body
        while self._more():
            pass
        body, self.buf = self.buf, b""
        return status, headers, body

    def interim(self) -> int | None:
        """
        The status of the next response head if one is there (1xx included).
        """
        status, _ = self._head()
        return status

    def _head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self.buf:
            if not self._more():
                raise AssertionError(f"EOF before a response head: {self.buf!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        self.statuses.append(status)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        return status, headers

    def _chunked(self) -> bytes:
        out = b""
        while True:
            while b"\r\n" not in self.buf:
                if not self._more():
                    raise AssertionError("EOF inside a chunked body")
            line, self.buf = self.buf.split(b"\r\n", 1)
            size = int(line.split(b";")[0], 16)
            while len(self.buf) < size + 2:
                if not self._more():
                    raise AssertionError("EOF inside a chunk")
            out += self.buf[:size]
            self.buf = self.buf[size + 2:]
            if size == 0:
                return out

    def closed(self) -> bool:
        """
        True when the server closes the connection with nothing more sent.
        """
        try:
            return not self._more() and not self.buf
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def client(servers: Any) -> Iterator[Any]:
    made: list[Client] = []

    def connect(protocol: str, tls: bool | str = False) -> Client:
        c = Client(servers(protocol, tls), tls)
        made.append(c)
        return c

    yield connect
    for c in made:
        c.close()


def error_code(body: bytes) -> str:
    return json.loads(body)["error"]["code"]


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def refused(c: Client, protocol: str, status: int, code: str | None) -> None:
    """
    The next response is a refusal with ``status`` (and, on pipecomet's
    path, the JSON body with ``code``), and the connection then closes.
    """
    got, headers, body = c.response()
    assert got == status, (got, body)
    if protocol == "pipecomet":
        assert headers["content-type"] == "application/json"
        err = json.loads(body)["error"]
        assert err["code"] == code and err["message"] and err["id"]
    assert c.closed()


# ---------------------------------------------------------------------------
# the three bugs of issue 10


@pytest.mark.parametrize("protocol", PATHS)
def test_two_pipelined_gets_in_one_write(client: Any, protocol: str) -> None:
    c = client(protocol)
    c.send(get("/n?n=1") + get("/n?n=2", "Connection: close\r\n"))
    assert c.response()[0:3:2] == (200, b'{"n":"1","path":"/n"}')
    status, headers, body = c.response()
    assert (status, json.loads(body)["n"]) == (200, "2")
    assert headers["connection"] == "close"
    assert c.closed()


def tls_ended_cleanly(c: Client) -> None:
    """
    The server's TLS side ended with close_notify (no SSLEOFError).
    """
    try:
        while c._more():
            pass
    except ssl.SSLEOFError:  # pragma: no cover - the failure being tested for
        raise AssertionError("the server closed TCP without a TLS close_notify")
    except ConnectionResetError:  # pragma: no cover
        raise AssertionError("the server reset the TLS connection")
    assert c.eof


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_header_timeout_408_delivered(client: Any, tls: bool) -> None:
    c = client("pipecomet", tls)
    c.send(b"GET /n HTTP/1.1\r\nHost: x\r\n")
    status, headers, body = c.response()
    assert (status, error_code(body)) == (408, "header_timeout")
    assert headers["connection"] == "close"
    if tls:
        tls_ended_cleanly(c)
    else:
        assert c.closed()


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_body_timeout_408_delivered(client: Any, tls: bool) -> None:
    c = client("pipecomet", tls)
    c.send(post("/echo", b"x" * 100)[:-60])
    status, _, body = c.response()
    assert (status, error_code(body)) == (408, "body_timeout")
    if tls:
        tls_ended_cleanly(c)
    else:
        assert c.closed()


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_early_answer_ends_cleanly(client: Any, tls: bool) -> None:
    c = client("pipecomet", tls)
    head = (b"POST /check?ok=0 HTTP/1.1\r\nHost: x\r\nContent-Type: "
            b"application/x-www-form-urlencoded\r\nContent-Length: 60000\r\n\r\n")
    c.send(head + b"a=1&" + b"x" * 1000)
    status, headers, body = c.response()
    assert (status, error_code(body), headers["connection"]) == (400, "invalid_parameter",
                                                                 "close")
    if tls:
        tls_ended_cleanly(c)
    else:
        assert c.closed()


@pytest.mark.parametrize("protocol", PATHS)
def test_stray_crlf_after_response_is_ignored(client: Any, protocol: str) -> None:
    c = client(protocol)
    c.send(get("/n?n=1"))
    assert c.response()[0] == 200
    c.send(b"\r\n")
    time.sleep(1.6)  # past header_timeout: no 408 may have been armed
    c.send(get("/n?n=2"))
    status, _, body = c.response()
    assert (status, json.loads(body)["n"]) == (200, "2")


# ---------------------------------------------------------------------------
# framing: refused, closed, and nothing smuggled is processed


SMUGGLED = get("/n?n=smuggled")


@pytest.mark.parametrize("protocol", PATHS)
@pytest.mark.parametrize("request_bytes,code", [
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" % (5 + len(SMUGGLED)) + SMUGGLED,
     "conflicting_framing"),
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 40\r\n\r\nabc"
     + SMUGGLED, "bad_content_length"),
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
     b"0\r\n\r\n" + SMUGGLED, "bad_transfer_encoding"),
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length : 5\r\n\r\nabcde" + SMUGGLED,
     "bad_header"),
    (b"GET /n HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n" + SMUGGLED, "bad_header"),
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"FFFFFFFFFFFFFFFFFFFFFF\r\nabc\r\n0\r\n\r\n" + SMUGGLED, "bad_chunked_encoding"),
], ids=["cl-te", "duplicate-cl", "te-chunked-identity", "space-before-colon", "nul",
        "chunk-size-overflow"])
def test_framing_in_doubt_is_refused(client: Any, protocol: str, request_bytes: bytes,
                                     code: str) -> None:
    c = client(protocol)
    c.send(request_bytes)
    if protocol == "twisted" and code == "bad_chunked_encoding":
        # twisted.web takes the huge chunk size and waits for its bytes;
        # the request after it is not answered either.
        c.sock.settimeout(2.0)
        with pytest.raises(TimeoutError):
            c.response()
        return
    refused(c, protocol, 400, code)


@pytest.mark.parametrize("protocol", PATHS)
def test_obs_fold_and_bare_lf(client: Any, protocol: str) -> None:
    fold = client(protocol)
    fold.send(b"GET /n HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n" + SMUGGLED)
    bare = client(protocol)
    bare.send(b"GET /n?n=1 HTTP/1.1\nHost: x\n\n" + SMUGGLED)
    if protocol == "pipecomet":
        refused(fold, protocol, 400, "bad_header")
        refused(bare, protocol, 400, "bad_line_ending")
        return
    # twisted.web unfolds obs-fold (the request is then well framed and
    # answered with the next) and refuses a bare LF with its own 400.
    assert fold.response()[0] == 200
    assert json.loads(fold.response()[2])["n"] == "smuggled"
    refused(bare, protocol, 400, None)


@pytest.mark.parametrize("protocol", PATHS)
def test_chunk_extensions_accepted_and_chunked_in(client: Any, protocol: str) -> None:
    c = client(protocol)
    c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3;name=value\r\nabc\r\n2\r\nde\r\n0\r\n\r\n" + get("/n?n=after"))
    assert c.response()[0:3:2] == (200, b"abcde")
    assert json.loads(c.response()[2])["n"] == "after"


@pytest.mark.parametrize("protocol", PATHS)
def test_absolute_form_target(client: Any, protocol: str) -> None:
    c = client(protocol)
    c.send(b"GET http://example.com/n?n=abs HTTP/1.1\r\nHost: example.com\r\n\r\n")
    status, _, body = c.response()
    if protocol == "pipecomet":
        assert (status, json.loads(body)) == (200, {"n": "abs", "path": "/n"})
    else:
        assert status == 404  # twisted.web looks the whole URL up as a path


@pytest.mark.parametrize("protocol", PATHS)
def test_missing_host(client: Any, protocol: str) -> None:
    c = client(protocol)
    c.send(b"GET /n HTTP/1.1\r\n\r\n" + get("/n?n=2"))
    status, _, body = c.response()
    if protocol == "pipecomet":
        assert (status, error_code(body)) == (400, "missing_host")
    else:
        assert status == 200  # twisted.web does not insist on Host
    assert json.loads(c.response()[2])["n"] == "2"  # well framed: the next one is served


@pytest.mark.parametrize("protocol", PATHS)
def test_oversized_request_line_and_headers(client: Any, protocol: str) -> None:
    line = client(protocol)
    line.send(b"GET /n?x=" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    many = client(protocol)
    many.send(b"GET /n HTTP/1.1\r\nHost: x\r\n" + b"X-H: 1\r\n" * 40 + b"\r\n")
    big = client(protocol)
    big.send(b"GET /n HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * 5000 + b"\r\n\r\n")
    if protocol == "pipecomet":
        refused(line, protocol, 431, "header_too_large")
        refused(many, protocol, 431, "too_many_headers")
        refused(big, protocol, 431, "header_too_large")
    else:
        # twisted.web's own limits: a line over 16 KiB drops the
        # connection unanswered; 40 headers of 5 KB are within them.
        assert line.closed()
        assert many.response()[0] == 200
        assert big.response()[0] == 200


# ---------------------------------------------------------------------------
# pipelining, keep-alive, HEAD, 100-continue


@pytest.mark.parametrize("protocol", PATHS)
def test_thousand_pipelined_gets_in_order(client: Any, protocol: str) -> None:
    c = client(protocol)
    c.send(b"".join(get(f"/n?n={i}") for i in range(1000)))
    for i in range(1000):
        status, _, body = c.response()
        assert (status, json.loads(body)["n"]) == (200, str(i))


@pytest.mark.parametrize("protocol", PATHS)
def test_thousand_pipelined_posts_in_order(client: Any, protocol: str) -> None:
    c = client(protocol)
    c.send(b"".join(post("/echo", b"body-%d" % i) for i in range(1000)))
    for i in range(1000):
        status, _, body = c.response()
        assert (status, body) == (200, b"body-%d" % i)


@pytest.mark.parametrize("protocol", PATHS)
def test_http10_keep_alive(client: Any, protocol: str) -> None:
    c = client(protocol)
    c.send(b"GET /n?n=1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    status, headers, body = c.response()
    assert (status, json.loads(body)["n"]) == (200, "1")
    if protocol == "twisted":
        # twisted.web keeps no HTTP/1.0 connection alive.
        assert c.closed()
        return
    assert headers["connection"].lower() == "keep-alive"
    c.send(b"GET /n?n=2 HTTP/1.0\r\n\r\n")
    assert json.loads(c.response()[2])["n"] == "2"
    assert c.closed()  # no keep-alive asked: closed after the answer


@pytest.mark.parametrize("protocol", PATHS)
def test_head_has_no_body(client: Any, protocol: str) -> None:
    c = client(protocol)
    c.send(get("/n?n=1"))
    length = c.response()[1]["content-length"]
    c.send(b"HEAD /n?n=1 HTTP/1.1\r\nHost: x\r\n\r\n" + get("/n?n=2"))
    status, headers, _ = c.response(head=True)
    assert (status, headers["content-length"]) == (200, length)
    status, _, body = c.response()  # would be garbage if HEAD had sent a body
    assert json.loads(body)["n"] == "2"


@pytest.mark.parametrize("protocol", PATHS)
def test_expect_continue_when_the_body_is_wanted(client: Any, protocol: str) -> None:
    c = client(protocol)
    body = b"a=1"
    c.send(b"POST /check?ok=1 HTTP/1.1\r\nHost: x\r\nContent-Type: "
           b"application/x-www-form-urlencoded\r\nExpect: 100-continue\r\n"
           b"Content-Length: 3\r\n\r\n")
    assert c.interim() == 100
    c.send(body)
    status, _, out = c.response()
    assert (status, json.loads(out)) == (200, "1")


@pytest.mark.parametrize("protocol", PATHS)
def test_expect_continue_refused_from_the_query(client: Any, protocol: str) -> None:
    c = client(protocol)
    c.send(b"POST /check?ok=0 HTTP/1.1\r\nHost: x\r\nContent-Type: "
           b"application/x-www-form-urlencoded\r\nExpect: 100-continue\r\n"
           b"Content-Length: 50000\r\n\r\n")
    if protocol == "pipecomet":
        # Refused on the query: no 100 Continue, the body is never asked for.
        refused(c, protocol, 400, "invalid_parameter")
        assert c.statuses == [400]
    else:
        assert c.interim() == 100  # twisted.web asks for every body at once


@pytest.mark.parametrize("protocol", PATHS)
def test_declared_body_over_the_limit(client: Any, protocol: str) -> None:
    c = client(protocol)
    c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n")
    if protocol == "pipecomet":
        refused(c, protocol, 413, "body_too_large")
    else:
        # twisted.web has no body limit: it waits for the 70,000 bytes.
        c.send(b"z" * 70000)
        assert c.response()[2] == b"z" * 70000


# ---------------------------------------------------------------------------
# a UNIX socket is a stream transport like the others


def test_unix_socket_pipelining_and_early_answer(client: Any) -> None:
    c = client("pipecomet", "unix")
    c.send(get("/n?n=1") + get("/n?n=2"))
    assert [json.loads(c.response()[2])["n"] for _ in range(2)] == ["1", "2"]
    early = client("pipecomet", "unix")
    early.send(b"POST /check?ok=0 HTTP/1.1\r\nHost: x\r\nContent-Type: "
               b"application/x-www-form-urlencoded\r\nContent-Length: 60000\r\n\r\na=1&")
    refused(early, "pipecomet", 400, "invalid_parameter")
