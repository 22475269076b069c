"""
pytest configuration: pytest-twisted runs the reactor (one per session);
integration tests are marked and run in `make test` like every other test.
"""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in item.nodeid or "test_it_" in item.nodeid:
            item.add_marker(pytest.mark.integration)
