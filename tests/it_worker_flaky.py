"""
A workers module that cannot be imported until the file named by
``PIPECOMET_TEST_FLAKY_FLAG`` exists: a worker that crashes at start until
the test "repairs" it (the crash-loop breaker's retry after its cooldown).
"""

from __future__ import annotations

import os

import tests.it_worker_functions  # noqa: F401  (the functions, once healthy)

if not os.path.exists(os.environ["PIPECOMET_TEST_FLAKY_FLAG"]):
    raise RuntimeError("not repaired yet")
