"""
ZooKeeper discovery and self-registration against a real ZooKeeper server
(Debian's package, one standalone server for this module on a free
loopback port, see ``tests/_zookeeper.py``).

Instances are written by the tests as Curator JSON through a separate
kazoo client; pipecomet's discovery must follow them through its watches,
keep the last list while ZooKeeper is down and read afresh when it is back;
the self-registration node must come back after a session expiry and read
as Curator's layout.  Each test works under its own base path.

Interoperation is checked with Apache Curator itself (Debian's
``libcurator-discovery-java``): ``tests/curator/CuratorProbe.java``, compiled
once for the module, lists what Curator's ``ServiceDiscovery`` finds and
registers an instance the Curator way.

The tests run on the session's reactor (pytest-twisted); every blocking
kazoo or process call of the test itself goes to a thread.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from kazoo.client import KazooClient
from twisted.internet import defer, reactor, task, threads

from pipecomet import App, Config
from pipecomet._backend._registration import ServiceRegistration
from pipecomet._backend._zookeeper import ZooKeeperDiscovery, instance_json

from ._zookeeper import ZooKeeperServer

#: Generous bound on every wait for something ZooKeeper or a watch should
#: do; a broken build fails here instead of hanging.
WAIT = 30.0


@pytest.fixture(scope="module")
def zk():
    directory = Path(tempfile.mkdtemp(prefix="pipecomet-zk-"))
    server = ZooKeeperServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


CURATOR_JAR = "/usr/share/java/curator-x-discovery.jar"  # its manifest names the rest


@pytest.fixture(scope="module")
def curator_probe():
    """
    ``tests/curator/CuratorProbe.java`` compiled against Debian's Curator;
    yields the java command line that runs it.
    """
    source = Path(__file__).resolve().parent / "curator" / "CuratorProbe.java"
    out = Path(tempfile.mkdtemp(prefix="pipecomet-curator-"))
    try:
        subprocess.run(["javac", "-d", str(out), "-cp", CURATOR_JAR, str(source)],
                       check=True, capture_output=True, timeout=180)
        yield ["java", "-Xmx128m", "-XX:TieredStopAtLevel=1", "-cp",
               f"{out}:{CURATOR_JAR}", "CuratorProbe"]
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def base() -> str:
    return f"/it-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def writer(zk):
    """
    A separate kazoo client, standing in for other services' registrations.
    """
    client = KazooClient(hosts=zk.hosts, timeout=10.0)
    client.start(timeout=WAIT)
    yield client
    client.stop()
    client.close()


def blocking(f, *args, **kwargs):
    return threads.deferToThread(f, *args, **kwargs)


@defer.inlineCallbacks
def wait_until(pred: Any, what: str, limit: float = WAIT) -> Any:
    """
    Poll a condition of the test (not a speed bound): fail after ``limit``
    seconds so that a broken build cannot hang the suite.
    """
    waited = 0.0
    while not pred():
        if waited > limit:
            raise AssertionError(f"timed out after {limit}s waiting for {what}")
        yield task.deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


def curator(name: str, ident: str, port: int, **extra: Any) -> bytes:
    return instance_json(name, ident, "127.0.0.1", port, registration_time_ms=1, **extra)


def ports(endpoints) -> list[int]:
    return sorted(e.port for e in endpoints)


@pytest_twisted.inlineCallbacks
def test_watch_follows_registrations(zk, writer, base):
    """
    The service node does not exist at start; instances added, changed,
    disabled, broken and removed by another client reach ``current()`` and
    the watch callback.
    """
    disc = ZooKeeperDiscovery(zk.hosts, base, "users", reactor=reactor, session_timeout=5.0)
    seen: list[list[int]] = []
    disc.watch(lambda eps: seen.append(ports(eps)))
    try:
        yield disc.start()
        status = disc.status()
        assert (status["connected"], status["stale"], status["node_exists"]) == (True, False,
                                                                                False)
        assert disc.current() == ()

        yield blocking(writer.create, f"{base}/users/a", curator("users", "a", 8001),
                       makepath=True)
        yield wait_until(lambda: ports(disc.current()) == [8001], "instance a")
        assert disc.status()["node_exists"] is True
        assert disc.current()[0].id == "a"

        yield blocking(writer.create, f"{base}/users/b", curator("users", "b", 8002))
        yield wait_until(lambda: ports(disc.current()) == [8001, 8002], "instance b")

        # A changed instance (Curator's updateService) is seen through its data watch.
        yield blocking(writer.set, f"{base}/users/a", curator("users", "a", 8011))
        yield wait_until(lambda: ports(disc.current()) == [8002, 8011], "a moved to 8011")

        # Disabled (Curator 5) and unreadable instances are left out.
        yield blocking(writer.create, f"{base}/users/c",
                       json.dumps({**json.loads(curator("users", "c", 8003)),
                                   "enabled": False}).encode())
        yield blocking(writer.create, f"{base}/users/d", b"not json")
        yield wait_until(lambda: "d" in disc.status()["invalid"], "d reported invalid")
        assert ports(disc.current()) == [8002, 8011]
        assert "not valid JSON" in disc.status()["invalid"]["d"]

        yield blocking(writer.delete, f"{base}/users/a")
        yield wait_until(lambda: ports(disc.current()) == [8002], "a removed")
        yield blocking(writer.delete, f"{base}/users/d")
        yield wait_until(lambda: disc.status()["invalid"] == {}, "d forgotten")

        # The whole service node going away means no instances.
        yield blocking(writer.delete, f"{base}/users", recursive=True)
        yield wait_until(lambda: disc.status()["node_exists"] is False, "service removed")
        assert disc.current() == ()
        yield blocking(writer.create, f"{base}/users/e", curator("users", "e", 8005),
                       makepath=True)
        yield wait_until(lambda: ports(disc.current()) == [8005], "service back")

        assert seen == [[8001], [8001, 8002], [8002, 8011], [8002], [], [8005]]
    finally:
        yield disc.stop()


@pytest_twisted.inlineCallbacks
def test_zookeeper_stopped_mid_run_keeps_last_endpoints(zk, writer, base):
    """
    With ZooKeeper down the last endpoints stay and the status says so;
    with it back the list is read afresh.
    """
    yield blocking(writer.create, f"{base}/users/a", curator("users", "a", 8001),
                   makepath=True)
    yield blocking(writer.create, f"{base}/users/b", curator("users", "b", 8002))
    disc = ZooKeeperDiscovery(zk.hosts, base, "users", reactor=reactor, session_timeout=20.0,
                              reconnect_max_delay=0.5)
    seen: list[list[int]] = []
    disc.watch(lambda eps: seen.append(ports(eps)))
    try:
        yield disc.start()
        assert ports(disc.current()) == [8001, 8002]
        yield zk.stop_later()
        try:
            yield wait_until(lambda: not disc.status()["connected"], "the loss to be noticed")
            status = disc.status()
            assert (status["connected"], status["stale"]) == (False, True)
            assert status["losses"] == 1
            assert ports(disc.current()) == [8001, 8002]
        finally:
            yield zk.start_later()
        yield wait_until(lambda: disc.status()["connected"], "reconnection")
        # Changes made once the server is back reach the list.
        yield blocking(writer.retry, writer.delete, f"{base}/users/a")
        yield blocking(writer.retry, writer.create, f"{base}/users/c",
                       curator("users", "c", 8003))
        yield wait_until(lambda: ports(disc.current()) == [8002, 8003], "fresh list")
        status = disc.status()
        assert (status["connected"], status["stale"], status["connects"]) == (True, False, 2)
        assert seen[0] == [8001, 8002] and seen[-1] == [8002, 8003]
    finally:
        yield disc.stop()


@pytest_twisted.inlineCallbacks
def test_discovery_session_expiry_reads_afresh(zk, writer, base):
    """
    After its session expired, discovery reads the list again on the new
    session and its watches work again.
    """
    yield blocking(writer.create, f"{base}/users/a", curator("users", "a", 8001),
                   makepath=True)
    disc = ZooKeeperDiscovery(zk.hosts, base, "users", reactor=reactor, session_timeout=4.0)
    try:
        yield disc.start()
        first = disc.session
        yield blocking(expire_session, zk.hosts, first)
        yield wait_until(lambda: disc.status()["connects"] == 2 and not disc.status()["stale"],
                         "a new session and a fresh read")
        assert disc.session[0] != first[0]
        assert ports(disc.current()) == [8001]
        yield blocking(writer.create, f"{base}/users/b", curator("users", "b", 8002))
        yield wait_until(lambda: ports(disc.current()) == [8001, 8002], "watch after expiry")
    finally:
        yield disc.stop()


@pytest_twisted.inlineCallbacks
def test_start_without_zookeeper_fires_empty_and_stale():
    """
    Nothing listens at ``hosts``: start() still fires (after its timeout)
    with no endpoints, and the status says disconnected and stale.
    """
    from .support import free_port

    disc = ZooKeeperDiscovery(f"127.0.0.1:{free_port()}", "/services", "users",
                              reactor=reactor, session_timeout=5.0, start_timeout=0.3)
    try:
        yield disc.start()
        status = disc.status()
        assert disc.current() == ()
        assert (status["connected"], status["stale"], status["node_exists"]) == (False, True,
                                                                                None)
    finally:
        yield disc.stop()


def expire_session(hosts: str, session: tuple[int, bytes]) -> None:
    """
    Expire a session from outside: connect with its id and password, then
    close (kazoo's own test harness does the same).
    """
    other = KazooClient(hosts=hosts, client_id=session, timeout=10.0)
    other.start(timeout=WAIT)
    other.stop()
    other.close()


@pytest_twisted.inlineCallbacks
def test_self_registration_survives_session_expiry(zk, writer, base):
    """
    ``[registration]`` announces the app as a Curator DYNAMIC instance on an
    ephemeral node; an expired session brings it back under a new session;
    stopping the app removes it; discovery of the same service sees it.
    """
    app = App(reactor=reactor)
    app.configure(Config.from_dict({"registration": {
        "enabled": True, "hosts": zk.hosts, "base_path": base, "service": "gateway",
        "address": "127.0.0.1", "port": 8080, "id": "gw-1", "payload": {"zone": "a"},
        "session_timeout": 4.0}}))
    (registration,) = [s for s in app.service if isinstance(s, ServiceRegistration)]
    disc = ZooKeeperDiscovery(zk.hosts, base, "gateway", reactor=reactor, session_timeout=5.0)
    path = f"{base}/gateway/gw-1"
    app.service.startService()
    try:
        yield disc.start()
        yield wait_until(lambda: app.runtime.status()["registration"]["registered"],
                         "registration")
        data, stat = yield blocking(writer.get, path)
        doc = json.loads(data)
        assert list(doc) == ["name", "id", "address", "port", "sslPort", "payload",
                             "registrationTimeUTC", "serviceType", "uriSpec"]
        assert doc["name"] == "gateway" and doc["id"] == "gw-1"
        assert (doc["address"], doc["port"], doc["sslPort"]) == ("127.0.0.1", 8080, None)
        assert doc["serviceType"] == "DYNAMIC" and doc["payload"] == {"zone": "a"}
        assert isinstance(doc["registrationTimeUTC"], int) and doc["registrationTimeUTC"] > 0
        first_session = registration.session
        assert stat.ephemeralOwner == first_session[0] != 0
        yield wait_until(lambda: [e.id for e in disc.current()] == ["gw-1"], "discovered")

        yield blocking(expire_session, zk.hosts, first_session)
        yield wait_until(lambda: registration.status()["session_losses"] == 1, "session loss")
        yield wait_until(lambda: registration.status()["registered"], "re-registration")
        data, stat = yield blocking(writer.get, path)
        assert registration.session[0] != first_session[0]
        assert stat.ephemeralOwner == registration.session[0]
        assert json.loads(data) == doc
        status = app.runtime.status()["registration"]
        assert status["registrations"] == 2 and status["connected"] is True
        yield wait_until(lambda: [e.id for e in disc.current()] == ["gw-1"], "seen again")
    finally:
        yield app.service.stopService()
    try:
        assert (yield blocking(writer.exists, path)) is None
        yield wait_until(lambda: disc.current() == (), "unregistered instance gone")
    finally:
        yield disc.stop()


@pytest_twisted.inlineCallbacks
def test_registration_replaces_a_node_left_by_another_session(zk, writer, base):
    """
    A node with our id left by an older session (a restart within the
    session timeout) is replaced by ours, as Curator does.
    """
    path = f"{base}/svc/same-id"
    yield blocking(writer.create, path, curator("svc", "same-id", 1), ephemeral=True,
                   makepath=True)
    reg = ServiceRegistration(zk.hosts, base, "svc", "127.0.0.1", 9090, reactor=reactor,
                              instance_id="same-id", session_timeout=5.0)
    reg.startService()
    try:
        yield wait_until(lambda: reg.status()["registered"], "registration")
        data, stat = yield blocking(writer.get, path)
        assert json.loads(data)["port"] == 9090
        assert stat.ephemeralOwner == reg.session[0]
    finally:
        yield reg.stopService()
    assert (yield blocking(writer.exists, path)) is None


def curator_list(probe: list[str], hosts: str, base: str, service: str) -> list[dict]:
    """
    What Curator's ``ServiceDiscovery.queryForInstances`` returns, as dicts.
    """
    done = subprocess.run([*probe, hosts, base, service, "list"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "done", done.stdout
    return [json.loads(line) for line in lines[:-1]]


@pytest_twisted.inlineCallbacks
def test_curator_finds_our_registration(zk, base, curator_probe):
    """
    Apache Curator's ServiceDiscovery reads the self-registration node as one
    of its own DYNAMIC instances, payload included.
    """
    reg = ServiceRegistration(zk.hosts, base, "gateway", "127.0.0.1", 8080, {"zone": "a"},
                              reactor=reactor, instance_id="gw-1", session_timeout=5.0)
    reg.startService()
    try:
        yield wait_until(lambda: reg.status()["registered"], "registration")
        (found,) = yield blocking(curator_list, curator_probe, zk.hosts, base, "gateway")
        assert found["name"] == "gateway" and found["id"] == "gw-1"
        assert (found["address"], found["port"], found["sslPort"]) == ("127.0.0.1", 8080, None)
        assert found["payload"] == {"zone": "a"}
        assert found["serviceType"] == "DYNAMIC" and found["enabled"] is True
        assert found["registrationTimeUTC"] == json.loads(reg.instance_json())[
            "registrationTimeUTC"]
    finally:
        yield reg.stopService()
    assert (yield blocking(curator_list, curator_probe, zk.hosts, base, "gateway")) == []


class CuratorRegistration:
    """
    An instance registered by Curator in a child JVM, until :meth:`stop`.
    """

    def __init__(self, probe: list[str], hosts: str, base: str, service: str, ident: str,
                 port: int, zone: str) -> None:
        self.process = subprocess.Popen(
            [*probe, hosts, base, service, "register", ident, "127.0.0.1", str(port), zone],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_registered(self) -> None:
        line = self.process.stdout.readline().strip()
        if line != "registered":
            self.process.kill()
            raise AssertionError(f"Curator probe said {line!r}: {self.process.stderr.read()}")

    def stop(self) -> str:
        out, err = self.process.communicate("stop\n", timeout=120)
        assert self.process.returncode == 0, err
        return out.strip()


@pytest_twisted.inlineCallbacks
def test_we_find_curators_registration(zk, writer, base, curator_probe):
    """
    An instance registered with Curator's ServiceDiscovery.registerService
    is one of our endpoints, payload included; unregistered, it is gone.
    """
    disc = ZooKeeperDiscovery(zk.hosts, base, "users", reactor=reactor, session_timeout=5.0)
    seen: list[list[str]] = []
    disc.watch(lambda eps: seen.append([e.id for e in eps]))
    jvm = CuratorRegistration(curator_probe, zk.hosts, base, "users", "jvm-1", 9091, "b")
    try:
        yield disc.start()
        yield blocking(jvm.wait_registered)
        yield wait_until(lambda: [e.id for e in disc.current()] == ["jvm-1"],
                         "Curator's instance")
        (endpoint,) = disc.current()
        assert (endpoint.host, endpoint.port) == ("127.0.0.1", 9091)
        assert endpoint.payload == {"zone": "b"}  # Jackson's "@class" member dropped
        # Curator writes exactly the fields (and order) pipecomet writes.
        data, stat = yield blocking(writer.get, f"{base}/users/jvm-1")
        written = json.loads(data)
        assert list(written) == list(json.loads(curator("users", "jvm-1", 9091)))
        assert written["serviceType"] == "DYNAMIC" and stat.ephemeralOwner != 0
        assert (yield blocking(jvm.stop)) == "unregistered"
        yield wait_until(lambda: disc.current() == (), "Curator's instance gone")
        assert seen == [["jvm-1"], []]
    finally:
        if jvm.process.poll() is None:
            jvm.process.kill()
            jvm.process.wait()
        yield disc.stop()
