"""
Resume with the clients people really use: the npm ``eventsource`` (4.x)
under node, and Python's ``httpx-sse``, subscribed to the demo gateway
(``twistd -n pipecomet``) through a TCP proxy that cuts every connection
after a random time.  Each of 20 subscribers per client must end with
every one of 300 messages exactly once, or an explicit gap event that
counts what it missed — never a silent loss or a duplicate.

The proxy and the publisher run in this process; node runs the npm client
in a subprocess (installed by ``make test`` into ``.venv/node_modules``,
or here into a temporary folder when it is not there).
"""

from __future__ import annotations

import json
import random
import selectors
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from .support import ROOT, twistd_server

pytestmark = pytest.mark.timeout(600)

SUBSCRIBERS = 20
MESSAGES = 300
DEADLINE = 240.0  # seconds for every subscriber to account for every message

CONFIG = """
[comet]
retry = 0.1                      # reconnect quickly after each drop
[comet.topics."drops-*"]
history_count = 60               # short history: long drops get explicit gaps
"""


class DroppingProxy:
    """
    127.0.0.1:port → 127.0.0.1:upstream; each connection is cut (both
    sides closed) after a random 0.05–1.0 s.  One thread, a selector.
    """

    def __init__(self, upstream: int, seed: int) -> None:
        self.upstream = upstream
        self.random = random.Random(seed)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        self.pairs: dict[socket.socket, tuple[socket.socket, float]] = {}
        self.cuts = 0
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _close(self, s: socket.socket) -> None:
        other, _ = self.pairs.pop(s, (None, 0.0))
        for sock in (s, other):
            if sock is None:
                continue
            self.pairs.pop(sock, None)
            try:
                self.selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()

    def _run(self) -> None:
        while self.running:
            for key, _ in self.selector.select(timeout=0.02):
                s = key.fileobj
                if s is self.listener:
                    try:
                        client, _ = self.listener.accept()
                    except BlockingIOError:
                        continue
                    try:
                        server = socket.create_connection(("127.0.0.1", self.upstream),
                                                          timeout=30)
                    except OSError:
                        client.close()  # a drop like any other: the client reconnects
                        continue
                    cut_at = time.monotonic() + self.random.uniform(0.05, 1.0)
                    for a, b in ((client, server), (server, client)):
                        a.setblocking(False)
                        self.pairs[a] = (b, cut_at)
                        self.selector.register(a, selectors.EVENT_READ, None)
                    continue
                if s not in self.pairs:
                    continue
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self._close(s)
                    continue
                other = self.pairs[s][0]
                try:
                    other.settimeout(30)  # a stuck peer fails the test, not the suite
                    other.sendall(data)
                    other.setblocking(False)
                except OSError:
                    self._close(s)
            now = time.monotonic()
            for s, (_, cut_at) in list(self.pairs.items()):
                if cut_at <= now and s in self.pairs:
                    self.cuts += 1
                    self._close(s)

    def stop(self) -> None:
        self.running = False
        self.thread.join(10)
        for s in list(self.pairs):
            self._close(s)
        self.listener.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[int]:
    config = tmp_path_factory.mktemp("comet-clients") / "drops.toml"
    config.write_text(CONFIG)
    with twistd_server(["--config", str(config)]) as (port, proc):
        yield port


def publish(port: int, topic: str) -> None:
    """
    The 300 messages, straight to the server (not through the proxy),
    spread over a few seconds so that drops fall among them.
    """
    for n in range(MESSAGES):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/_pipecomet/publish/{topic}",
            data=json.dumps({"n": n}).encode(),
            headers={"Authorization": "Bearer demo-publish-token",
                     "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=20) as r:
            assert r.status == 200
        time.sleep(0.01)


def check_accounts(accounts: list[dict[str, Any]]) -> None:
    """
    Per subscriber: no duplicate, in order, and received + declared missed
    is every message.
    """
    assert len(accounts) == SUBSCRIBERS
    for i, acc in enumerate(accounts):
        got = acc["received"]
        assert len(got) == len(set(got)), f"subscriber {i}: duplicates"
        assert got == sorted(got), f"subscriber {i}: out of order"
        assert len(got) + acc["missed"] == MESSAGES, (
            f"subscriber {i}: {len(got)} received + {acc['missed']} declared missed "
            f"!= {MESSAGES} (silent loss)")


# ---------------------------------------------------------------------------
# npm eventsource


NODE_SCRIPT = textwrap.dedent("""
    const { EventSource } = require(process.argv[2]);
    const url = process.argv[3], subscribers = +process.argv[4], total = +process.argv[5];
    const accounts = [];
    let ready = 0, finished = 0;
    for (let i = 0; i < subscribers; i++) {
      const acc = { received: [], missed: 0, opens: 0, errors: 0 };
      accounts.push(acc);
      const es = new EventSource(url);
      const check = () => {
        if (acc.received.length + acc.missed === total && !acc.done) {
          acc.done = true; es.close();
          if (++finished === subscribers) {
            process.stdout.write(JSON.stringify(accounts) + "\\n");
            process.exit(0);
          }
        }
      };
      es.addEventListener("open", (e) => {
        // Our stream's head (a MessageEvent with data), not the
        // connection's own open event (no data).
        if (e.data === undefined) return;
        acc.opens++;
        if (acc.opens === 1 && ++ready === subscribers) process.stdout.write("ready\\n");
      });
      es.addEventListener("message", (e) => {
        acc.received.push(JSON.parse(e.data).n); check();
      });
      for (const name of ["gap", "reset"]) {
        es.addEventListener(name, (e) => { acc.missed += JSON.parse(e.data).missed || 0; check(); });
      }
      es.onerror = () => { acc.errors++; };
    }
""")


@pytest.fixture(scope="module")
def eventsource_package(tmp_path_factory) -> Path:
    installed = ROOT / ".venv" / "node_modules" / "eventsource"
    if not (installed / "package.json").is_file():
        npm = shutil.which("npm")
        assert npm, "npm is needed (make test installs nodejs)"
        prefix = tmp_path_factory.mktemp("npm")
        subprocess.run([npm, "install", "--silent", "--no-audit", "--no-fund", "--prefix",
                        str(prefix), "eventsource@4"], check=True, timeout=300)
        installed = prefix / "node_modules" / "eventsource"
    version = json.loads((installed / "package.json").read_text())["version"]
    assert version.startswith("4."), version
    return installed


def test_npm_eventsource_resumes_exactly_once_across_random_drops(server, eventsource_package,
                                                                   tmp_path):
    node = shutil.which("node")
    assert node, "node is needed (make test installs nodejs)"
    proxy = DroppingProxy(server, seed=14)
    script = tmp_path / "subscribers.cjs"
    script.write_text(NODE_SCRIPT)
    proc = subprocess.Popen([node, str(script), str(eventsource_package),
                             f"http://127.0.0.1:{proxy.port}/comet/drops-node",
                             str(SUBSCRIBERS), str(MESSAGES)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        end = time.monotonic() + 60
        while "ready\n" not in lines:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < end, "the subscribers never all opened"
            time.sleep(0.05)
        publish(server, "drops-node")
        reader.join(DEADLINE)
        assert not reader.is_alive(), "the subscribers did not account for every message"
        assert proc.wait(30) == 0, proc.stderr.read()
        accounts = json.loads(lines[-1])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proxy.stop()
    check_accounts(accounts)
    assert proxy.cuts >= SUBSCRIBERS, "the proxy cut too few connections to test anything"
    assert sum(a["opens"] for a in accounts) > SUBSCRIBERS  # they did reconnect


# ---------------------------------------------------------------------------
# httpx-sse


def httpx_subscriber(url: str, acc: dict[str, Any], opened: threading.Event,
                     stop: threading.Event) -> None:
    try:
        _httpx_subscriber(url, acc, opened, stop)
    except BaseException:
        import traceback

        acc["crash"] = traceback.format_exc() + repr(acc.get("last_event"))


def _httpx_subscriber(url: str, acc: dict[str, Any], opened: threading.Event,
                      stop: threading.Event) -> None:
    import httpx
    from httpx_sse import SSEError, connect_sse

    last_id = None
    with httpx.Client(timeout=httpx.Timeout(30.0)) as client:
        while not stop.is_set() and len(acc["received"]) + acc["missed"] < MESSAGES:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with connect_sse(client, "GET", url, headers=headers) as source:
                    for sse in source.iter_sse():
                        acc["last_event"] = (sse.event, sse.data, sse.id, sse.retry)
                        if not sse.data:
                            # httpx-sse yields a blank line after a comment
                            # (our heartbeat) as an event once it has seen an
                            # id; the SSE rules dispatch nothing without data.
                            continue
                        if sse.id:
                            last_id = sse.id
                        if sse.event == "open":
                            acc["opens"] += 1
                            opened.set()
                        elif sse.event in ("gap", "reset"):
                            acc["missed"] += json.loads(sse.data).get("missed", 0)
                        elif sse.event == "message":
                            acc["received"].append(json.loads(sse.data)["n"])
                        if len(acc["received"]) + acc["missed"] >= MESSAGES:
                            return
            except (httpx.HTTPError, SSEError, OSError):
                # A cut connection, or a response cut before its headers
                # were whole (no text/event-stream content type yet).
                acc["errors"] += 1
            time.sleep(0.1)  # the server's retry


def test_httpx_sse_resumes_exactly_once_across_random_drops(server):
    proxy = DroppingProxy(server, seed=41)
    url = f"http://127.0.0.1:{proxy.port}/comet/drops-httpx"
    accounts = [{"received": [], "missed": 0, "opens": 0, "errors": 0}
                for _ in range(SUBSCRIBERS)]
    opened = [threading.Event() for _ in accounts]
    stop = threading.Event()
    threads = [threading.Thread(target=httpx_subscriber, args=(url, acc, ev, stop), daemon=True)
               for acc, ev in zip(accounts, opened)]
    try:
        for t in threads:
            t.start()
        for ev in opened:
            assert ev.wait(60), "a subscriber never opened"
        publish(server, "drops-httpx")
        end = time.monotonic() + DEADLINE
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))
        assert not any(t.is_alive() for t in threads), \
            "the subscribers did not account for every message"
    finally:
        stop.set()
        proxy.stop()
    assert [a["crash"] for a in accounts if "crash" in a] == []
    check_accounts(accounts)
    assert proxy.cuts >= SUBSCRIBERS
    assert sum(a["opens"] for a in accounts) > SUBSCRIBERS
