"""
The public API, pinned (as Klein's ``test/test_exports.py``): what
``pipecomet`` and its public modules export, that the internals stay out,
and that the demo is built on the public names alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import pipecomet
import pipecomet.config
import pipecomet.errors
import pipecomet.interfaces
import pipecomet.testing

SRC = Path(pipecomet.__file__).resolve().parent

TOP_LEVEL = {
    "Answer", "App", "BadRequest", "Chain", "Condition", "Config", "ConfigError", "Forbidden",
    "GatewayTimeout", "NotFound", "Parallel", "Pipe", "PipeContext", "PipeInput", "PipeResult",
    "PipecometError", "ServiceUnavailable", "SkipRest", "TooManyRequests", "Unauthorized",
    "UploadedFile", "call", "load_config", "pipe", "process_pipe", "proxy", "trace_headers",
    "worker_function",
}

CONFIG = {
    "BackendsConfig", "BusConfig", "CategoryConfig", "CometConfig", "Config", "ConfigError",
    "DiscoveryConfig", "LimitsConfig", "LoggingConfig", "MetricsConfig", "QuotaConfig",
    "ServerConfig", "ServiceConfig", "WorkersConfig", "load_config", "register_section",
}

INTERFACES = {
    "IBodySource", "IBus", "IBusReceiver", "IChainRequest", "IDiscovery", "IEventListener",
    "IHistoryBus", "IPipeInput", "IPipecometReactor", "IStreamSink",
}

TESTING = {"Call", "MemoryClient", "SynchronousThreadPool", "make_clock"}

ERRORS = {
    "BackendBusy", "BackendError", "BackendQueueTimeout", "BackendResponseTooLarge",
    "BackendTimeout", "BadGateway", "BadRequest", "ExecutionTimeout", "Forbidden",
    "GatewayTimeout", "HeadersTooLarge", "InternalError", "MethodNotAllowed", "NoBackend",
    "NotFound", "PayloadTooLarge", "PipecometError", "PoolClosing", "QueueFull", "QueueTimeout",
    "RequestTimeout", "ServiceUnavailable", "TooManyRequests", "Unauthorized",
    "WorkerCallError", "WorkerCrashed", "WorkerFunctionError", "WorkersUnavailable",
    "WorkerTimeout",
}


class ExportTests(SynchronousTestCase):
    def _check(self, module, expected):
        self.assertEqual(set(module.__all__), expected)
        self.assertEqual(len(module.__all__), len(set(module.__all__)), "duplicates in __all__")
        for name in module.__all__:
            self.assertTrue(hasattr(module, name), f"{module.__name__}.{name} is listed, not there")

    def test_top_level(self):
        self._check(pipecomet, TOP_LEVEL)

    def test_internals_are_not_exported(self):
        for name in ("ChainRun", "Runtime", "PipecometResource", "Route", "LazyRequest",
                     "LazySite", "SynchronousThreadPool", "QuotaPool", "WorkerPool", "CometHub",
                     "EventKeeper", "MemoryBus", "IBus"):
            self.assertNotIn(name, pipecomet.__all__)
            self.assertFalse(hasattr(pipecomet, name), name)

    def test_config(self):
        self._check(pipecomet.config, CONFIG)

    def test_interfaces(self):
        self._check(pipecomet.interfaces, INTERFACES)
        # The chain sink is internal: the responders that implement it are
        # pipecomet's own, picked by name (Route responders=...); an app
        # never writes one.  The stream sink they also implement is public.
        from pipecomet import _interfaces

        self.assertTrue(hasattr(_interfaces, "IChainSink"))
        self.assertFalse(hasattr(pipecomet.interfaces, "IChainSink"))

    def test_testing(self):
        self._check(pipecomet.testing, TESTING)

    def test_errors(self):
        self._check(pipecomet.errors, ERRORS)
        for name in pipecomet.errors.__all__:
            self.assertTrue(issubclass(getattr(pipecomet.errors, name), pipecomet.PipecometError))

    def test_ships_py_typed(self):
        self.assertTrue((SRC / "py.typed").is_file())


def _imports(path: Path) -> list[str]:
    """
    Every module ``path`` imports, absolute (``from ..x`` → ``pipecomet.x``).
    """
    tree = ast.parse(path.read_text(), str(path))
    rel = path.relative_to(SRC.parent).with_suffix("").parts
    package = ".".join(rel if rel[-1] == "__init__" else rel[:-1]).removesuffix(".__init__")
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                out.append(f"{base}.{node.module}" if node.module else base)
            else:
                out.append(node.module or "")
    return out


class DemoOnPublicAPITests(SynchronousTestCase):
    def test_demo_imports_only_public_pipecomet_names(self):
        demo = SRC / "demo"
        files = sorted(demo.glob("*.py"))
        self.assertGreater(len(files), 5)
        for path in files:
            for module in _imports(path):
                if not module.startswith("pipecomet"):
                    continue
                if module.startswith("pipecomet.demo"):
                    continue
                parts = module.split(".")
                self.assertFalse(any(p.startswith("_") for p in parts),
                                 f"{path.name} imports the private {module}")

    def test_core_does_not_know_the_demo(self):
        """
        No module outside ``pipecomet.demo`` imports it or names its
        section; the default app is an entry point and ``[demo]`` is
        registered by the demo.
        """
        from pipecomet._config import ServerConfig

        self.assertEqual(ServerConfig().app, "")
        for path in SRC.rglob("*.py"):
            if "demo" in path.relative_to(SRC).parts:
                continue
            for module in _imports(path):
                self.assertFalse(module.startswith("pipecomet.demo"),
                                 f"{path.relative_to(SRC)} imports {module}")
            self.assertNotIn("pipecomet.demo:", path.read_text(), str(path))

    def test_demo_registers_its_section(self):
        from pipecomet._config import SECTIONS
        from pipecomet.demo._config import DemoConfig

        self.assertIs(SECTIONS["demo"][0], DemoConfig)
        config = pipecomet.config.Config.from_dict({"demo": {"max_image_pixels": 10}})
        self.assertEqual(config.demo.max_image_pixels, 10)
