"""
Headless Chromium driven over the DevTools protocol, for the browser tests
and ``scripts/dashboard-shot``: the browser (the Debian package ``make
test`` installs) runs with a profile of its own in a temporary directory
and is stopped, by its process group, when the page is done with.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["CHROMIUM", "DEADLINE", "DevTools", "chromium_page", "wait_for", "screenshot"]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
DEADLINE = 60.0  # a bound for a broken setup, not a performance target


class DevTools:
    """
    The smallest WebSocket client that speaks the DevTools protocol: text
    frames out (masked), text frames in.
    """

    def __init__(self, ws_url: str) -> None:
        rest = ws_url.split("://", 1)[1]
        hostport, _, path = rest.partition("/")
        host, _, port = hostport.partition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed during the handshake")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"DevTools refused the upgrade: {head[:200]!r}")
        self.buf = head.split(b"\r\n\r\n", 1)[1]
        self.next_id = 0

    def _recv(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("DevTools closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send(self, text: str) -> None:
        payload = text.encode()
        head = bytes([0x81])
        n = len(payload)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _frame(self) -> tuple[int, bytes]:
        b0, b1 = self._recv(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", self._recv(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", self._recv(8))[0]
        return b0 & 0x0F, self._recv(n)

    def call(self, method: str, **params: Any) -> Any:
        self.next_id += 1
        my_id = self.next_id
        self._send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            op, data = self._frame()
            if op != 1:
                continue
            msg = json.loads(data)
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def close(self) -> None:
        self.sock.close()


def wait_for(check: Callable[[], Any], what: str, deadline: float = DEADLINE) -> Any:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def chromium_page(url: str, url_part: str, *flags: str) -> Iterator["DevTools"]:
    """
    Headless Chromium showing ``url`` (extra command-line ``flags``): yields
    the DevTools session of the page whose URL holds ``url_part``, once the
    page's EventSource is open; the browser and its profile are gone after.
    """
    profile = tempfile.mkdtemp(prefix="pipecomet-chromium-")
    browser = None
    tools = None
    try:
        browser = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
             *flags, f"--user-data-dir={profile}", "--remote-debugging-port=0",
             "--remote-debugging-address=127.0.0.1", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        active = Path(profile) / "DevToolsActivePort"
        wait_for(lambda: active.exists() and active.read_text().count("\n") >= 1,
                 "DevTools port file")
        dt_port = int(active.read_text().split("\n")[0])

        def page_target() -> Any:
            with urllib.request.urlopen(f"http://127.0.0.1:{dt_port}/json/list",
                                        timeout=5) as r:
                targets = json.loads(r.read())
            return next((t for t in targets if t.get("type") == "page"
                         and url_part in t.get("url", "")), None)

        target = wait_for(page_target, f"the page {url_part} in the browser")
        tools = DevTools(target["webSocketDebuggerUrl"])
        wait_for(lambda: tools.evaluate(
            "document.getElementById('state') && "
            "document.getElementById('state').textContent") == "open",
            f"the EventSource of {url_part} open")
        yield tools
    finally:
        if tools is not None:
            tools.close()
        if browser is not None:
            try:
                os.killpg(browser.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                browser.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(browser.pid, signal.SIGKILL)
                browser.wait(5)
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(tools: DevTools, path: Path, width: int | None = None) -> Path:
    """
    Save a PNG of the whole page (not only the window: the view is made as
    tall as the document first) to ``path``.
    """
    if width is not None:
        height = int(tools.evaluate("Math.ceil(document.documentElement.scrollHeight)"))
        tools.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                   deviceScaleFactor=1, mobile=False)
        # Two frames: the page redraws its canvases for the new size.
        tools.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    shot = tools.call("Page.captureScreenshot", format="png")
    path.write_bytes(base64.b64decode(shot["data"]))
    return path
