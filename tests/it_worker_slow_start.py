"""
A workers module whose import takes far longer than the ``start_timeout``
the test sets (a worker that never says hello in time).
"""

from __future__ import annotations

import time

import tests.it_worker_functions  # noqa: F401

time.sleep(120)
