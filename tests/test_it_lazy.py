"""
Integration tests of the lazy parser over real sockets: a ``twistd -n
pipecomet`` server in a subprocess (the demo's upload and echo routes plus
a test route), driven by plain blocking sockets from the test process.
"""

from __future__ import annotations

import json
import os
import select
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support import twistd_server

MiB = 2**20


# ---------------------------------------------------------------------------
# the app the server subprocess runs


def make_test_app(config: Any = None, reactor: Any = None) -> Any:
    """
    The demo's echo and upload routes, plus ``POST /it/order``: its first
    pipe needs only field ``a`` and records how much of the body the server
    had when it ran.
    """
    from pipecomet import App, Pipe
    from pipecomet.demo import _gateway, _upload

    app = App(reactor=reactor, name="lazy-it")
    _gateway.install_routes(app)
    _upload.install_routes(app)

    def first(inp, ctx, res):
        def ran(a):
            source = inp.body_source
            return {"a": a, "body_bytes_then": getattr(source, "received", None),
                    "complete_then": getattr(source, "complete", True)}
        return inp.param("a").addCallback(ran)

    def rest(inp, ctx, res):
        def done(form):
            return {"first": res["first"], "form": form,
                    "body_bytes": getattr(inp.body_source, "received", None)}
        return inp.form().addCallback(done)

    app.route("/it/order", [Pipe(first), Pipe(rest)], methods=("POST",))
    return app


CONFIG = """
[limits]
max_body_bytes = 209715200
max_fields = 20
max_field_bytes = 65536
max_header_bytes = 4096
max_headers = 30
header_timeout = 1.0
body_timeout = 4.0
file_memory_bytes = 262144
max_part_header_bytes = 1024
linger = 2.0
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    path = tmp_path_factory.mktemp("lazy") / "lazy.toml"
    path.write_text(CONFIG)
    with twistd_server(["--app", "tests.test_it_lazy:make_test_app", "--config", str(path)],
                       env={"PYTHONPATH": os.pathsep.join(filter(None, (
                           str(Path(__file__).resolve().parent.parent),
                           os.environ.get("PYTHONPATH"))))}) as (port, proc):
        yield port, proc.pid


# ---------------------------------------------------------------------------
# a raw HTTP client


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_response(s: socket.socket, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes, bytes]:
    """
    Read one final response: (status, headers, body, everything read).
    """
    s.settimeout(timeout)
    raw = b""
    while True:
        head_end = raw.find(b"\r\n\r\n")
        while head_end >= 0 and raw[:head_end].split(b" ")[1].startswith(b"1"):
            head_end = raw.find(b"\r\n\r\n", head_end + 4)
        if head_end >= 0:
            head = raw[:head_end]
            # The final response's head starts after any 1xx heads.
            last = head.rsplit(b"\r\n\r\n", 1)[-1]
            lines = last.split(b"\r\n")
            status = int(lines[0].split()[1])
            headers = {k.strip().lower().decode(): v.strip().decode()
                       for k, _, v in (ln.partition(b":") for ln in lines[1:])}
            n = int(headers.get("content-length", "0"))
            if len(raw) >= head_end + 4 + n:
                return status, headers, raw[head_end + 4:head_end + 4 + n], raw
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise AssertionError(f"connection closed before a full response: {raw!r}")
        raw += chunk


def request(port: int, data: bytes) -> tuple[int, dict[str, str], bytes, bytes]:
    with connect(port) as s:
        s.sendall(data)
        return read_response(s)


def post(path: str, body: bytes, ctype: str = "application/x-www-form-urlencoded",
         extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def error_of(resp: tuple) -> tuple[int, str]:
    status, headers, body, _ = resp
    assert headers["content-type"] == "application/json"
    return status, json.loads(body)["error"]["code"]


def status_of(port: int) -> dict[str, Any]:
    status, _, body, _ = request(port, b"GET /_pipecomet/status HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    return json.loads(body)["lazy"]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# ---------------------------------------------------------------------------
# the tests


FORM_BODY = b"a=first&b=2&c=" + b"x" * 2000 + b"&d=%E2%82%AC&e=last"
JSON_BODY = json.dumps({"a": "first", "b": [2, {"n": "}"}], "c": "x" * 2000, "d": "€",
                        "e": "last"}, ensure_ascii=False).encode("utf-8")


def wait_for_body_bytes(port: int, want: int, polls: int = 1500) -> int:
    """
    Poll the server's ``body_bytes_read`` figure until it reaches ``want``
    (bounded: 1500 polls of 20 ms, then the test fails).
    """
    seen = 0
    for _ in range(polls):
        seen = status_of(port)["body_bytes_read"]
        if seen >= want:
            return seen
        time.sleep(0.02)
    raise AssertionError(f"the server read {seen} body bytes, wanted {want}")


@pytest.mark.parametrize("ctype, body", [("application/x-www-form-urlencoded", FORM_BODY),
                                         ("application/json", JSON_BODY)], ids=["form", "json"])
def test_slow_body_first_pipe_runs_before_body_end(server, ctype, body):
    """
    A body whose last bytes are held back until the server has read the
    rest: the first pipe ran when only part of the body was in, and the
    answer is the one the whole body gets.
    """
    port, _ = server
    data = post("/it/order", body, ctype)
    head = len(data) - len(body)
    before = status_of(port)["body_bytes_read"]
    with connect(port) as s:
        s.sendall(data[:-5])
        # The server has the body but its last 5 bytes: "a" is complete
        # and the first pipe has run; the body cannot be complete yet.
        wait_for_body_bytes(port, before + len(body) - 5)
        s.sendall(data[-5:])
        slow = read_response(s)
    whole = request(port, data)
    assert slow[0] == whole[0] == 200
    slow_out, whole_out = json.loads(slow[2]), json.loads(whole[2])
    assert slow_out["first"]["complete_then"] is False
    assert slow_out["first"]["body_bytes_then"] <= len(body) - 5
    assert slow_out["body_bytes"] == len(body)
    assert slow_out["form"] == whole_out["form"]
    assert slow_out["first"]["a"] == whole_out["first"]["a"] == "first"
    assert slow_out["form"]["d"] == ["€"]


def test_100mb_post_with_invalid_first_field(server):
    """
    100 MB whose first field is invalid: 400, and the rest of the body is
    never read.  The client goes on sending after the answer, as a client
    that does not read it would; the server's socket-level figure
    ``bytes_received`` (every byte read from the socket, parsed or not)
    stays under 1 MB, the connection is cut long before the 100 MB went
    through, and the server's RSS grows by at most 10 MB.
    """
    port, pid = server
    stats_before = status_of(port)
    rss_before = rss_bytes(pid)
    total = 100 * 10**6
    first = b"app_key=not+a+valid+key!&data="
    head = post("/api/upload", b"")[:-2].replace(b"Content-Length: 0",
                                                b"Content-Length: %d" % total) + b"\r\n"
    block = b"y" * 65536
    raw = b""
    cut = ""
    eof = False
    with connect(port) as s:
        s.sendall(head + first)
        sent = len(first)
        s.setblocking(False)
        deadline = time.monotonic() + 60
        while sent < total and not cut:
            assert time.monotonic() < deadline, f"still sending after 60 s ({sent} bytes sent)"
            # An EOF is only the server's half-close after its answer: the
            # client keeps sending until the connection itself is cut.
            readable, writable, _ = select.select([] if eof else [s], [s], [], 1.0)
            if readable:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    chunk, cut = b"", "reset"
                raw += chunk
                eof = not chunk
            if writable and not cut:
                try:
                    sent += s.send(block[:total - sent])
                except (BlockingIOError, InterruptedError):
                    pass
                except (BrokenPipeError, ConnectionResetError) as e:
                    cut = type(e).__name__
        s.setblocking(True)
        s.settimeout(5)
        try:
            while b"}}" not in raw:
                chunk = s.recv(65536)
                if not chunk:
                    break
                raw += chunk
        except OSError:
            pass
    head_part, _, body = raw.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 400 "), raw[:300]
    assert b"connection: close" in head_part.lower()
    assert json.loads(body)["error"]["code"] == "invalid_parameter"
    assert cut, "the client sent all 100 MB: the server took the whole body"
    stats = status_of(port)
    received = stats["bytes_received"] - stats_before["bytes_received"]
    read = stats["body_bytes_read"] - stats_before["body_bytes_read"]
    grown = rss_bytes(pid) - rss_before
    print(f"100 MB invalid upload: the server's socket gave it {received} bytes "
          f"({read} parsed as body), the client sent {sent} before the connection was cut "
          f"({cut}), server RSS grew {grown} bytes")
    assert received <= len(head) + 1 * MiB, f"the server read {received} bytes from the socket"
    assert read <= 1 * MiB
    assert sent < total
    assert grown <= 10 * MiB, f"server RSS grew by {grown} bytes"


def test_declared_chunk_over_the_limit_is_refused_before_its_data(server):
    """
    A chunked body whose chunk-size line declares more than
    ``max_body_bytes`` (200 MiB here) is answered 413 as soon as that line
    is in: the client has sent no byte of the chunk when it reads the
    answer, and what it sends after is never read by the server (its
    socket-level ``bytes_received`` grows by the head and the size line
    only).
    """
    port, _ = server
    stats_before = status_of(port)
    head = (b"POST /api/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            b"application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n")
    size_line = b"%x\r\n" % (300 * MiB)
    with connect(port) as s:
        s.sendall(head + size_line)
        status, headers, body, _ = read_response(s)
        assert (status, json.loads(body)["error"]["code"]) == (413, "body_too_large")
        assert headers["connection"] == "close"
        sent = 0
        s.settimeout(5)
        try:
            for _ in range(16):
                sent += s.send(b"z" * 65536)
        except OSError:
            pass  # the server closed: what was sent is not read either way
    stats = status_of(port)
    received = stats["bytes_received"] - stats_before["bytes_received"]
    # The status requests themselves are counted too (one before, one after).
    status_request = len(b"GET /_pipecomet/status HTTP/1.1\r\nHost: x\r\n\r\n")
    assert received <= len(head) + len(size_line) + 2 * status_request, \
        f"the server read {received} bytes; the client sent {sent} after the answer"
    assert stats["rejected_413"] - stats_before["rejected_413"] == 1


def test_expect_continue_invalid_query_gets_4xx_without_100(server):
    port, _ = server
    head = post("/api/upload?app_key=bad!key", b"", extra="Expect: 100-continue\r\n")
    head = head.replace(b"Content-Length: 0", b"Content-Length: 5000000")
    with connect(port) as s:
        s.sendall(head)
        status, headers, body, raw = read_response(s)
    assert b"100 Continue" not in raw
    assert (status, json.loads(body)["error"]["code"]) == (400, "invalid_parameter")


def test_expect_continue_valid_query_gets_100_then_answer(server):
    port, _ = server
    body = b"note=hello"
    with connect(port) as s:
        s.sendall(post("/api/upload?app_key=demo-key", body,
                       extra="Expect: 100-continue\r\n")[:-len(body)])
        s.settimeout(10)
        interim = s.recv(100)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(body)
        status, _, out, _ = read_response(s)
    assert status == 200
    assert json.loads(out)["fields"] == {"note": ["hello"]}


def test_upload_multipart_file(server):
    port, _ = server
    payload = os.urandom(600_000)
    b = "----pcBoundary7"
    body = (f'--{b}\r\nContent-Disposition: form-data; name="app_key"\r\n\r\ndemo-key\r\n'
            f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="r.bin"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + payload + \
        f"\r\n--{b}--\r\n".encode()
    status, _, out, _ = request(port, post("/api/upload", body, f"multipart/form-data; boundary={b}"))
    assert status == 200
    import hashlib
    files = json.loads(out)["files"]
    assert files == [{"name": "file", "filename": "r.bin", "content_type": "application/octet-stream",
                      "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}]


def test_upload_unknown_key_refused_before_body(server):
    port, _ = server
    body = b"app_key=nobody&data=" + b"z" * 3_000_000
    with connect(port) as s:
        s.sendall(post("/api/upload", body)[:-len(body) + 20])
        status, headers, out, _ = read_response(s)
    assert (status, json.loads(out)["error"]["code"]) == (403, "invalid_app_key")
    assert headers["connection"] == "close"


def test_upload_refuses_a_file_before_app_key(server):
    port, _ = server
    b = "bnd"
    body = (f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
            .encode() + b"q" * 2_000_000 + f"\r\n--{b}--\r\n".encode())
    with connect(port) as s:
        s.sendall(post("/api/upload", body, f"multipart/form-data; boundary={b}")[:-1_900_000])
        status, headers, out, _ = read_response(s)
    assert (status, json.loads(out)["error"]["code"]) == (400, "app_key_not_first")
    assert headers["connection"] == "close"


def test_echo_parses_lazily(server):
    port, _ = server
    before = status_of(port)["requests_lazy"]
    status, _, out, _ = request(port, post("/api/echo?app_key=demo-key", b"x=1&y=%C3%A9"))
    assert status == 200
    assert json.loads(out)["form"] == {"x": ["1"], "y": ["é"]}
    assert status_of(port)["requests_lazy"] == before + 1


# -- limits


ECHO = "/api/echo?app_key=demo-key"


def test_limit_body_size_by_content_length(server):
    port, _ = server
    head = post(ECHO, b"").replace(b"Content-Length: 0", b"Content-Length: 209715201")
    assert error_of(request(port, head)) == (413, "body_too_large")


def test_limit_body_size_by_bytes_read(server):
    port, _ = server
    chunk = b"x" * 1_000_000
    with connect(port) as s:
        s.sendall(f"POST {ECHO} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n".encode())
        try:
            for _ in range(220):
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        except OSError:
            pass
        assert error_of(read_response(s)) == (413, "body_too_large")


def test_limit_field_count(server):
    port, _ = server
    body = "&".join(f"f{i}=1" for i in range(21)).encode()
    assert error_of(request(port, post(ECHO, body))) == (413, "too_many_fields")


def test_limit_field_size(server):
    port, _ = server
    assert error_of(request(port, post(ECHO, b"a=" + b"v" * 70000))) == (413, "field_too_large")


def test_limit_header_size(server):
    port, _ = server
    data = b"GET /api/echo?app_key=demo-key HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 5000 + b"\r\n\r\n"
    assert error_of(request(port, data)) == (431, "header_too_large")


def test_limit_header_count(server):
    port, _ = server
    data = b"GET /api/echo?app_key=demo-key HTTP/1.1\r\n" + b"".join(
        b"X-H%d: v\r\n" % i for i in range(40)) + b"\r\n"
    assert error_of(request(port, data)) == (431, "too_many_headers")


def test_limit_header_timeout(server):
    port, _ = server
    with connect(port) as s:
        s.sendall(b"GET /api/echo HTTP/1.1\r\nHost: x\r\n")
        resp = read_response(s)
        assert error_of(resp) == (408, "header_timeout")
        s.settimeout(5)
        # ...and the connection is dropped.
        try:
            rest = s.recv(100)
        except ConnectionResetError:
            rest = b""
        assert rest == b""


def test_limit_body_timeout(server):
    port, _ = server
    with connect(port) as s:
        s.sendall(post(ECHO, b"a=1&b=2&c=3")[:-5])
        resp = read_response(s)
        assert error_of(resp) == (408, "body_timeout")
        assert resp[1]["connection"] == "close"


# -- malformed bodies


def test_malformed_percent_encoding(server):
    assert error_of(request(server[0], post(ECHO, b"a=%zz"))) == (400, "bad_percent_encoding")


def test_malformed_multipart_boundary(server):
    body = b'--other\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--other--\r\n'
    resp = request(server[0], post(ECHO, body, "multipart/form-data; boundary=mine"))
    assert error_of(resp) == (400, "bad_multipart")


def test_limit_part_header_size(server):
    """
    A multipart part whose header block is larger than
    ``max_part_header_bytes`` (1024 here) is a malformed body; one just
    under it is read.
    """
    def body(pad: int) -> bytes:
        return (b'--bnd\r\nContent-Disposition: form-data; name="a"\r\nX-Pad: ' + b"p" * pad
                + b'\r\n\r\n1\r\n--bnd--\r\n')

    ctype = "multipart/form-data; boundary=bnd"
    assert error_of(request(server[0], post(ECHO, body(1100), ctype))) == (400, "bad_multipart")
    status, _, out, _ = request(server[0], post(ECHO, body(900), ctype))
    assert status == 200 and json.loads(out)["form"] == {"a": ["1"]}


def test_malformed_request_line(server):
    # llhttp reads "NOT-HTTP" as a method it does not know
    assert error_of(request(server[0], b"NOT-HTTP\r\n\r\n")) == (400, "bad_method")


def test_malformed_request_target(server):
    assert error_of(request(server[0], b"GET /\x01x HTTP/1.1\r\nHost: x\r\n\r\n")) == \
        (400, "bad_target")


def test_request_line_llhttp_cannot_read(server):
    # a space inside the target: the line cannot be split into its three parts
    assert error_of(request(server[0], b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n")) == \
        (400, "bad_request")


def test_malformed_chunked_encoding(server):
    data = (f"POST {ECHO} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            "Transfer-Encoding: chunked\r\n\r\n3\r\na=1\r\nnothex\r\n").encode()
    assert error_of(request(server[0], data)) == (400, "bad_chunked_encoding")


def test_truncated_chunked_encoding(server):
    data = (f"POST {ECHO} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            "Transfer-Encoding: chunked\r\n\r\n3\r\na=1\r\n20\r\nb=").encode()
    with connect(server[0]) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        assert error_of(read_response(s)) == (400, "truncated_body")


def test_malformed_json(server):
    resp = request(server[0], post(ECHO, b'{"a": [1, 2', "application/json"))
    assert error_of(resp) == (400, "invalid_json")


def test_wrong_charset(server):
    resp = request(server[0], post(ECHO, b"a=%FF%FE"))
    assert error_of(resp) == (400, "bad_charset")
    resp = request(server[0], post(ECHO, b"a=1", "application/x-www-form-urlencoded; charset=klingon"))
    assert error_of(resp) == (400, "unsupported_charset")
