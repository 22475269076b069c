"""
The ZooKeeper discovery's and the self-registration's state handling, step
by step on a fake clock, with an in-memory stand-in for kazoo's client
(its async results complete at once, or when the test releases them; its
watches are one-shot, as ZooKeeper's are).  The real server is exercised
in ``test_it_zookeeper.py``; here every transition is driven on purpose.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any, Callable

from kazoo.exceptions import ConnectionLoss, NodeExistsError, NoNodeError
from kazoo.protocol.states import EventType, KeeperState, WatchedEvent
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pipecomet._backend._registration import ServiceRegistration
from pipecomet._backend._zookeeper import ZooKeeperDiscovery, instance_json


class FakeReactor(Clock):
    """
    A clock whose "other threads" are this one: ``callFromThread`` runs at
    once and the thread pool runs its work inline.
    """

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> None:
        f(*args, **kw)

    def getThreadPool(self) -> Any:
        return self

    def callInThreadWithCallback(self, on_result: Any, f: Any, *args: Any, **kw: Any) -> None:
        try:
            result = f(*args, **kw)
        except Exception:
            on_result(False, Failure())
        else:
            on_result(True, result)


class FakeResult:
    """
    kazoo's ``IAsyncResult``: ``rawlink`` and ``get_nowait``.
    """

    def __init__(self) -> None:
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Any], None]] = []

    def complete(self, value: Any = None, error: BaseException | None = None) -> None:
        self._done, self._value, self._error = True, value, error
        for cb in self._callbacks:
            cb(self)

    def rawlink(self, cb: Callable[[Any], None]) -> None:
        self._callbacks.append(cb)
        if self._done:
            cb(self)

    def get_nowait(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value


class FakeKazoo:
    """
    The slice of ``KazooClient`` pipecomet uses, over a dict of nodes.
    """

    def __init__(self) -> None:
        self.nodes: dict[str, tuple[bytes, int, int]] = {}  # path → (data, version, owner)
        self.listeners: set[Callable[[str], None]] = set()
        self.child_watches: dict[str, set] = {}
        self.data_watches: dict[str, set] = {}
        self.session = 0x1001
        self.live = False
        self.calls: list[str] = []
        self.fail: dict[str, BaseException] = {}
        self.hold = False
        self.held: list[tuple[FakeResult, Any, BaseException | None]] = []

    # -- lifecycle and state

    def add_listener(self, f: Callable[[str], None]) -> None:
        self.listeners.add(f)

    def remove_listener(self, f: Callable[[str], None]) -> None:
        self.listeners.discard(f)

    def start_async(self) -> None:
        self.calls.append("start_async")

    def stop(self) -> None:
        self.calls.append("stop")
        self.live = False

    def close(self) -> None:
        self.calls.append("close")

    def state(self, state: str) -> None:
        self.live = state == "CONNECTED"
        for f in list(self.listeners):
            f(state)

    def expire(self) -> None:
        """
        The session ends: its ephemeral nodes go, its watches with it.
        """
        for path, (_, _, owner) in list(self.nodes.items()):
            if owner == self.session:
                self.remove(path, fire=False)
        self.child_watches.clear()
        self.data_watches.clear()
        self.session += 1
        self.state("LOST")

    @property
    def client_id(self) -> tuple[int, bytes] | None:
        return (self.session, b"pw") if self.live else None

    # -- the tree, changed by the test (as another client would)

    def children(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        return sorted({p[len(prefix):].split("/")[0] for p in self.nodes
                       if p.startswith(prefix)})

    def put(self, path: str, data: bytes, owner: int = 0, fire: bool = True) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            parent = "/" + "/".join(parts[:i])
            if parent not in self.nodes:
                self.nodes[parent] = (b"", 0, 0)
                if fire:
                    self._fire(self.data_watches, parent, EventType.CREATED)
                    self._fire(self.child_watches, parent.rsplit("/", 1)[0] or "/",
                               EventType.CHILD)
        existed = path in self.nodes
        version = self.nodes[path][1] + 1 if existed else 0
        self.nodes[path] = (data, version, owner)
        if fire:
            self._fire(self.data_watches, path,
                       EventType.CHANGED if existed else EventType.CREATED)
            if not existed:
                self._fire(self.child_watches, path.rsplit("/", 1)[0], EventType.CHILD)

    def remove(self, path: str, fire: bool = True) -> None:
        for p in [p for p in self.nodes if p == path or p.startswith(path + "/")]:
            del self.nodes[p]
        if fire:
            self._fire(self.data_watches, path, EventType.DELETED)
            self._fire(self.child_watches, path, EventType.DELETED)
            self._fire(self.child_watches, path.rsplit("/", 1)[0], EventType.CHILD)

    def _fire(self, table: dict[str, set], path: str, kind: str) -> None:
        for watch in table.pop(path, set()):
            watch(WatchedEvent(kind, KeeperState.CONNECTED, path))

    # -- async calls

    def _answer(self, name: str, value: Any = None, error: BaseException | None = None) -> Any:
        self.calls.append(name)
        error = self.fail.pop(name, None) or error
        result = FakeResult()
        if self.hold:
            self.held.append((result, value, error))
        else:
            result.complete(value, error)
        return result

    def release(self) -> None:
        held, self.held = self.held, []
        for result, value, error in held:
            result.complete(value, error)

    def _stat(self, path: str) -> Any:
        _, version, owner = self.nodes[path]
        return SimpleNamespace(version=version, ephemeralOwner=owner)

    def get_children_async(self, path: str, watch: Any = None) -> Any:
        if path not in self.nodes:
            return self._answer("get_children", error=NoNodeError())
        if watch is not None:
            self.child_watches.setdefault(path, set()).add(watch)
        return self._answer("get_children", self.children(path))

    def exists_async(self, path: str, watch: Any = None) -> Any:
        if watch is not None:
            self.data_watches.setdefault(path, set()).add(watch)
        return self._answer("exists", self._stat(path) if path in self.nodes else None)

    def get_async(self, path: str, watch: Any = None) -> Any:
        if path not in self.nodes:
            return self._answer("get", error=NoNodeError())
        if watch is not None:
            self.data_watches.setdefault(path, set()).add(watch)
        return self._answer("get", (self.nodes[path][0], self._stat(path)))

    def create_async(self, path: str, value: bytes = b"", ephemeral: bool = False,
                     makepath: bool = False) -> Any:
        if "create" in self.fail:
            return self._answer("create")
        if path in self.nodes:
            return self._answer("create", error=NodeExistsError())
        assert ephemeral and makepath
        self.put(path, value, owner=self.session)
        return self._answer("create", path)

    def delete_async(self, path: str, version: int = -1) -> Any:
        if "delete" in self.fail:
            return self._answer("delete")
        if path not in self.nodes:
            return self._answer("delete", error=NoNodeError())
        self.remove(path)
        return self._answer("delete", True)


def node(port: int, ident: str = "") -> bytes:
    return instance_json("users", ident or f"i{port}", "127.0.0.1", port)


def ports(endpoints: Any) -> list[int]:
    return [e.port for e in endpoints]


class ZooKeeperDiscoveryStateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.zk = FakeKazoo()
        self.seen: list[list[int]] = []
        self.disc = ZooKeeperDiscovery("zk:2181", "/services", "users", reactor=self.reactor,
                                       session_timeout=10.0, retry_delay=1.0,
                                       client_factory=lambda: self.zk)
        self.disc.watch(lambda eps: self.seen.append(ports(eps)))

    def started(self) -> None:
        d = self.disc.start()
        self.assertNoResult(d)
        self.zk.state("CONNECTED")
        self.successResultOf(d)

    def test_start_fires_with_the_first_list_and_watches_follow(self) -> None:
        self.zk.put("/services/users/a", node(8001, "a"))
        self.zk.put("/services/users/b", node(8002, "b"))
        self.started()
        self.assertEqual(ports(self.disc.current()), [8001, 8002])
        status = self.disc.status()
        self.assertEqual((status["connected"], status["stale"], status["node_exists"]),
                         (True, False, True))

        self.zk.put("/services/users/c", node(8003, "c"))
        self.zk.put("/services/users/a", node(8011, "a"))
        self.zk.remove("/services/users/b")
        self.assertEqual(ports(self.disc.current()), [8011, 8003])
        self.assertEqual(self.seen, [[8001, 8002], [8001, 8002, 8003], [8011, 8002, 8003],
                                     [8011, 8003]])

    def test_a_change_reads_only_new_or_changed_nodes(self) -> None:
        for port in (8001, 8002, 8003):
            self.zk.put(f"/services/users/i{port}", node(port))
        self.started()
        self.zk.calls.clear()
        self.zk.put("/services/users/i8004", node(8004))
        self.assertEqual(self.zk.calls, ["get_children", "get"])

    def test_suspended_and_lost_keep_the_list_and_reconnect_reads_afresh(self) -> None:
        self.zk.put("/services/users/a", node(8001, "a"))
        self.started()
        self.zk.state("SUSPENDED")
        status = self.disc.status()
        self.assertEqual((status["connected"], status["stale"], status["losses"]),
                         (False, True, 1))
        self.assertEqual(ports(self.disc.current()), [8001])
        # Changes made while we could not hear them (no watch fires)...
        self.zk.put("/services/users/a", node(8009, "a"), fire=False)
        self.zk.put("/services/users/b", node(8002, "b"), fire=False)
        self.assertEqual(ports(self.disc.current()), [8001])
        # ...are read when the connection is back: the whole list again.
        self.zk.state("CONNECTED")
        self.assertEqual(ports(self.disc.current()), [8009, 8002])
        status = self.disc.status()
        self.assertEqual((status["connected"], status["stale"], status["connects"]),
                         (True, False, 2))

        self.zk.expire()
        self.assertEqual(ports(self.disc.current()), [8009, 8002])
        self.assertEqual(self.disc.status()["stale"], True)
        self.zk.remove("/services/users/b", fire=False)
        self.zk.state("CONNECTED")
        self.assertEqual(ports(self.disc.current()), [8009])
        # Watches were set again on the new session.
        self.zk.put("/services/users/c", node(8003, "c"))
        self.assertEqual(ports(self.disc.current()), [8009, 8003])
        self.assertEqual(self.seen, [[8001], [8009, 8002], [8009], [8009, 8003]])

    def test_stale_until_the_reconnected_read_is_in(self) -> None:
        self.zk.put("/services/users/a", node(8001, "a"))
        self.started()
        self.zk.state("SUSPENDED")
        self.zk.hold = True
        self.zk.state("CONNECTED")
        status = self.disc.status()
        self.assertEqual((status["connected"], status["stale"]), (True, True))
        self.zk.hold = False
        self.zk.release()  # get_children answers; the get goes out and answers
        self.assertEqual(self.disc.status()["stale"], False)

    def test_a_read_begun_before_a_suspension_does_not_make_the_list_current(self) -> None:
        self.zk.put("/services/users/a", node(8001, "a"))
        self.started()
        self.zk.hold = True
        self.zk.put("/services/users/b", node(8002, "b"))  # read 1 goes out
        self.zk.state("SUSPENDED")
        self.zk.state("CONNECTED")  # read 2 (everything) waits for read 1
        self.assertEqual(self.disc.link.value, "reading")
        self.zk.release()  # read 1's listing; its get of b goes out
        self.zk.release()  # read 1 done
        self.assertEqual(ports(self.disc.current()), [8001, 8002])
        self.assertEqual(self.disc.status()["stale"], True)
        self.zk.release()  # read 2's listing
        self.zk.release()  # read 2's gets
        self.assertEqual(self.zk.held, [])
        self.assertEqual(self.disc.status()["stale"], False)
        self.assertEqual(self.disc.status()["state"], "current")

    def test_no_answer_at_start_fires_empty_and_stale_after_start_timeout(self) -> None:
        d = self.disc.start()
        self.reactor.advance(9.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.successResultOf(d)
        self.assertEqual(self.disc.current(), ())
        status = self.disc.status()
        self.assertEqual((status["connected"], status["stale"], status["node_exists"]),
                         (False, True, None))
        self.zk.put("/services/users/a", node(8001, "a"))
        self.zk.state("CONNECTED")
        self.assertEqual(self.seen, [[8001]])

    def test_missing_service_node_is_watched_until_created(self) -> None:
        self.started()
        self.assertEqual(self.disc.current(), ())
        self.assertEqual(self.disc.status()["node_exists"], False)
        self.assertEqual(self.disc.status()["stale"], False)
        self.zk.put("/services/users/a", node(8001, "a"))
        self.assertEqual(ports(self.disc.current()), [8001])
        self.zk.remove("/services/users")
        self.assertEqual(self.disc.current(), ())
        self.assertEqual(self.disc.status()["node_exists"], False)

    def test_failed_read_keeps_the_list_and_is_retried(self) -> None:
        self.zk.put("/services/users/a", node(8001, "a"))
        self.started()
        self.zk.fail["get_children"] = ConnectionLoss()
        self.zk.put("/services/users/b", node(8002, "b"))
        self.assertEqual(ports(self.disc.current()), [8001])
        self.assertEqual(self.disc.status()["last_error"], "ConnectionLoss")
        self.assertEqual(self.disc.status()["stale"], False)
        self.reactor.advance(1.0)
        self.assertEqual(ports(self.disc.current()), [8001, 8002])
        self.assertIsNone(self.disc.status()["last_error"])

    def test_failed_instance_read_keeps_its_last_value(self) -> None:
        self.zk.put("/services/users/a", node(8001, "a"))
        self.started()
        self.zk.fail["get"] = ConnectionLoss()
        self.zk.put("/services/users/a", node(8011, "a"))
        self.assertEqual(ports(self.disc.current()), [8001])
        self.assertIsNotNone(self.disc.status()["last_error"])
        self.reactor.advance(1.0)
        self.assertEqual(ports(self.disc.current()), [8011])

    def test_reads_never_overlap(self) -> None:
        self.zk.put("/services/users/a", node(8001, "a"))
        self.started()
        self.zk.hold = True
        self.zk.calls.clear()
        self.zk.put("/services/users/b", node(8002, "b"))
        self.zk.hold = False
        self.zk.put("/services/users/c", node(8003, "c"), fire=False)
        self.zk.put("/services/users/d", node(8004, "d"), fire=False)
        self.disc._children_event(None)  # two more changes while the first read is out
        self.disc._children_event(None)
        self.assertEqual(self.zk.calls, ["get_children"])
        self.zk.release()
        self.assertEqual(self.zk.calls.count("get_children"), 2)
        self.assertEqual(ports(self.disc.current()), [8001, 8002, 8003, 8004])

    def test_invalid_instances_are_left_out_and_named(self) -> None:
        self.zk.put("/services/users/a", node(8001, "a"))
        self.zk.put("/services/users/bad", b"{")
        self.zk.put("/services/users/off", json.dumps(
            {**json.loads(node(8005, "off")), "enabled": False}).encode())
        self.started()
        self.assertEqual(ports(self.disc.current()), [8001])
        self.assertEqual(list(self.disc.status()["invalid"]), ["bad"])
        self.zk.put("/services/users/bad", node(8006, "bad"))
        self.assertEqual(ports(self.disc.current()), [8001, 8006])
        self.assertEqual(self.disc.status()["invalid"], {})

    def test_stop_closes_the_client_and_ignores_late_events(self) -> None:
        self.zk.put("/services/users/a", node(8001, "a"))
        self.started()
        self.successResultOf(self.disc.stop())
        self.assertEqual(self.zk.calls[-2:], ["stop", "close"])
        self.assertEqual(self.zk.listeners, set())
        self.zk.put("/services/users/b", node(8002, "b"))
        self.assertEqual(ports(self.disc.current()), [8001])
        self.assertEqual(self.disc.status()["connected"], False)


class ServiceRegistrationStateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.reactor.advance(1_700_000_000.5)
        self.zk = FakeKazoo()
        self.reg = ServiceRegistration("zk:2181", "/services", "gateway", "10.0.0.5", 8080,
                                       {"zone": "a"}, reactor=self.reactor, instance_id="gw-1",
                                       retry_delay=1.0, client_factory=lambda: self.zk)
        self.path = "/services/gateway/gw-1"

    def test_registers_on_connect_as_curator_dynamic_instance(self) -> None:
        self.reg.startService()
        self.assertEqual(self.zk.calls, ["start_async"])
        self.assertNotIn(self.path, self.zk.nodes)
        self.zk.state("CONNECTED")
        data, _, owner = self.zk.nodes[self.path]
        self.assertEqual(owner, self.zk.session)
        doc = json.loads(data)
        self.assertEqual(doc, {"name": "gateway", "id": "gw-1", "address": "10.0.0.5",
                               "port": 8080, "sslPort": None, "payload": {"zone": "a"},
                               "registrationTimeUTC": 1_700_000_000_500,
                               "serviceType": "DYNAMIC", "uriSpec": None})
        status = self.reg.status()
        self.assertEqual((status["registered"], status["registrations"]), (True, 1))

    def test_reconnect_in_the_same_session_finds_its_own_node(self) -> None:
        self.reg.startService()
        self.zk.state("CONNECTED")
        self.zk.state("SUSPENDED")
        self.assertEqual(self.reg.status()["connected"], False)
        self.zk.calls.clear()
        self.zk.state("CONNECTED")
        self.assertEqual(self.zk.calls, ["create", "exists"])
        status = self.reg.status()
        self.assertEqual((status["registered"], status["registrations"]), (True, 1))

    def test_an_answer_from_before_a_suspension_proves_nothing(self) -> None:
        self.reg.startService()
        self.zk.hold = True
        self.zk.state("CONNECTED")  # the create goes out
        self.zk.state("SUSPENDED")
        self.zk.state("CONNECTED")  # a second check waits for the first
        self.zk.release()  # the first create's answer
        status = self.reg.status()
        self.assertEqual((status["state"], status["registrations"]), ("registering", 1))
        self.zk.release()  # the second create: exists...
        self.zk.release()  # ...and is ours
        self.assertEqual(self.zk.held, [])
        status = self.reg.status()
        self.assertEqual((status["state"], status["registrations"]), ("registered", 1))

    def test_lost_session_registers_again(self) -> None:
        self.reg.startService()
        self.zk.state("CONNECTED")
        first = self.zk.session
        self.zk.expire()
        self.assertNotIn(self.path, self.zk.nodes)
        status = self.reg.status()
        self.assertEqual((status["registered"], status["session_losses"]), (False, 1))
        self.zk.state("CONNECTED")
        self.assertEqual(self.zk.nodes[self.path][2], first + 1)
        status = self.reg.status()
        self.assertEqual((status["registered"], status["registrations"]), (True, 2))

    def test_node_of_another_session_is_replaced(self) -> None:
        self.zk.put(self.path, b"old", owner=0x77)
        self.reg.startService()
        self.zk.state("CONNECTED")
        self.assertEqual(self.zk.calls[1:], ["create", "exists", "delete", "create"])
        data, _, owner = self.zk.nodes[self.path]
        self.assertEqual(owner, self.zk.session)
        self.assertEqual(json.loads(data)["id"], "gw-1")

    def test_failed_create_is_retried_while_connected(self) -> None:
        self.reg.startService()
        self.zk.fail["create"] = ConnectionLoss()
        self.zk.state("CONNECTED")
        self.assertNotIn(self.path, self.zk.nodes)
        self.assertEqual(self.reg.status()["last_error"], "register: ConnectionLoss")
        self.reactor.advance(1.0)
        self.assertIn(self.path, self.zk.nodes)
        self.assertEqual(self.reg.status()["registered"], True)
        self.assertIsNone(self.reg.status()["last_error"])

    def test_stop_deletes_the_node_then_closes_the_session(self) -> None:
        self.reg.startService()
        self.zk.state("CONNECTED")
        self.successResultOf(self.reg.stopService())
        self.assertNotIn(self.path, self.zk.nodes)
        self.assertEqual(self.zk.calls[-3:], ["delete", "stop", "close"])
        self.assertEqual(self.reg.status()["registered"], False)
        self.zk.state("CONNECTED")  # late event from kazoo's thread
        self.assertNotIn(self.path, self.zk.nodes)
