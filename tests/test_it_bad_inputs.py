"""
The bad inputs and faults of issue 14 ("found from outside"), each sent as
bytes over a real socket to the demo gateway served by ``twistd -n
pipecomet`` in a subprocess, each answered with its documented status and
error code.  (The HTTP-framing ones belong to the HTTP conformance suite.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

import pytest

from .support import twistd_server

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def demo() -> Iterator[tuple[int, Any]]:
    with twistd_server() as (port, proc):
        yield port, proc


def exchange(port: int, raw: bytes, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """
    Send ``raw`` (a whole request with ``Connection: close``) and read the
    response to the end; an empty reply fails the test.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        # Sent from a thread: the server may answer (and stop reading)
        # before the whole body is sent.
        sender = threading.Thread(target=_send_all, args=(s, raw), daemon=True)
        sender.start()
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    sender.join(timeout)
    assert data, "empty reply"
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return status, headers, body


def _send_all(s: socket.socket, raw: bytes) -> None:
    try:
        s.sendall(raw)
    except OSError:
        pass  # answered and closed before the body was all sent


def request(method: str, target: str, body: bytes = b"", headers: dict[str, Any] | None = None
            ) -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close"]
    for k, v in (headers or {}).items():
        lines.append(k.encode() + b": " + (v if isinstance(v, bytes) else str(v).encode()))
    if body or method == "POST":
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def error(body: bytes) -> dict[str, Any]:
    err = json.loads(body)["error"]
    assert err["id"] and err["message"]
    return err


def test_non_utf8_header_values_are_400(demo):
    port, _ = demo
    status, _, body = exchange(port, request("GET", "/api/time.get",
                                             headers={"X-App-Key": b"\xff"}))
    assert (status, error(body)["code"]) == (400, "bad_header")
    status, _, body = exchange(port, request("GET", "/comet/news?transport=longpoll&timeout=1",
                                             headers={"Last-Event-ID": b"\xff\xfe"}))
    assert (status, error(body)["code"]) == (400, "bad_header")


def test_upload_with_one_urlencoded_field(demo):
    port, _ = demo
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, body = exchange(port, request("POST", "/api/upload", b"app_key=wrong", form))
    assert (status, error(body)["code"]) == (403, "invalid_app_key")
    status, _, body = exchange(port, request("POST", "/api/upload", b"note=hello", form))
    assert (status, error(body)["code"]) == (400, "app_key_not_first")
    status, _, body = exchange(port, request("POST", "/api/upload", b"app_key=demo-key", form))
    assert status == 200 and json.loads(body)["app_key"] == "demo-key"


JSON = {"Content-Type": "application/json"}
PUBLISH = {"Content-Type": "application/json", "Authorization": "Bearer demo-publish-token"}


@pytest.mark.parametrize("doc", [
    b"[" * 100_000,
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b"1" * 5000,
    b'{"a": ' + b"1" * 5000 + b"}",
    b"[" + b"9" * 5000 + b"]",
    b'{"a": NaN}',
    b"[Infinity]",
    b"-Infinity",
], ids=["deep-open", "deep-array", "deep-member", "long-int", "long-int-member",
        "long-int-item", "nan", "infinity", "minus-infinity"])
def test_json_the_decoder_cannot_take_is_400(demo, doc):
    port, _ = demo
    status, _, body = exchange(port, request("POST", "/api/echo?app_key=demo-key", doc, JSON))
    assert (status, error(body)["code"]) == (400, "invalid_json")
    # Publish takes messages up to comet.max_message_bytes: the same shapes, 20,000 deep.
    doc = doc.replace(b"[" * 100_000, b"[" * 20_000).replace(b"]" * 100_000, b"]" * 20_000)
    status, _, body = exchange(port, request("POST", "/_pipecomet/publish/news", doc, PUBLISH))
    assert (status, error(body)["code"]) == (400, "invalid_json")


def test_a_result_that_cannot_be_serialised_is_500_at_once(demo):
    port, proc = demo
    status, _, body = exchange(port, request("POST", "/api/echo?app_key=demo-key",
                                             b'{"a":"\\ud800"}', JSON), timeout=20)
    err = error(body)
    assert (status, err["code"]) == (500, "internal_error")
    assert b"ud800" not in body
    # Logged, with the id the client got.
    deadline = time.monotonic() + 30
    while not any(err["id"].encode() in line for line in list(proc.output_tail)):
        assert time.monotonic() < deadline, "the error id is not in the server's log"
        time.sleep(0.05)
    # The server goes on serving.
    status, _, _ = exchange(port, request("GET", "/api/time.get?app_key=demo-key"))
    assert status == 200


@pytest.mark.parametrize("charset", ["bz2", "rot13", "uu", "punycode", "base64", "hex",
                                     "zlib", "idna", "unicode_escape", "no-such-charset"])
def test_charset_must_be_a_text_encoding(demo, charset):
    port, _ = demo
    body = b"a=" + b"x" * 500
    status, _, answer = exchange(port, request(
        "POST", "/api/echo?app_key=demo-key", body,
        {"Content-Type": f"application/x-www-form-urlencoded; charset={charset}"}), timeout=20)
    assert (status, error(answer)["code"]) == (400, "unsupported_charset")


def test_text_charsets_still_decode(demo):
    port, _ = demo
    for charset, raw in (("iso-8859-1", b"a=caf\xe9"), ("utf-8", b"a=caf\xc3\xa9"),
                         ("windows-1252", b"a=caf\xe9")):
        status, _, answer = exchange(port, request(
            "POST", "/api/echo?app_key=demo-key", raw,
            {"Content-Type": f"application/x-www-form-urlencoded; charset={charset}"}))
        assert status == 200 and json.loads(answer)["form"] == {"a": ["café"]}, charset


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_large_top_level_json_array_is_bounded(demo):
    """
    A top-level array is held up to ``max_field_bytes`` (1 MiB in the demo)
    and its items count as fields (``max_fields``, 1000).  Ten 9 MB arrays
    leave the server's memory where it was (the issue saw +223 MB each).
    """
    port, proc = demo
    many = b"[" + b",".join([b'{"k":"v"}'] * 910_000) + b"]"
    big = b"[" + b",".join([b'"' + b"x" * 1_010_000 + b'"'] * 9) + b"]"
    assert len(many) > 9_000_000 and len(big) > 9_000_000
    before = rss_kib(proc.pid)
    for _ in range(5):
        for array, code in ((many, "too_many_fields"), (big, "field_too_large")):
            status, _, body = exchange(port, request("POST", "/api/echo?app_key=demo-key",
                                                     array, JSON))
            assert (status, error(body)["code"]) == (413, code)
    grown_mib = (rss_kib(proc.pid) - before) / 1024
    assert grown_mib < 64, f"RSS grew {grown_mib:.0f} MiB"
    items = b"[" + b",".join([b"1"] * 1001) + b"]"
    status, _, body = exchange(port, request("POST", "/api/echo?app_key=demo-key", items, JSON))
    assert (status, error(body)["code"]) == (413, "too_many_fields")
    items = b"[" + b",".join([b'"a,]"'] * 1000) + b"]"
    status, _, body = exchange(port, request("POST", "/api/echo?app_key=demo-key", items, JSON))
    assert status == 200


def spool_files(pid: int) -> list[str]:
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.endswith("(deleted)"):
            out.append(target)
    return out


def test_aborted_multipart_uploads_close_their_spool_files(demo):
    port, proc = demo
    baseline = len(spool_files(proc.pid))
    boundary = "XyZ"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"app_key\"\r\n\r\n"
            f"demo-key\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"big.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    sent = 2 * 2**20  # past file_memory_bytes: the part is on disk
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(request("POST", "/api/upload", b"", {
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        }).replace(b"Content-Length: 0", b"Content-Length: %d" % (len(head) + 10 * 2**20)))
        s.sendall(head + b"\0" * sent)
        # The server holds a spooled file for the part now.
        deadline = time.monotonic() + 30
        while len(spool_files(proc.pid)) <= baseline:
            assert time.monotonic() < deadline, "the upload never reached a spool file"
            time.sleep(0.05)
        s.close()
        deadline = time.monotonic() + 30
        while len(spool_files(proc.pid)) > baseline:
            assert time.monotonic() < deadline, f"spool files left open: {spool_files(proc.pid)}"
            time.sleep(0.05)


def test_cursor_offsets_are_ascii_digits(demo):
    port, _ = demo
    for cursor in ("abc:%D9%A3", "abc:%EF%BC%93", "abc:%C2%B2"):
        status, _, body = exchange(port, request(
            "GET", f"/comet/news?transport=longpoll&timeout=1&since={cursor}"))
        assert (status, error(body)["code"]) == (400, "bad_cursor"), cursor


def png_header(width: int, height: int) -> bytes:
    """
    A PNG that declares ``width`` × ``height`` (a decompression bomb's
    header) with a token image data chunk.
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


def test_demo_routes_authenticate_and_speak_cleanly(demo):
    port, _ = demo
    for path in ("/api/cpu.burn?ms=1", "/api/image.resize", "/api/slow.get?ms=1",
                 "/api/fast.get", "/api/echo", "/api/search?q=x"):
        method = "POST" if "cpu" in path or "image" in path else "GET"
        status, _, body = exchange(port, request(method, path))
        assert (status, error(body)["code"]) == (401, "missing_app_key"), path
        status, _, body = exchange(port, request(method, path + ("&" if "?" in path else "?")
                                                 + "app_key=nope"))
        assert (status, error(body)["code"]) == (403, "invalid_app_key"), path
    png = {"Content-Type": "image/png"}
    status, _, body = exchange(port, request("POST", "/api/image.resize?app_key=demo-key",
                                             b"not an image", png), timeout=60)
    err = error(body)
    assert (status, err["code"]) == (400, "not_an_image")
    assert "0x" not in err["message"] and "<" not in err["message"]
    for side in (30000, 7000):  # past Pillow's own bomb limit, and past the demo's
        status, _, body = exchange(port, request("POST", "/api/image.resize?app_key=demo-key",
                                                 png_header(side, side), png), timeout=60)
        err = error(body)
        assert (status, err["code"]) == (413, "image_too_large"), side
        assert "0x" not in err["message"]


def read_until_closed(s: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    s.close()
    return data


@pytest.mark.parametrize("round_", range(3))
def test_sigterm_answers_every_call_in_flight(round_):
    """
    SIGTERM while four /api/slow.get calls run (the category's limit) and
    two wait, on keep-alive connections as curl makes them: each connection
    gets its whole response — 200 for a call that ran to its end, 503
    pool_closing for one turned away — before it closes.  (The race this
    guards against lost about one answer in 16; three rounds of six.)
    """
    with twistd_server() as (port, proc):
        socks = []
        for _ in range(6):
            s = socket.create_connection(("127.0.0.1", port), timeout=60)
            s.sendall(b"GET /api/slow.get?app_key=demo-key HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            socks.append(s)
        deadline = time.monotonic() + 30
        while True:
            _, _, body = exchange(port, request("GET", "/_pipecomet/status"))
            slow = json.loads(body)["quota"]["categories"]["slow"]
            if slow["running"] == 4 and slow["queued"] == 2:
                break
            assert time.monotonic() < deadline, slow
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        answers = []
        for s in socks:
            data = read_until_closed(s)
            assert data, "a call in flight lost its connection with no response"
            head, _, body = data.partition(b"\r\n\r\n")
            status = int(head.split()[1])
            length = int([l.split(b":")[1] for l in head.split(b"\r\n")
                          if l.lower().startswith(b"content-length")][0])
            assert len(body) == length
            answers.append((status, json.loads(body)))
        assert proc.wait(30) in (0, -signal.SIGTERM)  # twistd ends by the signal it got
    ok = [b for st, b in answers if st == 200]
    refused = [b for st, b in answers if st == 503]
    assert len(ok) + len(refused) == 6
    assert len(ok) == 4 and all(b["category"] == "slow" for b in ok)
    assert all(b["error"]["code"] == "pool_closing" for b in refused)
