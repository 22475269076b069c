"""
pytest configuration: pytest-twisted runs the reactor (one per session);
integration tests are marked and run in `make test` like every other test.

Hypothesis profiles (docs/testing.md):

``dev``
    local runs: random examples, the example database off (the suite must
    not write into the checkout), the usual counts.
``ci``
    chosen when ``CI=true`` (or ``HYPOTHESIS_PROFILE=ci``): derandomized, so
    every run tries the same examples, with more of them for the models
    (:func:`examples`), no deadline and no database.

``mutation``
    ``make mutation``: derandomized, fewer examples (each mutant runs them).

``HYPOTHESIS_PROFILE`` names a profile outright.  Trial does not read this
file; the test modules that use hypothesis import :func:`examples` from it,
which registers and loads the profiles under trial as well.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# The properties are trial TestCase methods, which hypothesis may see called
# on more than one instance (differing_executors): harmless here.
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
             HealthCheck.data_too_large, HealthCheck.differing_executors]

settings.register_profile("dev", deadline=None, database=None, suppress_health_check=_SUPPRESS)
settings.register_profile("ci", deadline=None, database=None, derandomize=True,
                          suppress_health_check=_SUPPRESS, print_blob=True)
settings.register_profile("mutation", deadline=None, database=None, derandomize=True,
                          suppress_health_check=_SUPPRESS)


def _profile() -> str:
    chosen = os.environ.get("HYPOTHESIS_PROFILE")
    if chosen:
        return chosen
    return "ci" if os.environ.get("CI", "").lower() in ("true", "1", "yes") else "dev"


PROFILE = _profile()
settings.load_profile(PROFILE)

#: Examples per model and profile: the resume and quota models get more on CI.
#: (Deadlines and health checks come from the profile: the tests set only
#: ``max_examples``.)
_EXAMPLES = {
    "dev": {"resume": 300, "quota": 300, "parser": 150},
    "ci": {"resume": 1000, "quota": 1000, "parser": 300},
    "mutation": {"resume": 150, "quota": 150, "parser": 50},
}


def examples(model: str) -> int:
    """
    How many examples the property ``model`` ("resume", "quota", "parser")
    gets under the loaded profile.
    """
    return _EXAMPLES.get(PROFILE, _EXAMPLES["dev"])[model]


def pytest_report_header(config: pytest.Config) -> str:
    return f"hypothesis profile: {PROFILE}"


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in item.nodeid or "test_it_" in item.nodeid:
            item.add_marker(pytest.mark.integration)
