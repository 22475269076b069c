"""
Discovery without a network: the file formats, the file provider polled on
a fake clock over a real temporary file, Curator's ServiceInstance JSON in
both directions, and the ``[registration]`` table.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pipecomet import Config
from pipecomet._backend._discovery import DiscoveryConfig, Endpoint, make_discovery
from pipecomet._backend._file import FileDiscovery, parse_endpoints_file
from pipecomet._backend._zookeeper import (
    ZooKeeperDiscovery,
    instance_json,
    instance_path,
    parse_instance,
)
from pipecomet._config import ConfigError


class EndpointsFileFormatTests(SynchronousTestCase):
    def test_json_strings(self):
        eps = parse_endpoints_file(b'{"endpoints": ["127.0.0.1:8081", "[::1]:8082"]}', "a.json")
        self.assertEqual(eps, (Endpoint("127.0.0.1", 8081), Endpoint("::1", 8082)))
        self.assertEqual(eps[0].id, "127.0.0.1:8081")

    def test_json_bare_list_of_objects(self):
        eps = parse_endpoints_file(
            b'[{"host": "10.0.0.1", "port": 80, "id": "a", "payload": {"zone": "x"}},'
            b' "10.0.0.2:81"]', "a.json")
        self.assertEqual([(e.host, e.port, e.id) for e in eps],
                         [("10.0.0.1", 80, "a"), ("10.0.0.2", 81, "10.0.0.2:81")])
        self.assertEqual(eps[0].payload, {"zone": "x"})

    def test_toml_strings_and_tables(self):
        eps = parse_endpoints_file(b'endpoints = ["h:1", "h:2"]\n', "e.toml")
        self.assertEqual([e.port for e in eps], [1, 2])
        eps = parse_endpoints_file(
            b'[[endpoints]]\nhost = "h"\nport = 5\nid = "five"\n'
            b'[[endpoints]]\nhost = "h"\nport = 6\n', "e.toml")
        self.assertEqual([(e.port, e.id) for e in eps], [(5, "five"), (6, "h:6")])

    def test_empty_list_is_valid(self):
        self.assertEqual(parse_endpoints_file(b'{"endpoints": []}', "a.json"), ())

    def test_errors_say_what_is_wrong(self):
        cases = [
            (b'{"endpoints": ["h:1",', "a.json", "not valid JSON"),
            (b'endpoints = [', "a.toml", "not valid TOML"),
            (b'{"hosts": []}', "a.json", "unknown key(s) hosts"),
            (b'{}', "a.json", "missing key: endpoints"),
            (b'{"endpoints": "h:1"}', "a.json", "endpoints: must be a list"),
            (b'{"endpoints": ["h"]}', "a.json", "endpoints[0]: 'h' is not host:port"),
            (b'{"endpoints": ["h:0"]}', "a.json", "port out of range"),
            (b'{"endpoints": [{"host": "h", "port": true}]}', "a.json", "endpoints[0].port"),
            (b'{"endpoints": [{"host": "h", "port": 70000}]}', "a.json", "endpoints[0].port"),
            (b'{"endpoints": [{"port": 1}]}', "a.json", "endpoints[0].host"),
            (b'{"endpoints": [{"host": "h", "port": 1, "weight": 2}]}', "a.json",
             "unknown key(s) weight"),
            (b'{"endpoints": [7]}', "a.json", "endpoints[0]: must be"),
            (b'{"endpoints": ["h:1", "h:1"]}', "a.json", "duplicate id 'h:1'"),
        ]
        for data, name, message in cases:
            with self.assertRaises(ValueError, msg=data) as e:
                parse_endpoints_file(data, name)
            self.assertIn(message, str(e.exception), data)


class FileDiscoveryTests(SynchronousTestCase):
    """
    A real file in a temporary directory, polled on a fake clock.
    """

    def setUp(self):
        self.dir = Path(tempfile.mkdtemp())
        self.path = self.dir / "users.json"
        self.clock = Clock()
        self.seen = []
        self.addCleanup(shutil.rmtree, self.dir)

    def write(self, doc, name=None):
        # A new file renamed over the old one, as editors and config tools
        # do: the inode changes even when size and mtime would not.
        path = self.dir / (name or self.path.name)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
        os.replace(tmp, path)

    def discovery(self, **kw):
        d = FileDiscovery(str(self.path), reactor=self.clock, poll_interval=2.0, **kw)
        d.watch(self.seen.append)
        return d

    def test_reads_at_start_and_follows_changes(self):
        self.write({"endpoints": ["h:1", "h:2"]})
        d = self.discovery()
        started = d.start()
        self.assertIsNone(self.successResultOf(started))
        self.assertEqual([e.port for e in d.current()], [1, 2])
        self.assertEqual(d.status()["connected"], True)
        self.assertEqual(d.status()["stale"], False)
        self.assertIsNone(d.status()["error"])

        self.write({"endpoints": ["h:2", "h:3"]})
        self.clock.advance(1.9)
        self.assertEqual([e.port for e in d.current()], [1, 2], "not before the next poll")
        self.clock.advance(0.1)
        self.assertEqual([e.port for e in d.current()], [2, 3])
        self.assertEqual([[e.port for e in eps] for eps in self.seen], [[1, 2], [2, 3]])
        self.assertEqual(d.status()["loads"], 2)

    def test_unchanged_file_is_not_reread_and_same_list_not_announced(self):
        self.write({"endpoints": ["h:1"]})
        d = self.discovery()
        d.start()
        self.clock.pump([2.0] * 5)
        self.assertEqual(d.status()["checks"], 6)
        self.assertEqual(d.status()["loads"], 1)
        self.write({"endpoints": ["h:1"]})  # rewritten, same content
        self.clock.advance(2.0)
        self.assertEqual(d.status()["loads"], 2)
        self.assertEqual(len(self.seen), 1)

    def test_payload_change_is_announced(self):
        self.write([{"host": "h", "port": 1, "payload": "a"}])
        d = self.discovery()
        d.start()
        self.write([{"host": "h", "port": 1, "payload": "b"}])
        self.clock.advance(2.0)
        self.assertEqual([eps[0].payload for eps in self.seen], ["a", "b"])

    def test_malformed_file_keeps_last_good_list(self):
        self.write({"endpoints": ["h:1"]})
        d = self.discovery()
        d.start()
        self.write(b'{"endpoints": ["h:1", ')
        self.clock.advance(2.0)
        self.assertEqual([e.port for e in d.current()], [1])
        status = d.status()
        self.assertEqual((status["connected"], status["stale"]), (False, True))
        self.assertIn("not valid JSON", status["error"])
        self.assertIn(str(self.path), status["error"])

        self.write({"endpoints": ["h:1", "nope"]})
        self.clock.advance(2.0)
        self.assertIn("endpoints[1]", d.status()["error"])
        self.assertEqual([e.port for e in d.current()], [1])

        self.write({"endpoints": ["h:4"]})
        self.clock.advance(2.0)
        self.assertEqual([e.port for e in d.current()], [4])
        self.assertIsNone(d.status()["error"])
        self.assertEqual(d.status()["stale"], False)
        self.assertEqual([[e.port for e in eps] for eps in self.seen], [[1], [4]])

    def test_missing_file_then_created(self):
        d = self.discovery()
        d.start()
        self.assertEqual(d.current(), ())
        self.assertIn("cannot read", d.status()["error"])
        self.assertEqual(d.status()["stale"], True)
        self.write({"endpoints": ["h:9"]})
        self.clock.advance(2.0)
        self.assertEqual([e.port for e in d.current()], [9])
        self.path.unlink()
        self.clock.advance(2.0)
        self.assertEqual([e.port for e in d.current()], [9], "deleted file keeps the last list")
        self.assertIn("No such file", d.status()["error"])

    def test_file_above_max_size_is_refused(self):
        self.write({"endpoints": ["h:1"]})
        d = self.discovery(max_size=64)
        d.start()
        self.write({"endpoints": [f"h:{p}" for p in range(1, 40)]})
        self.clock.advance(2.0)
        self.assertEqual([e.port for e in d.current()], [1])
        self.assertIn("larger than max_size 64", d.status()["error"])

    def test_toml_file(self):
        self.path = self.dir / "users.toml"
        self.write(b'endpoints = ["h:7"]\n')
        d = self.discovery()
        d.start()
        self.assertEqual([e.port for e in d.current()], [7])

    def test_stop_ends_polling_and_unwatch(self):
        self.write({"endpoints": ["h:1"]})
        d = self.discovery()
        d.start()
        self.assertIsNone(self.successResultOf(d.stop()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        checks = d.status()["checks"]
        self.clock.advance(10)
        self.assertEqual(d.status()["checks"], checks)

        got = []
        unwatch = d.watch(got.append)
        d.start()
        self.write({"endpoints": ["h:2"]})
        unwatch()
        self.clock.advance(2.0)
        self.assertEqual(got, [])
        self.assertEqual([e.port for e in d.current()], [2])

    def test_watcher_error_does_not_stop_others(self):
        self.write({"endpoints": ["h:1"]})
        d = self.discovery()

        def broken(eps):
            raise RuntimeError("boom")

        d.watch(broken)
        later = []
        d.watch(later.append)
        d.start()
        self.assertEqual(len(later), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_an_unexpected_error_does_not_end_polling(self):
        import pipecomet._backend._file as module

        self.write({"endpoints": ["h:1"]})
        d = self.discovery()
        d.start()

        def broken(data, name):
            raise KeyError("x")

        self.patch(module, "parse_endpoints_file", broken)
        self.write({"endpoints": ["h:2"]})
        self.clock.advance(2.0)
        self.assertIn("unexpected KeyError", d.status()["error"])
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.assertEqual([e.port for e in d.current()], [1])

        self.patch(module, "parse_endpoints_file", parse_endpoints_file)
        self.write({"endpoints": ["h:3"]})
        self.clock.advance(2.0)
        self.assertEqual([e.port for e in d.current()], [3])

    def test_make_discovery_builds_it(self):
        self.write({"endpoints": ["h:3"]})
        config = DiscoveryConfig(kind="file", path=str(self.path), poll_interval=0.5)
        d = make_discovery("users", config, self.clock)
        self.assertIsInstance(d, FileDiscovery)
        d.start()
        self.assertEqual([e.port for e in d.current()], [3])
        d.stop()


CURATOR_NODE = {
    "name": "users",
    "id": "ca2fff8e-d756-480c-b59e-8297ff88624b",
    "address": "10.20.30.40",
    "port": 1234,
    "sslPort": None,
    "payload": {"@class": "java.util.LinkedHashMap", "zone": "a"},
    "registrationTimeUTC": 1325129459728,
    "serviceType": "DYNAMIC",
    "uriSpec": {"parts": [{"value": "scheme", "variable": True},
                          {"value": "://foo", "variable": False}]},
}


class CuratorInstanceTests(SynchronousTestCase):
    def test_curator_json_as_endpoint(self):
        e = parse_instance(json.dumps(CURATOR_NODE).encode(), CURATOR_NODE["id"])
        self.assertEqual((e.host, e.port, e.id),
                         ("10.20.30.40", 1234, "ca2fff8e-d756-480c-b59e-8297ff88624b"))
        self.assertEqual(e.payload, {"zone": "a"}, "Jackson's @class hint dropped")
        node = dict(CURATOR_NODE, payload="plain")
        self.assertEqual(parse_instance(json.dumps(node).encode()).payload, "plain")

    def test_curator_5_enabled_flag_and_minimal_instances(self):
        node = dict(CURATOR_NODE, enabled=False)
        self.assertIsNone(parse_instance(json.dumps(node).encode(), "x"))
        node = dict(CURATOR_NODE, enabled=True)
        self.assertIsNotNone(parse_instance(json.dumps(node).encode(), "x"))
        e = parse_instance(b'{"address": "h", "port": 5}', "node-7")
        self.assertEqual((e.id, e.payload), ("node-7", None))

    def test_bad_instances(self):
        cases = [
            (b"nope", "not valid JSON"),
            (b"[1]", "not a JSON object"),
            (b'{"port": 1}', "address"),
            (b'{"address": "h"}', "port: missing"),
            (b'{"address": "h", "port": null, "sslPort": 443}', "only an sslPort"),
            (b'{"address": "h", "port": "80"}', "port: must be an integer"),
            (b'{"address": "h", "port": 0}', "port: must be an integer"),
            (b'{"address": "h", "port": 1, "serviceType": "ODD"}', "serviceType"),
        ]
        for data, message in cases:
            with self.assertRaises(ValueError, msg=data) as e:
                parse_instance(data, "n1")
            self.assertIn(message, str(e.exception))
            self.assertIn("'n1'", str(e.exception))

    def test_written_json_has_curators_fields_in_order(self):
        data = instance_json("users", "i-1", "127.0.0.1", 8081, payload={"v": 2},
                             registration_time_ms=1700000000123)
        doc = json.loads(data)
        self.assertEqual(list(doc), ["name", "id", "address", "port", "sslPort", "payload",
                                     "registrationTimeUTC", "serviceType", "uriSpec"])
        self.assertEqual(doc["serviceType"], "DYNAMIC")
        self.assertEqual(doc["registrationTimeUTC"], 1700000000123)
        self.assertIsNone(doc["sslPort"])
        e = parse_instance(data, "i-1")
        self.assertEqual((e.host, e.port, e.id, e.payload), ("127.0.0.1", 8081, "i-1", {"v": 2}))
        with self.assertRaises(ValueError):
            instance_json("users", "i-1", "h", 1, service_type="EPHEMERAL")

    def test_paths(self):
        self.assertEqual(instance_path("/services", "users", "a"), "/services/users/a")
        self.assertEqual(instance_path("services/", "users", "a"), "/services/users/a")
        self.assertEqual(instance_path("/", "users", "a"), "/users/a")
        for service, ident in (("", "a"), ("a/b", "a"), ("users", ""), ("users", "x/y")):
            with self.assertRaises(ValueError):
                instance_path("/services", service, ident)

    def test_make_discovery_zookeeper_does_not_connect(self):
        config = DiscoveryConfig(kind="zookeeper", hosts="127.0.0.1:1", base_path="/b")
        d = make_discovery("users", config, Clock())
        self.assertIsInstance(d, ZooKeeperDiscovery)
        status = d.status()
        self.assertEqual((status["connected"], status["stale"], status["path"]),
                         (False, True, "/b/users"))


class RegistrationConfigTests(SynchronousTestCase):
    def test_disabled_by_default_and_full_table(self):
        self.assertEqual(Config().registration.enabled, False)
        config = Config.from_dict({"registration": {
            "enabled": True, "hosts": "127.0.0.1:2181", "service": "gateway",
            "address": "10.0.0.5", "port": 8080, "payload": {"zone": "a"}}})
        self.assertEqual(config.registration.base_path, "/services")
        self.assertEqual(config.registration.payload, {"zone": "a"})

    def test_errors_name_the_key(self):
        base = {"enabled": True, "hosts": "h:1", "service": "s", "address": "a", "port": 1}
        cases = [
            ({**base, "hosts": ""}, "registration: hosts: needed"),
            ({**base, "port": 0}, "registration: port: needed"),
            ({**base, "port": 70000}, "port"),
            ({**base, "service": "a/b"}, "service: must not contain"),
            ({**base, "session_timeout": 0}, "session_timeout"),
            ({**base, "colour": 1}, "registration.colour: unknown key"),
        ]
        for table, message in cases:
            with self.assertRaises(ConfigError) as e:
                Config.from_dict({"registration": table})
            self.assertIn(message, str(e.exception))
