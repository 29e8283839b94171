"""The unit tier: `BrokerState` driven directly, with a fake clock.

No process, socket or thread: each test states a time (``now``) with every
call and reads what the state says must happen (`Effects`). The whole tier
runs in well under ten seconds: ``python -m pytest tests/unit`` (or ``-m unit``).
"""

from __future__ import annotations

import pytest

from .harness import Harness


def pytest_collection_modifyitems(items):
    for item in items:
        if "/unit/" in str(item.fspath):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def isolated():
    """Overrides the integration tier's: nothing here starts a process."""
    yield None


@pytest.fixture
def h() -> Harness:
    harness = Harness()
    harness.client()
    return harness


@pytest.fixture
def durable() -> Harness:
    harness = Harness(durable=True)
    harness.client()
    return harness
