"""
``[gc]``: the serving process's collector settings are applied while the
app runs and put back when it stops.
"""

from __future__ import annotations

import gc

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pipecomet import App, Config
from pipecomet._config import ConfigError
from pipecomet._gc import GCConfig


class GCTuningTests(SynchronousTestCase):
    def setUp(self) -> None:
        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        self.addCleanup(gc.unfreeze)

    def app(self, table: dict[str, object]) -> App:
        app = App(reactor=Clock(), name="gc")
        app.configure(Config.from_dict({"gc": table}))
        return app

    def test_threshold_while_running_then_restored(self) -> None:
        gc.set_threshold(700, 10, 10)
        app = self.app({"threshold": 20000})
        self.assertEqual(gc.get_threshold(), (700, 10, 10))  # not at configure time
        app.service.startService()
        self.assertEqual(gc.get_threshold(), (20000, 10, 10))
        app.service.stopService()
        self.assertEqual(gc.get_threshold(), (700, 10, 10))

    def test_freeze_hides_the_start_heap_until_stop(self) -> None:
        app = self.app({"freeze": True})
        app.service.startService()
        self.assertGreater(gc.get_freeze_count(), 0)
        app.service.stopService()
        self.assertEqual(gc.get_freeze_count(), 0)

    def test_defaults_change_nothing(self) -> None:
        gc.set_threshold(700, 10, 10)
        app = self.app({})
        app.service.startService()
        self.assertEqual(gc.get_threshold(), (700, 10, 10))
        self.assertEqual(gc.get_freeze_count(), 0)
        app.service.stopService()
        self.assertEqual(Config().gc, GCConfig())

    def test_bad_values_name_the_key(self) -> None:
        with self.assertRaises(ConfigError) as e:
            Config.from_dict({"gc": {"threshold": -1}})
        self.assertIn("threshold", str(e.exception))
        with self.assertRaises(ConfigError):
            Config.from_dict({"gc": {"freeze": "yes"}})
